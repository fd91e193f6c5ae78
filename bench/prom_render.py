"""What one /metrics scrape costs at the full pod: podagent's writer vs prometheus-client's.

The store holds what the full pod's agent holds (576 GPUs' NVML readings, 32 metered PDUs, 2 CDUs,
2 chillers, a host); each writer renders it N times. prometheus-client is timed the way it would
serve us: a custom Collector yielding its *MetricFamily objects from the same catalog, rendered by
``generate_latest``. CPU time of this process (``time.process_time``), N rounds: median and range.

Usage: .venv/bin/python bench/prom_render.py [--rounds 3] [--scrapes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from agent.app import Agent
from agent.config import AgentConfig
from agent.model import Reading
from agent.publish.metrics_catalog import DeviceMetric, device_metric, gpu_metric
from agent.publish.prometheus import MetricsRenderer, _scaled

GPU_METRICS = [
    "temp_c",
    "power_w",
    "power_limit_w",
    "enforced_power_limit_w",
    "default_power_limit_w",
    "min_power_limit_w",
    "max_power_limit_w",
    "energy_mj",
    "util_gpu_pct",
    "util_mem_pct",
    "util_enc_pct",
    "util_dec_pct",
    "mem_used_bytes",
    "mem_total_bytes",
    "mem_free_bytes",
    "mem_reserved_bytes",
    "clock_sm_mhz",
    "clock_mem_mhz",
    "temp_slowdown_c",
    "temp_shutdown_c",
    "temp_max_operating_c",
    "mem_temp_c",
    "pcie_replay_total",
    "throttle_gpu_idle",
    "throttle_sw_power_cap",
    "throttle_hw_slowdown",
    "throttle_sw_thermal",
    "throttle_hw_thermal",
    "throttle_hw_power_brake",
    "ecc_corrected_total",
    "ecc_uncorrected_total",
    "remapped_rows_correctable_total",
    "remapped_rows_uncorrectable_total",
    "row_remap_pending",
    "row_remap_failure",
    "lost",
    "nvml_errors_total",
    "xid_total",
    "xid_last",
]
PDU_METRICS = ["power_w", "energy_wh", "apparent_power_va"] + [
    f"{ch}{n}_{q}"
    for ch, count, qs in (
        ("phase", 3, ("current_a", "voltage_v", "power_w", "peak_current_a")),
        ("outlet", 24, ("current_a", "power_w", "energy_wh", "on")),
    )
    for n in range(1, count + 1)
    for q in qs
]
CDU_METRICS = [
    "supply_temp_c",
    "return_temp_c",
    "flow_lpm",
    "supply_pressure_kpa",
    "heat_removed_kw",
    "pump_running",
]


def full_pod_agent() -> Agent:
    devices: list[dict[str, Any]] = [
        {"id": "gpus", "kind": "nvml", "library": "hwsim", "hwsim_state": "/nonexistent"},
        {"id": "controller", "kind": "host"},
    ]
    devices += [
        {"id": f"pdu-{i}", "kind": "snmp", "profile": "apc-rpdu2", "host": "127.0.0.1", "community": "x"}
        for i in range(32)
    ]
    devices += [
        {"id": f"cdu-{i}", "kind": "modbus", "profile": "generic-cdu", "host": "127.0.0.1"} for i in range(2)
    ]
    devices += [
        {"id": f"chiller-{i}", "kind": "modbus", "profile": "generic-chiller", "host": "127.0.0.1"}
        for i in range(2)
    ]
    config = AgentConfig.model_validate({"pod": {"site": "bench", "id": "full"}, "device": devices})
    agent = Agent(config)
    store = agent.store
    now_m, now_w = time.monotonic(), time.time()
    readings: list[Reading] = []
    for cfg in config.device:
        store.register_device(cfg.id, stale_after_s=1e9)
        store.record_poll(cfg.id, ok=True)
    for g in range(576):
        dev = f"gpu{g}"
        store.set_parent(dev, "gpus")
        store.set_info(
            dev,
            {
                "index": str(g % 4),
                "uuid": f"GPU-{g:08x}-0000-0000-0000-000000000000",
                "name": "NVIDIA GB200",
                "pci_bus_id": f"00000000:{g % 256:02X}:00.0",
                "driver_version": "570.133.20",
                "hostname": f"tray-{g // 4}",
            },
        )
        readings += [Reading(dev, m, 1.0 + g * 0.37, "", now_m, now_w) for m in GPU_METRICS]
    for i in range(32):
        readings += [Reading(f"pdu-{i}", m, 12.3 + i, "", now_m, now_w) for m in PDU_METRICS]
    for i in range(2):
        readings += [Reading(f"cdu-{i}", m, 31.4, "", now_m, now_w) for m in CDU_METRICS]
    store.update(readings)
    return agent


class ClientCollector:
    """The same samples as podagent's device families, as prometheus-client objects."""

    def __init__(self, agent: Agent, renderer: MetricsRenderer) -> None:
        self.agent = agent
        self.renderer = renderer

    def collect(self) -> Iterator[Metric]:
        store = self.agent.store
        fams: dict[str, Metric] = {}
        roles = self.renderer._roles
        for (device, metric), r in list(store.readings().items()):
            if r.value is None:
                continue
            parent = store.parent_of(device)
            dm: DeviceMetric
            if parent != device:
                labels = dict(self.renderer.gpu_labels(device))
                dm = gpu_metric(metric)
            else:
                labels = {"device": device}
                dm = device_metric(roles.get(device, "device"), metric)
            if dm.channel:
                labels[dm.channel[0]] = dm.channel[1]
            fam = fams.get(dm.family.name)
            if fam is None:
                cls = CounterMetricFamily if dm.family.kind == "counter" else GaugeMetricFamily
                fam = fams[dm.family.name] = cls(dm.family.name, dm.family.help, labels=list(labels))
            fam.add_metric(list(labels.values()), _scaled(r.value, dm.scale))
        hist = HistogramMetricFamily("podagent_poll_duration_seconds", "poll", labels=["device"])
        for device, poller in self.agent.pollers.items():
            h = poller.stats.histogram
            hist.add_metric([device], [(str(b), c) for b, c in h.cumulative()], h.sum)
        fams[hist.name] = hist
        yield from fams.values()


def old_writer() -> Any:
    """Today's writer as committed before this change (git show), if the bench runs in the repo."""
    import subprocess
    import types

    src = subprocess.run(
        ["git", "show", "b3c03e7:agent/publish/prometheus.py"], capture_output=True, text=True, check=False
    ).stdout
    if not src:
        return None
    mod = types.ModuleType("old_prometheus")
    exec(compile(src, "old_prometheus.py", "exec"), mod.__dict__)
    return mod.render_metrics


def cpu_per_scrape(fn: Any, scrapes: int) -> tuple[float, int]:
    fn()  # warm caches
    t0 = time.process_time()
    for _ in range(scrapes):
        body = fn()
    return (time.process_time() - t0) / scrapes * 1000, len(body)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scrapes", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="smoke: one round of one scrape")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.scrapes = 1, 1
    agent = full_pod_agent()
    renderer = MetricsRenderer(agent)
    renderer.render()
    registry = CollectorRegistry()
    registry.register(ClientCollector(agent, renderer))  # type: ignore[arg-type]
    old = old_writer()
    writers: dict[str, Any] = {
        "podagent writer (new)": renderer.render,
        "prometheus-client generate_latest": lambda: generate_latest(registry),
    }
    if old is not None:
        writers["podagent writer (before, b3c03e7)"] = lambda: old(agent)
    print(f"readings in store: {len(agent.store.readings())}")
    for name, fn in writers.items():
        runs = [cpu_per_scrape(fn, args.scrapes) for _ in range(args.rounds)]
        ms = [r[0] for r in runs]
        print(
            f"{name:38s} CPU ms/scrape median {statistics.median(ms):7.1f} "
            f"range {min(ms):.1f}-{max(ms):.1f}  body {runs[0][1] / 1e6:.2f} MB"
        )


if __name__ == "__main__":
    asyncio.run(main())
