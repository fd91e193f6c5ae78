"""What one wake-up costs on this machine: CPU per socket round trip, back to back and after idling.

    .venv/bin/python bench/wake_cost.py [--trips 2000] [--idle-ms 40] [--rounds 3] [--quick]

A pod's agent spends most of its CPU being woken (a poll answer, a timer), not in its Python, so
its figures move with what a wake-up costs on the machine that day (a VM that deschedules idle
vCPUs, caches other processes evicted). This bench measures just that, with no podagent code: a
client on each event loop (uvloop, asyncio's own) sends a 12-byte request over loopback TCP to a
forked server that takes ~0.1 ms to answer (like a simulated device), and counts the client's CPU
time (``time.process_time``) from the send to the answer, over ``--trips`` round trips:

- back to back: the next request right after an answer (what a Modbus unit polled with
  ``max_in_flight = 1`` looks like inside one poll);
- after ``--idle-ms`` asleep first (what the first answer of a poll, or a poll of a unit that is
  alone in its phase, looks like).

Read the agent's figures of the same day against these (README, "2026-12-07, second session").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

REQUEST, ANSWER = b"q" * 12, b"a" * 11
DEVICE_WORK = 3000  # loop iterations the server spends per answer (~0.1 ms)


def serve(listener: socket.socket) -> None:
    """The forked "device": one connection, an answer per request after a little work."""
    conn, _ = listener.accept()
    while conn.recv(100):
        x = 0
        for i in range(DEVICE_WORK):
            x += i
        conn.send(ANSWER)
    os._exit(0)


class _Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.answered: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # (uvloop's is no asyncio.Transport subclass)

    def data_received(self, data: bytes) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)


async def cpu_per_trip(port: int, trips: int, idle_s: float) -> float:
    """Client CPU us per round trip (send -> answer), each after ``idle_s`` asleep."""
    loop = asyncio.get_running_loop()
    client = _Client()
    await loop.create_connection(lambda: client, "127.0.0.1", port)
    transport = client.transport
    assert transport is not None and hasattr(transport, "write")
    cpu = 0.0
    for i in range(trips + 10):  # the first 10 warm up
        if idle_s:
            await asyncio.sleep(idle_s)
        client.answered = loop.create_future()
        t0 = time.process_time()
        transport.write(REQUEST)
        await client.answered
        if i >= 10:
            cpu += time.process_time() - t0
    transport.close()
    return 1e6 * cpu / trips


def one(factory: Callable[[], asyncio.AbstractEventLoop], trips: int, idle_s: float) -> float:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        serve(listener)
    listener.close()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(cpu_per_trip(port, trips, idle_s))
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trips", type=int, default=2000, help="round trips back to back")
    ap.add_argument("--idle-ms", type=float, default=40.0, help="asleep before each idle round trip")
    harness.add_args(ap)
    args = ap.parse_args()
    trips = 50 if args.quick else args.trips
    idle_trips = 10 if args.quick else max(10, min(args.trips, int(20_000 / max(args.idle_ms, 1.0))))
    import uvloop

    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "uvloop": uvloop.new_event_loop,
        "asyncio": asyncio.new_event_loop,
    }
    rows: list[dict[str, float]] = []
    for _ in range(harness.rounds_of(args)):
        row: dict[str, float] = {}
        for name, factory in loops.items():
            row[f"{name}, back to back, us CPU per round trip"] = one(factory, trips, 0.0)
            row[f"{name}, after {args.idle_ms:g} ms idle, us CPU per round trip"] = one(
                factory, idle_trips, args.idle_ms / 1000
            )
        rows.append(row)
    harness.summary(
        rows,
        title=f"client CPU per loopback round trip ({trips} back to back, {idle_trips} after idling)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
