"""/metrics as Prometheus users expect it: promtool-clean, HELP/TYPE on every family, base units, no
timestamps, pod totals apart from per-device families, GPU series joinable with DCGM_*, histograms,
shortest-round-trip floats; and docs/metrics.md generated from the code."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.cli import _services
from agent.config import load_config
from agent.histogram import Histogram
from agent.publish.metrics_catalog import GPU_LABELS, reference_markdown
from agent.publish.prometheus import _scaled, fmt_value
from tests.agent_helpers import running_agent, until
from tests.conftest import ROOT, SimPod
from tests.conftest_mqtt import free_port
from tests.prom_helpers import get, parse

PROMTOOL = shutil.which("promtool")
# What promtool flags in dcgm-exporter's own output, which we reproduce on purpose so NVIDIA's
# dashboards and alerts work: its camelCase label (modelName) and its field names (counters without
# _total: TOTAL_ENERGY_CONSUMPTION, ECC, remapped rows; PCIE_REPLAY_COUNTER "includes a type").
DCGM_LINT = (
    "label names should be written in 'snake_case' not 'camelCase'",
    'should have "_total" suffix',
    "metric name should not include type 'counter'",
)


def lint_problems(text: str) -> list[str]:
    assert PROMTOOL is not None
    out = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    exposition = parse(text)
    left = []
    for line in problems:
        name = line.split(" ", 1)[0]
        labels = {k for s in exposition.samples if exposition.family_of(s.name) == name for k, _ in s.labels}
        camel = DCGM_LINT[0] in line and "modelName" in labels
        dcgm_counter = any(text in line for text in DCGM_LINT[1:]) and name.startswith("DCGM_FI_")
        if not (camel or dcgm_counter):
            left.append(line)
    return left


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
async def test_metrics_follow_prometheus_conventions(tiny_pod: SimPod, tmp_path: Path) -> None:
    port = free_port()
    config_path = tmp_path / "podagent.toml"
    config_path.write_text(
        tiny_pod.agent_config(tmp_path / "state", extra=f'[prometheus]\nlisten = "127.0.0.1:{port}"\n')
    )
    config = load_config(config_path)
    services = [s for s in (factory(config) for factory in _services()) if s is not None]
    async with running_agent(config_path, services=services) as agent:
        # Every device polled twice (slow NVML fields included) and the interlocks evaluated.
        await until(agent, lambda: all(h.polls >= 2 for h in agent.store.health().values()), timeout=30)
        await until(agent, lambda: agent.interlocks is not None and agent.interlocks.steps > 0, timeout=30)
        text = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
    assert lint_problems(text) == []
    exp = parse(text)  # fails on any sample with a timestamp
    families = {exp.family_of(s.name) for s in exp.samples}
    for fam in families:
        assert exp.helps.get(fam), f"{fam} has no HELP"
        assert exp.types.get(fam) in ("gauge", "counter", "histogram"), fam
        if exp.types[fam] == "counter" and not fam.startswith("DCGM_FI_"):
            assert fam.endswith("_total"), fam
    # Base units only, names that say what they measure.
    for bad in ("_kilowatts", "_kilopascals", "_megahertz", "_percent", "_watt_hours", "_millijoules"):
        assert not [f for f in families if f.endswith(bad) and f.startswith("podagent_")], bad
    for vague in ("podagent_mode", "podagent_tripped", "podagent_running", "podagent_faults", "podagent_up"):
        assert vague not in families
    assert len([f for f in families if "uptime" in f]) == 1
    # Pod totals in their own family: the PDUs that feed the pod add up to it, nothing else mixed in.
    pdu = exp.values("podagent_pdu_power_watts")
    pod = exp.values("podagent_pod_power_watts")
    assert list(pod) == [()]
    assert {dict(k)["device"] for k in pdu} == {"pdu-a", "pdu-b"}  # the branch meter has its own
    assert math.isclose(sum(pdu.values()), pod[()], rel_tol=1e-9)
    assert "podagent_branch_meter_power_watts" in families
    # GPU series carry dcgm-exporter's labels, the same set on DCGM_* and podagent_gpu_*.
    temp = {s.labels for s in exp.samples if s.name == "DCGM_FI_DEV_GPU_TEMP"}
    assert len(temp) == 8
    for labels in temp:
        d = dict(labels)
        assert tuple(k for k, _ in labels) == GPU_LABELS
        assert (
            d["device"] == f"nvidia{d['gpu']}"
            and d["UUID"].startswith("GPU-")
            and d["DCGM_FI_DRIVER_VERSION"]
        )
    assert {s.labels for s in exp.samples if s.name == "podagent_gpu_lost"} == temp
    assert exp.types["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == "counter"
    # Poll durations: a histogram per device, cumulative buckets ending in +Inf == _count.
    assert exp.types["podagent_poll_duration_seconds"] == "histogram"
    buckets = [
        (s.label_dict["le"], float(s.value))
        for s in exp.samples
        if s.name == "podagent_poll_duration_seconds_bucket" and s.label_dict["device"] == "pdu-a"
    ]
    counts = [c for _, c in buckets]
    assert counts == sorted(counts) and buckets[-1][0] == "+Inf"
    assert exp.values("podagent_poll_duration_seconds_count")[(("device", "pdu-a"),)] == counts[-1] >= 2
    assert exp.types["podagent_interlock_evaluation_duration_seconds"] == "histogram"
    # Values print shortest-round-trip.
    for s in exp.samples:
        if s.value not in ("+Inf", "-Inf", "NaN") and "." in s.value:
            assert repr(float(s.value)) == s.value, s


def test_values_print_shortest_round_trip() -> None:
    assert fmt_value(13.100000000000001) == "13.100000000000001"  # a distinct float stays distinct
    assert fmt_value(13.1) == "13.1" and fmt_value(5.0) == "5" and fmt_value(7) == "7"
    assert fmt_value(float("inf")) == "+Inf" and fmt_value(float("nan")) == "NaN"
    # Unit conversions do not print binary noise: 101.3 kPa, 20.5 L/min, 45.5 %, 1.5 kWh.
    assert fmt_value(_scaled(101.3, 1000.0)) == "101300"
    assert fmt_value(_scaled(45.5, 0.01)) == "0.455"
    assert fmt_value(_scaled(1.5, 3600.0)) == "5400"
    flow = fmt_value(_scaled(20.5, 1 / 60000))
    assert float(flow) == pytest.approx(20.5 / 60000, rel=1e-11) and len(flow) <= 17


def test_histogram_buckets_are_cumulative_with_le_semantics() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (math.inf, 4)]
    assert h.count == 4 and math.isclose(h.sum, 3.65)


def test_metrics_reference_is_current() -> None:
    doc = ROOT / "docs" / "metrics.md"
    assert doc.read_text() == reference_markdown(), (
        "docs/metrics.md is out of date: python -m agent.publish.metrics_catalog > docs/metrics.md"
    )
