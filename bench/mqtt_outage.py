"""MQTT store-and-forward under a broker outage, at `demo` size (64 GPUs, 8 PDUs, CDU, chiller).

Runs mosquitto (persistent sessions), the demo hwsim pod and the agent (subprocesses), and a fleet
subscriber (persistent session, QoS 1) here. The broker is stopped for --outage seconds, then
restarted; the agent replays its spool while live data keeps flowing. Prints samples produced /
delivered / lost, seq gaps and duplicates, the replay rate and live telemetry latency during the
replay. Goal: 0 lost, replay >= 5,000 msgs/s, live latency < 2 s.

Each of ``--rounds`` (default 3) rounds is one outage and restart in the same run; the figures per
round (replay rate, the agent's CPU time per replayed message above its connected baseline) are
printed as median and range, then the whole run's loss accounting.

    .venv/bin/python bench/mqtt_outage.py [--outage 60] [--pod demo] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from hwsim.agentconf import render_agent_config  # noqa: E402
from tests.conftest_mqtt import Mosquitto  # noqa: E402


class Broker(Mosquitto):
    def write_conf(self) -> Path:
        path = super().write_conf()
        store = self.dir / "db"
        store.mkdir(exist_ok=True)
        os.chmod(store, 0o777)
        path.write_text(
            path.read_text().replace(
                "persistence false\n", f"persistence true\npersistence_location {store}/\n"
            )
        )
        return path

    def stop_gracefully(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        self.proc = None


async def collect(port: int, out: list[tuple[float, str, bytes]], stop: asyncio.Event) -> None:
    async def read(client: aiomqtt.Client) -> None:
        async for m in client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            out.append((time.time(), str(m.topic), payload))

    while not stop.is_set():
        try:
            async with aiomqtt.Client(
                "127.0.0.1",
                port,
                identifier="bench-fleet",
                clean_session=False,
                max_queued_incoming_messages=0,
            ) as client:
                await client.subscribe("podagent/#", qos=1)
                # On stop only the reader is cancelled and the client leaves its `async with`
                # itself, disconnecting while the broker is up (cancelling the whole client
                # mid-read made paho register a closed socket: "Bad file descriptor" at shutdown).
                reader = asyncio.create_task(read(client))
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if reader.done():
                    reader.result()  # the link broke: MqttError, reconnect below
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        except (aiomqtt.MqttError, OSError):
            # OSError: the broker went away while paho was registering its socket with the loop.
            if not stop.is_set():
                await asyncio.sleep(0.2)


def replay_round(received: list[tuple[float, str, bytes]], start: int) -> tuple[int, int, int, float]:
    """Historical telemetry since index ``start``: MQTT messages, the spooled messages (seqs) and
    samples they carried, and the span they arrived in."""
    hist, rows, samples = [], 0, 0
    for at, topic, payload in received[start:]:
        if "/telemetry/" not in topic:
            continue
        body = json.loads(payload)
        if body.get("historical"):
            hist.append(at)
            rows += len(body.get("seqs") or [body["seq"]])
            samples += len(body["readings"])
    return len(hist), rows, samples, (max(hist) - min(hist)) if len(hist) >= 2 else math.nan


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outage", type=float, default=60.0)
    ap.add_argument("--pod", default="demo")
    ap.add_argument("--before", type=float, default=10.0, help="seconds connected before the outage")
    ap.add_argument("--after", type=float, default=10.0, help="seconds connected after each restart")
    harness.add_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.pod, args.outage, args.before, args.after = "tiny", 3.0, 3.0, 3.0
    work = Path(tempfile.mkdtemp(prefix="mqtt-bench-"))
    broker = Broker()
    broker.start()
    pod = subprocess.Popen(  # noqa: ASYNC220 - spawning is brief; the test waits on the child elsewhere
        [
            sys.executable,
            "-m",
            "hwsim.cli",
            "run",
            "--pod",
            args.pod,
            "--run-dir",
            str(work / "pod"),
            "--manifest",
            str(work / "manifest.json"),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agent: subprocess.Popen[bytes] | None = None
    received: list[tuple[float, str, bytes]] = []
    rounds: list[dict[str, float]] = []
    stop = asyncio.Event()
    task = asyncio.create_task(collect(broker.port, received, stop))
    restarted = time.time()
    try:
        while not (work / "manifest.json").exists():
            if pod.poll() is not None:
                raise SystemExit("hwsim pod failed to start")
            await asyncio.sleep(0.1)
        manifest = json.loads((work / "manifest.json").read_text())
        mqtt = (
            "[prometheus]\nenabled = false\n\n[mqtt]\nenabled = true\n"
            f'brokers = ["127.0.0.1:{broker.port}"]\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n'
            "drain_on_stop_s = 5.0\n"
        )
        config = work / "podagent.toml"
        config.write_text(render_agent_config(manifest, state_dir=str(work / "state"), extra=mqtt))
        agent = subprocess.Popen(  # noqa: ASYNC220 - spawning is brief; the test waits on the child elsewhere
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(args.before)
        windows: list[tuple[harness.CpuWindow, int]] = []
        for n in range(harness.rounds_of(args)):
            print(f"round {n + 1}: stopping the broker for {args.outage:.0f} s ...", flush=True)
            broker.stop_gracefully()
            await asyncio.sleep(args.outage)
            mark = len(received)
            w = harness.CpuWindow({"agent": agent.pid})
            restarted = time.time()
            broker.start()
            w.start()
            await asyncio.sleep(args.after)
            w.stop()
            publishes, count, samples, span = replay_round(received, mark)
            windows.append((w, count))
            rounds.append(
                {
                    "replayed spooled messages": count,
                    "MQTT publishes they took": publishes,
                    "replay spooled msgs/s (wall)": count / span if span > 0 else math.nan,
                    "replay samples/s (wall)": samples / span if span > 0 else math.nan,
                }
            )
        # The agent's steady cost while connected (replay over, start-up long past): subtracted from
        # each round's window to give the CPU a replayed message costs.
        base = harness.CpuWindow({"agent": agent.pid}).start()
        await asyncio.sleep(max(5.0, args.after / 2))
        base_rate = base.stop().cpu_s["agent"] / base.wall_s
        for row, (w, count) in zip(rounds, windows, strict=True):
            extra_cpu = w.cpu_s["agent"] - base_rate * w.wall_s
            row["agent CPU us per replayed spooled message"] = 1e6 * extra_cpu / count if count else math.nan
            row["spooled msgs/s per core of agent CPU"] = count / extra_cpu if extra_cpu > 0 else math.nan
            row["agent CPU while connected, % of a core"] = 100 * base_rate
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        await asyncio.sleep(1.0)
    finally:
        stop.set()  # the subscriber disconnects by itself (within 0.25 s), the broker still up
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 10)
        if agent is not None and agent.poll() is None:
            agent.kill()
        pod.terminate()
        pod.wait(10)
        broker.close()
    harness.summary(
        rounds, title=f"replay after a {args.outage:.0f} s outage, per round (CPU time per process)"
    )
    report(received, restarted)
    return 0


def report(received: list[tuple[float, str, bytes]], restarted: float) -> None:
    telemetry: dict[tuple[str, int], int] = {}  # (boot, seq) -> samples
    arrivals: list[tuple[float, dict[str, Any]]] = []
    seqs: dict[str, list[int]] = {}
    final_state: dict[str, Any] | None = None
    dup = 0
    for at, topic, payload in received:
        body = json.loads(payload)
        # A replayed message may stand for several spooled ones: "seqs", and "counts" readings each.
        numbers = body.get("seqs") or [body.get("seq")]
        if "/telemetry/" in topic or topic.endswith(("/event", "/cmd_reply")):
            seqs.setdefault(body["boot_id"], []).extend(numbers)
        if "/telemetry/" in topic:
            counts = body.get("counts") or [len(body["readings"])]
            for seq, n in zip(numbers, counts, strict=True):
                key = (body["boot_id"], seq)
                if key in telemetry:
                    dup += 1
                telemetry[key] = n
            arrivals.append((at, body))
        elif topic.endswith("/state"):
            final_state = body["state"]
    delivered = sum(telemetry.values())
    mq = (final_state or {}).get("mqtt", {})
    produced = mq.get("samples_spooled")
    gaps = 0
    for values in seqs.values():
        unique = set(values)
        gaps += len(set(range(1, max(unique) + 1)) - unique)
    hist = [at for at, b in arrivals if b.get("historical")]
    print("\nwhole run:")
    print(f"samples produced (spooled by the agent): {produced}")
    print(f"samples delivered (unique telemetry):    {delivered}")
    print(f"samples lost:                            {None if produced is None else produced - delivered}")
    print(f"dropped by the spool bound:              {mq.get('dropped_samples')}")
    print(f"seq gaps: {gaps}; duplicate messages (QoS 1 at-least-once): {dup}")
    if len(hist) >= 2:
        span = max(hist) - min(hist)
        rows = sum(len(b.get("seqs") or [b["seq"]]) for _, b in arrivals if b.get("historical"))
        print(
            f"replayed: {rows} spooled messages in {len(hist)} MQTT messages, {span:.2f} s -> "
            f"{rows / max(span, 1e-6):,.0f} spooled msgs/s ({len(hist) / max(span, 1e-6):,.0f} publishes/s)"
        )
        lo, hi = min(hist), max(hist) + 0.5
        live = [at - b["ts"] / 1000 for at, b in arrivals if not b.get("historical") and lo <= at <= hi]
        if live:
            print(
                f"live telemetry during replay: {len(live)} msgs, latency p50 "
                f"{statistics.median(live) * 1000:.0f} ms, max {max(live) * 1000:.0f} ms"
            )
        else:
            print("live telemetry during replay: none arrived in the replay window")
        after = [at - b["ts"] / 1000 for at, b in arrivals if not b.get("historical") and at >= restarted]
        if after:
            print(
                f"live telemetry after the restart: max latency {max(after) * 1000:.0f} ms"
                f" over {len(after)} msgs"
            )
    else:
        print("no replay seen")


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
