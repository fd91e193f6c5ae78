"""The benches still run: each bench's ``--quick`` mode, all of them at once (figures not asserted).

A bench is how performance is shown (bench/harness.py: CPU time per process, rounds, median and
range); this smoke only catches one that broke (an import, a renamed metric, a changed CLI). The
benches run four at a time so that the whole smoke costs about twice the slowest one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Waves of four, in this order: the first two each have two benches that start a whole pod and two
# lighter ones; then the node-agent, engine and live grid benches (small pods); then the controller
# against nodes, the node decode and the wake-up cost (no pod, a few seconds).
BENCHES = [
    "pod_full",
    "mqtt_outage",
    "snmp_cost",
    "grid_ramp",
    "vs_collectd",
    "interlock_latency",
    "modbus_cost",
    "nvml_cost",
    "interlock_cost",
    "node_cost",
    "node_latency",
    "grid_ramp_live",
    "controller_nodes",
    "node_decode",
    "wake_cost",
]
NEEDS = {"mqtt_outage": "mosquitto", "snmp_cost": "snmpget", "pod_full": "socat", "vs_collectd": "collectd"}


# At most this many benches at once: each starts a simulated pod, and a 2-core machine starting
# eight pods at once leaves some of them past their own start-up timeouts.
PARALLEL = 4


def _start(name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def quick_runs() -> dict[str, tuple[int, str]]:
    todo = [name for name in BENCHES if shutil.which(NEEDS.get(name, "python3"))]
    out: dict[str, tuple[int, str]] = {}
    while todo:
        wave, todo = todo[:PARALLEL], todo[PARALLEL:]
        procs = {name: _start(name) for name in wave}
        for name, proc in procs.items():
            try:
                text, _ = proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
                text, _ = proc.communicate()
            out[name] = (proc.returncode, text.decode(errors="replace"))
    return out


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_quick_mode_runs(bench: str, quick_runs: dict[str, tuple[int, str]]) -> None:
    if bench not in quick_runs:
        pytest.skip(f"{NEEDS[bench]} not installed")
    rc, text = quick_runs[bench]
    assert rc == 0, text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    # Every bench prints its figures through the harness: a figure with its rounds.
    assert "round" in text, text[-4000:]
