"""What a node agent costs, and how fast a controller's cap reaches NVML through it.

A real ``podagent node`` process against a simulated server of 4 or 8 GPUs, NVML polled at 1 Hz,
polled itself over loopback at 1 Hz by the controller's node driver (as a controller would):
its CPU (user + system, share of one core) and RSS over ``--seconds``; then ``--sets`` cap leases
(controller decision -> the node's NVML set, read back, answer received), p50 and p99.
N rounds (``--rounds``, default 3): median and range of each figure.

Usage: .venv/bin/python bench/node_cost.py [--rounds 3] [--seconds 20] [--sets 200]
Goals (issue 12): <= 1% of a core, <= 40 MB RSS at 1 Hz; decision -> NVML set p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import NodeDevice
from agent.drivers.base import DeviceUnavailable
from agent.drivers.node import NodeDriver
from hwsim.agentconf import NodeLayout, render_node_config
from hwsim.podspec import POD_DIR
from tests.conftest import start_pod, stop_pod
from tests.node_helpers import NodeProc, free_port


def pod_file(tmp: Path, gpus: int) -> Path:
    text = (POD_DIR / "tiny.toml").read_text().replace('name = "tiny"', f'name = "bench{gpus}"')
    text = text.replace("gpus_per_server = 8", f"gpus_per_server = {gpus}")
    path = tmp / f"bench{gpus}.toml"
    path.write_text(text)
    return path


async def measure(node: NodeProc, key: Path, seconds: float, sets: int) -> tuple[float, float, list[float]]:
    driver = NodeDriver(NodeDevice(kind="node", id=node.id, host="127.0.0.1", port=node.port, key_file=key))
    await driver.open()
    assert node.proc is not None
    proc = psutil.Process(node.proc.pid)
    try:
        deadline = time.monotonic() + 30
        while True:  # the node answers "starting" until its first NVML poll is done
            try:
                await driver.poll()
                break
            except DeviceUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        for _ in range(2):  # warm
            await driver.poll()
            await asyncio.sleep(1.0)
        t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
        rss: list[int] = []
        next_poll = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await driver.poll()
            rss.append(proc.memory_info().rss)
            next_poll += 1.0
            await asyncio.sleep(max(0.0, next_poll - time.monotonic()))
        cpu_pct = (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0) * 100
        gpu = f"{driver.prefix}0"
        latencies = []
        for i in range(sets):
            cap = 400.0 if i % 2 == 0 else 450.0
            t = time.perf_counter()
            result = await driver.set_power_limits({gpu: cap})
            latencies.append((time.perf_counter() - t) * 1000)
            assert result[gpu] == cap, result
        return cpu_pct, max(rss) / 2**20, latencies
    finally:
        await driver.close()


def q(values: list[float], p: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, max(0, round(p * len(data)) - 1))]


def fmt(values: list[float], unit: str) -> str:
    return f"median {statistics.median(values):.2f} {unit} (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--sets", type=int, default=200)
    ap.add_argument("--gpus", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--quick", action="store_true", help="CI smoke: one short round, figures meaningless")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.sets, args.gpus = 1, 2.0, 10, [4]
    for gpus in args.gpus:
        cpus, rsss, p50s, p99s = [], [], [], []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="nodebench") as d:
                tmp = Path(d)
                pod = start_pod(tmp / "pod", str(pod_file(tmp, gpus)))
                try:
                    key = tmp / "pod.key"
                    key.write_text(os.urandom(32).hex())
                    port = free_port()
                    cfg = tmp / "node.toml"
                    layout = NodeLayout(key_file=str(key), ports={0: port})
                    cfg.write_text(
                        render_node_config(
                            pod.manifest,
                            0,
                            layout,
                            poll_interval_s=1.0,
                            controller_lost_after_s=600.0,
                            extra='[logging]\nformat = "json"\nlevel = "warning"\n',
                        )
                    )
                    node = NodeProc(server=0, port=port, config=cfg, log=tmp / "node.log")
                    node.start()
                    try:
                        wait_armed_quiet(node)
                        cpu, rss, lat = asyncio.run(measure(node, key, args.seconds, args.sets))
                    finally:
                        node.kill()
                finally:
                    stop_pod(pod)
            cpus.append(cpu)
            rsss.append(rss)
            p50s.append(q(lat, 0.5))
            p99s.append(q(lat, 0.99))
        print(f"node agent, {gpus} GPUs, 1 Hz ({args.rounds} rounds of {args.seconds:g} s):")
        print(f"  CPU  {fmt(cpus, '% of a core')}")
        print(f"  RSS  {fmt(rsss, 'MiB')} (peak per round)")
        print(f"  cap lease -> NVML set read back -> answer: p50 {fmt(p50s, 'ms')}; p99 {fmt(p99s, 'ms')}")


def wait_armed_quiet(node: NodeProc) -> None:
    """The node logs at warning here: wait for its port (the first answer is awaited in measure)."""
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", node.port), 0.2):
                break
        except OSError:
            time.sleep(0.05)


if __name__ == "__main__":
    main()
