"""Prometheus endpoint (``/metrics``) and health check (``/healthz``), served from the event loop.

Names, types, help and units come from ``metrics_catalog`` (GPUs as dcgm-exporter, the rest
``podagent_<role>_*`` in base units). Samples carry no timestamps, as dcgm-exporter's: Prometheus'
staleness handling then works, so a value that is not current is simply not exported. A reading
that is not GOOD (its device failed, or it is older than its staleness limit) is left out, and its
device's ``podagent_device_up`` (0) and ``podagent_device_data_age_seconds`` say why there is a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from agent import __version__
from agent.accept import AcceptLoop
from agent.config import HostDevice, ModbusDevice, NvmlDevice, SnmpDevice
from agent.drivers.node import NodeDriver
from agent.histogram import Histogram
from agent.model import Quality, Reading
from agent.publish.metrics_catalog import (
    GPU_LABELS,
    KNOWN,
    POD_POWER,
    DeviceMetric,
    Family,
    Kind,
    device_metric,
    gpu_metric,
)
from agent.state import POD_DEVICE, DeviceHealth, DeviceStatus

if TYPE_CHECKING:
    from agent.app import Agent

log = structlog.get_logger(__name__)
# Open /metrics and /healthz connections at once (a scraper or two and a curl are the use).
MAX_CONNECTIONS = 32

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def fmt_value(value: float) -> str:
    """Shortest text that reads back as the same float (repr), integers without ``.0``."""
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _scaled(value: float, scale: float) -> float:
    if scale == 1.0:
        return value
    # 101.3 kPa * 1000 is 101299.99999999999 in binary: 12 significant digits are more than any
    # sensor has and drop the conversion's rounding noise.
    return float(f"{value * scale:.12g}")


def device_role(cfg: Any) -> str:
    """What a configured device is, for its family names (pdu, cdu, chiller, battery, meter...)."""
    if isinstance(cfg, SnmpDevice):
        return "pdu"
    if isinstance(cfg, ModbusDevice):
        from agent.drivers.modbus import load_profile

        try:
            kind = load_profile(cfg.profile).kind or "device"
        except ValueError:
            return "device"
        return "branch_meter" if kind == "pdu" and not cfg.pod_power else kind
    if isinstance(cfg, HostDevice):
        return "host"
    if isinstance(cfg, NvmlDevice):
        return "gpu"
    return str(getattr(cfg, "kind", "device"))


class _Families:
    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {}
        self.meta: dict[str, Family] = {}

    def family(self, fam: Family) -> list[str]:
        lines = self.lines.get(fam.name)
        if lines is None:
            lines = self.lines[fam.name] = []
            self.meta[fam.name] = fam
        return lines

    def add(self, fam: Family, labels: Iterable[tuple[str, str]], value: float) -> None:
        self.family(fam).append(f"{fam.name}{_labels(labels)} {fmt_value(value)}")

    def histogram(self, fam: Family, labels: Labels, hist: Histogram) -> None:
        lines = self.family(fam)
        for bound, count in hist.cumulative():
            le = "+Inf" if math.isinf(bound) else fmt_value(bound)
            lines.append(f"{fam.name}_bucket{_labels((*labels, ('le', le)))} {count}")
        lines.append(f"{fam.name}_sum{_labels(labels)} {fmt_value(hist.sum)}")
        lines.append(f"{fam.name}_count{_labels(labels)} {hist.count}")

    def text(self) -> str:
        out: list[str] = []
        for name in sorted(self.lines):
            fam = self.meta[name]
            help_ = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {fam.kind}")
            out.extend(self.lines[name])
        return "\n".join(out) + "\n"


def _source_family(name: str, help_: str, labels: list[tuple[str, str]]) -> tuple[Family, str]:
    """A service's sample name -> (its family, the sample's suffix: "", _bucket, _sum, _count)."""
    fam = KNOWN.get(name)
    if fam is not None:
        return fam, ""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in KNOWN and KNOWN[base].kind == "histogram":
            return KNOWN[base], suffix
    kind: Kind = "counter" if name.endswith("_total") else "gauge"
    return Family(name, kind, help_ or name, tuple(k for k, _ in labels)), ""


class MetricsRenderer:
    """Renders /metrics for one agent; caches what does not change between scrapes (roles, label
    strings), so a full pod's scrape costs string joins, not name derivations."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._config: Any = None
        self._roles: dict[str, str] = {}
        self._gpu_labels: dict[str, tuple[dict[str, str], Labels]] = {}
        self._prefix: dict[tuple[str, str, Labels], tuple[DeviceMetric, str]] = {}
        self.hostname = socket.gethostname()

    def _refresh_config(self) -> None:
        config = self.agent.config
        if config is self._config:
            return
        self._config = config
        self._roles = {d.id: device_role(d) for d in config.device}
        self._prefix.clear()

    def gpu_labels(self, device: str) -> Labels:
        store = self.agent.store
        info = dict(store.info(device))
        cached = self._gpu_labels.get(device)
        if cached is not None and cached[0] == info:
            return cached[1]
        index = info.get("index") or (device[len(device.rstrip("0123456789")) :] or device)
        labels: Labels = (
            ("gpu", index),
            ("UUID", info.get("uuid", "")),
            ("pci_bus_id", info.get("pci_bus_id", "")),
            ("device", f"nvidia{index}"),
            ("modelName", info.get("name", "")),
            ("Hostname", info.get("hostname") or self.hostname),
            ("DCGM_FI_DRIVER_VERSION", info.get("driver_version", "")),
        )
        assert tuple(k for k, _ in labels) == GPU_LABELS
        self._gpu_labels[device] = (info, labels)
        return labels

    def _line_prefix(
        self, device: str, metric: str, dev_labels: Labels, gpu: bool
    ) -> tuple[DeviceMetric, str]:
        key = (device, metric, dev_labels)
        hit = self._prefix.get(key)
        if hit is not None:
            return hit
        if gpu:
            dm = gpu_metric(metric)
        elif device == POD_DEVICE and metric == "power_w":
            dm = DeviceMetric(POD_POWER)
        else:
            dm = device_metric(self._roles.get(device, "device"), metric)
        labels = dev_labels + ((dm.channel,) if dm.channel else ())
        hit = (dm, f"{dm.family.name}{_labels(labels)} ")
        self._prefix[key] = hit
        return hit

    def render(self) -> str:
        return self.finish(*self.snapshot())

    def snapshot(self) -> tuple[_Families, list[tuple[tuple[str, str], Reading]], float]:
        """On the event loop: the small families (health, pollers, services, MQTT) and a copy of the
        latest readings, so nothing changes under ``finish``."""
        self._refresh_config()
        now = time.monotonic()
        fams = _Families()
        self._agent_families(fams, now)
        self._source_families(fams)
        return fams, list(self.agent.store.readings().items()), now

    def finish(self, fams: _Families, items: list[tuple[tuple[str, str], Reading]], now: float) -> str:
        """The readings' lines and the text: the costly part (~190 ms of CPU at the full pod's
        26,000 readings), so the exporter runs it in a worker thread, off the event loop; it only
        reads the store with single lookups."""
        store = self.agent.store
        roles = self._roles
        per_device: dict[str, tuple[Labels, bool]] = {}
        for (device, metric), r in items:
            if r.value is None or store.effective_quality(r, now) is not Quality.GOOD:
                continue
            dev = per_device.get(device)
            if dev is None:
                parent = store.parent_of(device)
                # A GPU of this host's NVML driver, or of a GPU server's node agent (issue 12).
                gpu = parent != device and (
                    roles.get(parent) in ("gpu", "node") or "uuid" in store.info(device)
                )
                if gpu:
                    dev = (self.gpu_labels(device), True)
                elif device == POD_DEVICE and device not in roles:
                    dev = ((), False)
                else:
                    dev = ((("device", device),), False)
                per_device[device] = dev
            dm, prefix = self._line_prefix(device, metric, dev[0], dev[1])
            value = r.value
            if not math.isfinite(value):
                continue
            if not dm.transform:
                value = _scaled(value, dm.scale)
            elif dm.transform == "floor":
                value = math.floor(value * dm.scale)
            else:  # boot_time
                value = round(r.ts_wall - value)
            fams.family(dm.family).append(prefix + fmt_value(value))
        return fams.text()

    def _agent_families(self, fams: _Families, now: float) -> None:
        agent = self.agent
        store = agent.store
        fams.add(KNOWN["podagent_build_info"], (("version", __version__),), 1)
        fams.add(KNOWN["podagent_ready"], (), 1 if agent.ready.is_set() else 0)
        fams.add(KNOWN["podagent_uptime_seconds"], (), round(now - agent.started_mono, 3))
        for cfg in agent.config.device:
            labels = (
                ("device", cfg.id),
                ("role", self._roles.get(cfg.id, "device")),
                ("driver", str(cfg.kind)),
                ("profile", str(getattr(cfg, "profile", "") or "")),
            )
            fams.add(KNOWN["podagent_device_info"], labels, 1)
        health = store.health()
        for device, h in health.items():
            dl = (("device", device),)
            fams.add(KNOWN["podagent_device_up"], dl, 1 if h.current_status(now) is DeviceStatus.OK else 0)
            if h.last_ok_mono is not None:
                fams.add(KNOWN["podagent_device_data_age_seconds"], dl, round(now - h.last_ok_mono, 3))
            fams.add(KNOWN["podagent_device_polls_total"], dl, h.polls)
            fams.add(KNOWN["podagent_device_poll_errors_total"], dl, h.failures)
        for device, poller in agent.pollers.items():
            dl = (("device", device),)
            st = poller.stats
            fams.histogram(KNOWN["podagent_poll_duration_seconds"], dl, st.histogram)
            fams.add(KNOWN["podagent_poll_missed_deadlines_total"], dl, st.missed_deadlines)
            fams.add(KNOWN["podagent_driver_restarts_total"], dl, st.driver_restarts)
            if isinstance(poller.driver, NodeDriver):
                self._node_families(fams, device, poller.driver, health.get(device), now)
        self._mqtt_families(fams)

    @staticmethod
    def _node_families(
        fams: _Families, node: str, driver: NodeDriver, h: DeviceHealth | None, now: float
    ) -> None:
        """A GPU server's node agent as the controller sees it (its own counters come as readings)."""
        up = h is not None and h.current_status(now) is DeviceStatus.OK
        nl = (("node", node), ("Hostname", driver.hostname or ""))
        fams.add(KNOWN["podagent_node_up"], nl, 1 if up else 0)
        if driver.last_ack_mono is not None:
            fams.add(KNOWN["podagent_node_lease_age_seconds"], nl, round(now - driver.last_ack_mono, 3))

    def _mqtt_families(self, fams: _Families) -> None:
        provider = self.agent.status_providers.get("mqtt")
        if provider is None:
            return
        try:
            link: Mapping[str, Any] = provider()
        except Exception:  # a status bug must not break the scrape
            log.exception("mqtt status provider failed")
            return

        def num(key: str) -> float:
            value = link.get(key)
            return float(value) if isinstance(value, int | float) else 0.0

        broker = str(link.get("broker") or "")
        fams.add(KNOWN["podagent_mqtt_connected"], (("broker", broker),), link.get("link") == "connected")
        fams.add(KNOWN["podagent_mqtt_connects_total"], (), num("connects"))
        fams.add(KNOWN["podagent_mqtt_published_messages_total"], (), num("published"))
        fams.add(KNOWN["podagent_mqtt_spool_messages"], (), num("spool_depth"))
        fams.add(KNOWN["podagent_mqtt_spool_bytes"], (), num("spool_bytes"))
        capacity = getattr(getattr(self.agent.config, "mqtt", None), "spool_max_bytes", None)
        if isinstance(capacity, int | float):
            fams.add(KNOWN["podagent_mqtt_spool_capacity_bytes"], (), capacity)
        fams.add(KNOWN["podagent_mqtt_spool_dropped_messages_total"], (), num("dropped_telemetry"))
        fams.add(KNOWN["podagent_mqtt_commands_total"], (("result", "accepted"),), num("commands_accepted"))
        fams.add(KNOWN["podagent_mqtt_commands_total"], (("result", "refused"),), num("commands_refused"))

    def _source_families(self, fams: _Families) -> None:
        for source in self.agent.metric_sources:
            try:
                samples = source()
            except Exception:  # a service bug must not break the scrape
                log.exception("metric source failed", source=getattr(source, "__qualname__", repr(source)))
                continue
            for name, labels, value, help_ in samples:
                fam, suffix = _source_family(name, help_, labels)
                pairs: tuple[tuple[str, str], ...] = tuple(labels)
                if fam.labels[: len(GPU_LABELS)] == GPU_LABELS:
                    # A GPU's own series carry dcgm-exporter's labels, to join DCGM_* on them.
                    device = dict(pairs).get("device", "")
                    rest = tuple((k, v) for k, v in pairs if k != "device")
                    pairs = self.gpu_labels(device) + rest
                fams.family(fam).append(f"{fam.name}{suffix}{_labels(pairs)} {fmt_value(float(value))}")


def render_metrics(agent: Agent) -> str:
    return MetricsRenderer(agent).render()


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


def _listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on host:port ("" or "0.0.0.0": every IPv4 address,
    "::": every address)."""
    family, _, _, _, addr = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.create_server(addr[:2], family=family, backlog=128)
    listener.setblocking(False)
    return listener


class PrometheusExporter:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        host, _, port = agent.config.prometheus.listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.renderer = MetricsRenderer(agent)
        self._accept = AcceptLoop("prometheus endpoint")
        self._conns: set[socket.socket] = set()
        self.rejected_connections = 0

    async def run(self) -> None:
        try:
            listener = _listen(self.host, self.port)
        except OSError as err:
            # The endpoint is optional: a port clash must not take the safety agent down.
            log.error(
                "prometheus endpoint not started", listen=self.agent.config.prometheus.listen, error=str(err)
            )
            return
        self.agent.metric_sources.append(self.metrics)
        log.info("prometheus endpoint listening", listen=self.agent.config.prometheus.listen)
        try:
            async with asyncio.TaskGroup() as tg:
                await self._accept.run(listener, lambda conn: self._admit(conn, tg))
        finally:
            listener.close()
            with contextlib.suppress(ValueError):
                self.agent.metric_sources.remove(self.metrics)

    def _admit(self, conn: socket.socket, tg: asyncio.TaskGroup) -> None:
        # A scraper or two, a curl: a flood past the cap is closed at once, before any buffer.
        if len(self._conns) >= MAX_CONNECTIONS:
            self.rejected_connections += 1
            conn.close()
            return
        self._conns.add(conn)
        tg.create_task(self._connection(conn), name="prometheus-client")

    async def _connection(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=conn)
        except OSError:
            self._conns.discard(conn)
            conn.close()
            return
        try:
            await self._serve(reader, writer)
        finally:
            self._conns.discard(conn)

    def metrics(self) -> list[tuple[str, list[tuple[str, str]], float, str]]:
        return [
            ("podagent_prometheus_connections", [], len(self._conns), "Open /metrics connections."),
            ("podagent_prometheus_rejected_connections_total", [], self.rejected_connections,
             f"Connections closed at once: over the cap of {MAX_CONNECTIONS} open ones."),
            ("podagent_prometheus_accept_failures_total", [], self._accept.failures,
             "accept() failures for lack of file descriptors or memory."),
        ]  # fmt: skip

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else "/"
            if path.startswith("/metrics"):
                # Snapshot on the loop, format in a thread: a full pod's scrape must not hold
                # polling and the interlocks for the ~0.2 s it takes.
                try:
                    snapshot = self.renderer.snapshot()
                    body = (await asyncio.to_thread(self.renderer.finish, *snapshot)).encode()
                    status, ctype = "200 OK", CONTENT_TYPE
                except Exception:  # a rendering bug answers 500; the agent goes on
                    log.exception("rendering /metrics failed")
                    body, status, ctype = (
                        b"podagent: /metrics failed\n",
                        "500 Internal Server Error",
                        "text/plain",
                    )
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
