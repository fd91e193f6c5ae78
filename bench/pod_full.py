"""The `full` pod (576 GPUs, 32 PDUs, 2 CDUs, 2 chillers, 2 meters) with and without the agent.

Prints:
1. hwsim alone: CPU % of one core and late ticks while nobody polls it;
2. hwsim while the agent polls every device at 1 s: its CPU (the cost of answering, which an agent
   measurement can subtract);
3. the agent (``podagent run`` as its own process, interlocks and MQTT off unless --with-all):
   CPU % of one core, RSS, per-cycle poll duration p50/p99 and missed deadlines per device kind.

CPU figures are CPU time per process (``bench/harness.py``), measured in ``--rounds`` consecutive
windows (default 3) of one run, printed as median and range.

    .venv/bin/python bench/pod_full.py [--seconds 60] [--idle-seconds 20] [--pod full] [--rounds 3] [--quick]
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

from bench import harness  # noqa: E402
from hwsim.agentconf import render_agent_config  # noqa: E402


def interlock_steps(text: str, family: str = "podagent_interlock_evaluations_total") -> float:
    m = re.search(rf"^{family} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


COALESCED = "podagent_interlock_coalesced_batches_total"
FULL = "podagent_interlock_full_evaluations_total"


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


def per_device(text: str, family: str) -> dict[str, int]:
    return {
        m.group(1): int(float(m.group(2)))
        for m in re.finditer(rf'{family}\{{device="([^"]+)"\}} ([0-9.e+]+)', text)
    }


def status(manifest: dict[str, object]) -> dict[str, object]:
    from hwsim.runner import control_request

    return control_request(str(manifest["control"]), {"cmd": "status"})


def late_ticks(manifest: dict[str, object]) -> int:
    return int(status(manifest)["late_ticks"])  # type: ignore[call-overload]


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def rss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.NoSuchProcess:
        return math.nan


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pod", default="full")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of one measured round")
    ap.add_argument("--idle-seconds", type=float, default=20.0, help="hwsim alone, per round")
    ap.add_argument("--with-all", action="store_true", help="also run interlocks (MQTT stays off)")
    ap.add_argument(
        "--py-spy",
        metavar="FILE",
        help="after measuring, profile the agent 20 s with py-spy into FILE (collapsed stacks)",
    )
    harness.add_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.pod, args.seconds, args.idle_seconds = "tiny", 3.0, 2.0
    n_rounds = harness.rounds_of(args)
    tmp = Path(tempfile.mkdtemp(prefix="podbench-"))
    run_dir = tmp / "pod"
    pod = subprocess.Popen(
        [sys.executable, "-m", "hwsim.cli", "run", "--pod", args.pod, "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "hwsim.log").open("wb"),
        cwd=ROOT,
    )
    agent: subprocess.Popen[bytes] | None = None
    idle_rounds: list[dict[str, float]] = []
    rounds: list[dict[str, float]] = []
    try:
        manifest_path = run_dir / "manifest.json"
        while not manifest_path.exists():
            if pod.poll() is not None:
                print((tmp / "hwsim.log").read_text())
                return 1
            time.sleep(0.1)
        manifest = json.loads(manifest_path.read_text())
        time.sleep(3)
        for _ in range(n_rounds):
            late0 = late_ticks(manifest)
            w = harness.CpuWindow({"hwsim": pod.pid}).start()
            time.sleep(args.idle_seconds)
            w.stop()
            idle_rounds.append(
                {"hwsim alone, % of a core": w.pct("hwsim"), "late ticks": late_ticks(manifest) - late0}
            )

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
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if "podagent_ready 1" in metrics(port):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        time.sleep(2 if args.quick else 5)  # past start-up (first v3 discovery, imports)
        idle_hw = statistics.median(r["hwsim alone, % of a core"] for r in idle_rounds)
        for _ in range(n_rounds):
            late1 = late_ticks(manifest)
            text0 = metrics(port)
            coalesced0, full0 = interlock_steps(text0, COALESCED), interlock_steps(text0, FULL)
            steps0, missed0, polls0 = (
                interlock_steps(text0),
                per_device(text0, "podagent_poll_missed_deadlines_total"),
                per_device(text0, "podagent_device_polls_total"),
            )
            w = harness.CpuWindow({"agent": agent.pid, "hwsim": pod.pid}).start()
            rss = []
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
                rss.append(rss_mib(agent.pid))
            w.stop()
            text = metrics(port)
            missed = per_device(text, "podagent_poll_missed_deadlines_total")
            polls = per_device(text, "podagent_device_polls_total")
            row = {
                "podagent, % of a core": w.pct("agent"),
                "podagent RSS max, MiB": max(rss),
                "hwsim while polled, % of a core": w.pct("hwsim"),
                "hwsim answering (polled - alone), % of a core": w.pct("hwsim") - idle_hw,
                "hwsim late ticks": late_ticks(manifest) - late1,
                "missed deadlines (all devices)": sum(missed.values()) - sum(missed0.values()),
                "polls (all devices)": sum(polls.values()) - sum(polls0.values()),
            }
            if args.with_all:
                row["interlock evaluations/s"] = (interlock_steps(text) - steps0) / w.wall_s
                row["input batches coalesced/s"] = (interlock_steps(text, COALESCED) - coalesced0) / w.wall_s
                row["full interlock evaluations/s"] = (interlock_steps(text, FULL) - full0) / w.wall_s
            rounds.append(row)
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
    missed = per_device(text, "podagent_poll_missed_deadlines_total")
    polls = per_device(text, "podagent_device_polls_total")
    errors = per_device(text, "podagent_device_poll_errors_total")

    print(
        f"\npod `{args.pod}`: {manifest['nvml']['gpus']} GPUs, {len(manifest['snmp'])} SNMP PDUs, "
        f"{len(manifest['modbus'])} Modbus units; machine: {psutil.cpu_count()} cores; "
        f"interlocks {'on' if args.with_all else 'off'}; {n_rounds} round(s) of {args.seconds:.0f} s "
        "(CPU time per process: holds on a shared machine)"
    )
    harness.summary(idle_rounds, title=f"hwsim, nobody polling ({args.idle_seconds:.0f} s rounds)")
    harness.summary(rounds, title="agent polling every device at 1 s")
    if args.with_all:
        step_q = {
            quant: histogram_quantile(text, "podagent_interlock_evaluation_duration_seconds", float(quant))
            or math.nan
            for quant in ("0.5", "0.99")
        }
        print(
            f"\ninterlock engine step p50 {1000 * step_q.get('0.5', math.nan):.2f} ms, "
            f"p99 {1000 * step_q.get('0.99', math.nan):.2f} ms (whole run)"
        )
    print("\nwhole run (poll durations from the agent's histograms over its lifetime):")
    print("\n| device kind | devices | poll p50 (ms) | poll p99 (ms) | polls | errors | missed deadlines |")
    print("|---|---|---|---|---|---|---|")
    by_kind: dict[str, list[str]] = {}
    for dev, kind in kinds.items():
        by_kind.setdefault(kind, []).append(dev)
    for kind, devs in sorted(by_kind.items()):
        p50 = [q[(d, "0.5")] for d in devs if (d, "0.5") in q] or [math.nan]
        p99 = [q[(d, "0.99")] for d in devs if (d, "0.99") in q] or [math.nan]
        print(
            f"| {kind} | {len(devs)} | {1000 * statistics.median(p50):.1f} | {1000 * max(p99):.1f} | "
            f"{sum(polls.get(d, 0) for d in devs)} | {sum(errors.get(d, 0) for d in devs)} | "
            f"{sum(missed.get(d, 0) for d in devs)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
