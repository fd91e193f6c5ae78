"""Prometheus endpoint (``/metrics``) and health check (``/healthz``), served from the event loop.

GPU metrics use NVIDIA dcgm-exporter's names and labels (``DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID=...}``)
so existing Grafana dashboards work; everything else is ``podagent_*``. Every sample carries the
timestamp of its reading, so its age is visible; readings without a value (errors) are left out and
the device's ``podagent_device_up`` says why there is a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog

from agent.model import Quality
from agent.state import DeviceStatus

if TYPE_CHECKING:
    from agent.app import Agent

log = structlog.get_logger(__name__)

# (dcgm-exporter name, scale from our unit, help)
DCGM_METRICS: dict[str, tuple[str, float, str]] = {
    "temp_c": ("DCGM_FI_DEV_GPU_TEMP", 1.0, "GPU temperature (in C)."),
    "power_w": ("DCGM_FI_DEV_POWER_USAGE", 1.0, "Power draw (in W)."),
    "power_limit_w": ("DCGM_FI_DEV_POWER_MGMT_LIMIT", 1.0, "Power management limit (in W)."),
    "enforced_power_limit_w": ("DCGM_FI_DEV_ENFORCED_POWER_LIMIT", 1.0, "Enforced power limit (in W)."),
    "energy_mj": (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        1.0,
        "Total energy consumption since boot (in mJ).",
    ),
    "util_gpu_pct": ("DCGM_FI_DEV_GPU_UTIL", 1.0, "GPU utilization (in %)."),
    "util_mem_pct": ("DCGM_FI_DEV_MEM_COPY_UTIL", 1.0, "Memory utilization (in %)."),
    "mem_used_bytes": ("DCGM_FI_DEV_FB_USED", 1.0 / 2**20, "Framebuffer memory used (in MiB)."),
    "clock_sm_mhz": ("DCGM_FI_DEV_SM_CLOCK", 1.0, "SM clock frequency (in MHz)."),
    "clock_mem_mhz": ("DCGM_FI_DEV_MEM_CLOCK", 1.0, "Memory clock frequency (in MHz)."),
    "xid_last": ("DCGM_FI_DEV_XID_ERRORS", 1.0, "Value of the last XID error encountered."),
    "ecc_corrected_total": ("DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", 1.0, "Total single-bit persistent ECC errors."),
    "ecc_uncorrected_total": (
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        1.0,
        "Total double-bit persistent ECC errors.",
    ),
}

UNIT_SUFFIX = {
    "c": "celsius",
    "w": "watts",
    "kw": "kilowatts",
    "a": "amperes",
    "v": "volts",
    "va": "voltamperes",
    "wh": "watt_hours",
    "mj": "millijoules",
    "kpa": "kilopascals",
    "lpm": "liters_per_minute",
    "pct": "percent",
    "mhz": "megahertz",
    "s": "seconds",
    "bytes": "bytes",
}
_CHANNEL = re.compile(r"^(phase|outlet|inlet)(\d+)_(.+)$")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def prom_name(metric: str) -> tuple[str, list[tuple[str, str]]]:
    """outlet12_power_w -> ("podagent_outlet_power_watts", [("outlet", "12")])."""
    labels: list[tuple[str, str]] = []
    m = _CHANNEL.match(metric)
    if m:
        labels.append((m.group(1), m.group(2)))
        metric = f"{m.group(1)}_{m.group(3)}"
    base, _, suffix = metric.rpartition("_")
    if base and suffix in UNIT_SUFFIX:
        metric = f"{base}_{UNIT_SUFFIX[suffix]}"
    return "podagent_" + re.sub(r"[^a-zA-Z0-9_]", "_", metric), labels


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render_metrics(agent: Agent, now_wall: float | None = None) -> str:
    store = agent.store
    now = time.monotonic()
    families: dict[str, list[str]] = {}
    helps: dict[str, str] = {}

    def add(
        name: str, labels: list[tuple[str, str]], value: float, ts_wall: float | None = None, help_: str = ""
    ) -> None:
        line = f"{name}{_labels(labels)} {_fmt(value)}"
        if ts_wall is not None:
            line += f" {int(ts_wall * 1000)}"
        families.setdefault(name, []).append(line)
        if help_ and name not in helps:
            helps[name] = help_

    for (device, metric), r in list(store.readings().items()):
        if r.value is None or r.quality is not Quality.GOOD:
            continue
        parent = store.parent_of(device)
        if parent != device:  # a GPU (or other sub-device) of a driver
            info = store.info(device)
            index = device.lstrip("abcdefghijklmnopqrstuvwxyz_-") or device
            glabels = [
                ("gpu", index),
                ("UUID", info.get("uuid", "")),
                ("device", f"nvidia{index}"),
                ("modelName", info.get("name", "")),
                ("pci_bus_id", info.get("pci_bus_id", "")),
                ("Hostname", agent.config.pod.id),
            ]
            if metric in DCGM_METRICS:
                name, scale, help_ = DCGM_METRICS[metric]
                add(name, glabels, r.value * scale, r.ts_wall, help_)
            gname, extra = prom_name(metric)
            add(
                gname.replace("podagent_", "podagent_gpu_", 1),
                [("device", device), *extra],
                r.value,
                r.ts_wall,
            )
            continue
        name, extra = prom_name(metric)
        add(name, [("device", device), *extra], r.value, r.ts_wall)

    for device, h in store.health().items():
        status = h.current_status(now)
        add(
            "podagent_device_up",
            [("device", device)],
            1 if status is DeviceStatus.OK else 0,
            help_="1 when the device's last poll succeeded and its data is fresh.",
        )
        if h.last_ok_mono is not None:
            add(
                "podagent_device_data_age_seconds",
                [("device", device)],
                round(now - h.last_ok_mono, 3),
                help_="Seconds since the device last answered a poll.",
            )
        add("podagent_device_polls_total", [("device", device)], h.polls)
        add("podagent_device_poll_errors_total", [("device", device)], h.failures)
    for device, poller in agent.pollers.items():
        st = poller.stats
        for q in (0.5, 0.99):
            v = st.quantile(q)
            if v is not None:
                add(
                    "podagent_poll_duration_seconds",
                    [("device", device), ("quantile", str(q))],
                    round(v, 6),
                    help_="Duration of one poll cycle of the device.",
                )
        add("podagent_poll_missed_deadlines_total", [("device", device)], st.missed_deadlines)
        add("podagent_driver_restarts_total", [("device", device)], st.driver_restarts)
    add("podagent_up", [], 1, help_="The agent is running.")
    add("podagent_ready", [], 1 if agent.ready.is_set() else 0)
    add("podagent_agent_uptime_seconds", [], round(now - agent.started_mono, 1))
    for source in agent.metric_sources:
        for name, labels, value, help_ in source():
            add(name, labels, value, help_=help_)

    out: list[str] = []
    for name in sorted(families):
        if name in helps:
            out.append(f"# HELP {name} {helps[name]}")
        kind = "counter" if name.endswith("_total") else "gauge"
        if name in ("podagent_poll_duration_seconds", "podagent_interlock_step_seconds"):
            kind = "summary"
        out.append(f"# TYPE {name} {kind}")
        out.extend(families[name])
    return "\n".join(out) + "\n"


def health(agent: Agent) -> tuple[bool, dict[str, Any]]:
    now = time.monotonic()
    problems = {
        d: {
            "status": str(h.current_status(now)),
            "error": h.last_error,
            "age_s": None if h.last_ok_mono is None else round(now - h.last_ok_mono, 1),
        }
        for d, h in agent.store.health().items()
        if h.current_status(now) is not DeviceStatus.OK
    }
    ok = agent.ready.is_set() and not problems and agent.polling_healthy()
    return ok, {"status": "ok" if ok else "degraded", "ready": agent.ready.is_set(), "devices": problems}


class PrometheusExporter:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        host, _, port = agent.config.prometheus.listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.server: asyncio.Server | None = None

    async def run(self) -> None:
        try:
            self.server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as err:
            # The endpoint is optional: a port clash must not take the safety agent down.
            log.error(
                "prometheus endpoint not started", listen=self.agent.config.prometheus.listen, error=str(err)
            )
            return
        log.info("prometheus endpoint listening", listen=self.agent.config.prometheus.listen)
        async with self.server:
            await self.server.serve_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            if path.startswith("/metrics"):
                body = render_metrics(self.agent).encode()
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            elif path.startswith("/healthz"):
                ok, detail = health(self.agent)
                body = json.dumps(detail).encode()
                status, ctype = ("200 OK" if ok else "503 Service Unavailable"), "application/json"
            else:
                body, status, ctype = b"podagent: /metrics or /healthz\n", "404 Not Found", "text/plain"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
