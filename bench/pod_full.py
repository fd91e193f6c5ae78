"""The `full` pod (576 GPUs, 32 PDUs, 2 CDUs, 2 chillers, 2 meters) with and without the agent.

Prints:
1. hwsim alone: CPU % of one core and late ticks while nobody polls it;
2. hwsim while the agent polls every device at 1 s: its CPU (the cost of answering, which an agent
   measurement can subtract);
3. the agent (``podagent run`` as its own process, interlocks and MQTT off unless --with-all):
   CPU % of one core, RSS, per-cycle poll duration p50/p99 and missed deadlines per device kind.

    .venv/bin/python bench/pod_full.py [--seconds 60] [--idle-seconds 20] [--pod full]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hwsim.agentconf import render_agent_config  # noqa: E402


def interlock_steps(text: str) -> float:
    m = re.search(r"^podagent_interlock_evaluations_total ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def histogram_quantile(text: str, family: str, q: float, device: str | None = None) -> float | None:
    """Prometheus' histogram_quantile (linear inside the bucket) over one exported histogram."""
    where = f'device="{device}",' if device is not None else ""
    pattern = rf'^{family}_bucket\{{{where}le="([^"]+)"\}} ([0-9.e+]+)$'
    buckets = [(float(m.group(1)), float(m.group(2))) for m in re.finditer(pattern, text, re.M)]
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == math.inf:
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return None


def cpu_pct(proc: psutil.Process, seconds: float) -> float:
    t0 = proc.cpu_times()
    w0 = time.monotonic()
    time.sleep(seconds)
    t1 = proc.cpu_times()
    used = (t1.user - t0.user) + (t1.system - t0.system)
    # Children too (socat for the RTU line).
    return 100.0 * used / (time.monotonic() - w0)


def tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure_tree(proc: psutil.Process, seconds: float) -> float:
    c0, w0 = tree_cpu(proc), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (tree_cpu(proc) - c0) / (time.monotonic() - w0)


def status(manifest: dict[str, object]) -> dict[str, object]:
    from hwsim.runner import control_request

    return control_request(str(manifest["control"]), {"cmd": "status"})


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pod", default="full")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--idle-seconds", type=float, default=20.0)
    ap.add_argument("--with-all", action="store_true", help="also run interlocks (MQTT stays off)")
    ap.add_argument(
        "--py-spy",
        metavar="FILE",
        help="after measuring, profile the agent 20 s with py-spy into FILE (collapsed stacks)",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="podbench-"))
    run_dir = tmp / "pod"
    pod = subprocess.Popen(
        [sys.executable, "-m", "hwsim.cli", "run", "--pod", args.pod, "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "hwsim.log").open("wb"),
        cwd=ROOT,
    )
    agent: subprocess.Popen[bytes] | None = None
    try:
        manifest_path = run_dir / "manifest.json"
        while not manifest_path.exists():
            if pod.poll() is not None:
                print((tmp / "hwsim.log").read_text())
                return 1
            time.sleep(0.1)
        manifest = json.loads(manifest_path.read_text())
        hw = psutil.Process(pod.pid)
        time.sleep(3)
        late0 = int(status(manifest)["late_ticks"])  # type: ignore[call-overload]
        idle = measure_tree(hw, args.idle_seconds)
        late_idle = int(status(manifest)["late_ticks"]) - late0  # type: ignore[call-overload]

        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        extra = f'[prometheus]\nlisten = "127.0.0.1:{port}"\n\n[control]\nenabled = false\n'
        if not args.with_all:
            extra += "\n[interlocks]\nenabled = false\n"
        cfg = tmp / "podagent.toml"
        cfg.write_text(render_agent_config(manifest, state_dir=str(tmp / "state"), extra=extra))
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "agent.log").open("wb"),
            cwd=ROOT,
        )
        ag = psutil.Process(agent.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if "podagent_ready 1" in metrics(port):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        time.sleep(5)  # past start-up (first v3 discovery, imports)
        late1 = int(status(manifest)["late_ticks"])  # type: ignore[call-overload]
        steps0 = interlock_steps(metrics(port))
        a0, h0, w0 = tree_cpu(ag), tree_cpu(hw), time.monotonic()
        rss = []
        end = w0 + args.seconds
        while time.monotonic() < end:
            time.sleep(1.0)
            rss.append(ag.memory_info().rss)
        wall = time.monotonic() - w0
        agent_pct = 100.0 * (tree_cpu(ag) - a0) / wall
        hw_busy = 100.0 * (tree_cpu(hw) - h0) / wall
        late_busy = int(status(manifest)["late_ticks"]) - late1  # type: ignore[call-overload]
        text = metrics(port)
        steps = interlock_steps(text) - steps0
        if args.py_spy:
            subprocess.run(
                ["py-spy", "record", "--pid", str(agent.pid), "--duration", "20", "--rate", "200",
                 "--format", "raw", "--output", args.py_spy, "--nonblocking"],
                check=False, stdout=subprocess.DEVNULL,
            )  # fmt: skip
    finally:
        for p in (agent, pod):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()

    kinds = {}
    for entry in manifest["snmp"]:
        kinds[entry["device"]] = f"snmp v{entry['version']}"
    for entry in manifest["modbus"]:
        kinds[entry["device"]] = "modbus rtu" if "serial" in entry else "modbus tcp"
    kinds["gpus"] = f"nvml ({manifest['nvml']['gpus']} GPUs)"
    kinds["controller"] = "host"
    q: dict[tuple[str, str], float] = {}
    for dev in kinds:
        for quant in ("0.5", "0.99"):
            value = histogram_quantile(text, "podagent_poll_duration_seconds", float(quant), dev)
            if value is not None:
                q[(dev, quant)] = value
    missed = {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(r'podagent_poll_missed_deadlines_total\{device="([^"]+)"\} ([0-9.]+)', text)
    }
    polls = {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(r'podagent_device_polls_total\{device="([^"]+)"\} ([0-9.]+)', text)
    }
    errors = {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(r'podagent_device_poll_errors_total\{device="([^"]+)"\} ([0-9.]+)', text)
    }

    print(
        f"\npod `{args.pod}`: {manifest['nvml']['gpus']} GPUs, {len(manifest['snmp'])} SNMP PDUs, "
        f"{len(manifest['modbus'])} Modbus units; machine: {psutil.cpu_count()} cores"
    )
    print("\n| what | CPU, % of one core | notes |")
    print("|---|---|---|")
    print(f"| hwsim, nobody polling ({args.idle_seconds:.0f} s) | {idle:.1f} | late ticks: {late_idle} |")
    print(
        f"| hwsim while the agent polls everything at 1 s | {hw_busy:.1f} | answering costs "
        f"{hw_busy - idle:.1f}; late ticks: {late_busy} |"
    )
    print(
        f"| podagent ({args.seconds:.0f} s, interlocks {'on' if args.with_all else 'off'}) "
        f"| {agent_pct:.1f} | "
        f"RSS median {statistics.median(rss) / 2**20:.0f} MiB, max {max(rss) / 2**20:.0f} MiB |"
    )
    if args.with_all:
        step_q = {
            quant: histogram_quantile(text, "podagent_interlock_evaluation_duration_seconds", float(quant))
            or math.nan
            for quant in ("0.5", "0.99")
        }
        print(
            f"\ninterlock engine: {steps / wall:.1f} evaluations/s, duration p50 "
            f"{1000 * step_q.get('0.5', math.nan):.2f} ms, p99 {1000 * step_q.get('0.99', math.nan):.2f} ms"
        )
    print("\n| device kind | devices | poll p50 (ms) | poll p99 (ms) | polls | errors | missed deadlines |")
    print("|---|---|---|---|---|---|---|")
    by_kind: dict[str, list[str]] = {}
    for dev, kind in kinds.items():
        by_kind.setdefault(kind, []).append(dev)
    for kind, devs in sorted(by_kind.items()):
        p50 = [q[(d, "0.5")] for d in devs if (d, "0.5") in q]
        p99 = [q[(d, "0.99")] for d in devs if (d, "0.99") in q]
        print(
            f"| {kind} | {len(devs)} | {1000 * statistics.median(p50):.1f} | {1000 * max(p99):.1f} | "
            f"{sum(polls.get(d, 0) for d in devs)} | {sum(errors.get(d, 0) for d in devs)} | "
            f"{sum(missed.get(d, 0) for d in devs)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
