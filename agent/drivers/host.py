"""Host driver: the controller's own health through psutil (CPU, load, memory, disks, temperature).

Cheap by design: ``cpu_percent(interval=None)`` compares with the previous call (psutil keeps the
state) instead of sleeping for an interval; the first call, made in ``open()``, only primes it.
The reads touch /proc and /sys (a sensor read can take milliseconds on some boards), so the batch
runs in a thread, one hop per poll.
"""

from __future__ import annotations

import asyncio
import os
import re
import time

import psutil
import structlog

from agent.config import HostDevice
from agent.drivers.base import DeviceUnavailable, register
from agent.model import Quality, Reading, unit_of

log = structlog.get_logger(__name__)


def disk_metric(path: str) -> str:
    """``/`` -> ``disk_used_pct``; ``/var/lib`` -> ``disk_var_lib_used_pct``."""
    name = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_")
    return f"disk_{name}_used_pct" if name else "disk_used_pct"


@register("host")
class HostDriver:
    def __init__(self, cfg: HostDevice) -> None:
        self.cfg = cfg
        self.device_id = cfg.id
        self._opened = False
        self._disk_errors: set[str] = set()  # paths whose failure was logged (log changes only)

    async def open(self) -> None:
        psutil.cpu_percent(interval=None)  # prime: the first value is meaningless by psutil's design
        self._opened = True

    async def close(self) -> None:
        self._opened = False

    async def poll(self) -> list[Reading]:
        if not self._opened:
            raise DeviceUnavailable(self.device_id, "not open")
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                return await asyncio.to_thread(self._poll_sync)
        except TimeoutError:
            raise DeviceUnavailable(
                self.device_id, f"host metrics took over {self.cfg.timeout_s} s"
            ) from None
        except OSError as err:
            # /proc unreadable: out of descriptors (EMFILE), a locked-down container. The host is
            # unavailable for this poll, not a driver bug.
            raise DeviceUnavailable(self.device_id, f"host metrics: {err}") from None

    def _poll_sync(self) -> list[Reading]:
        ts_mono, ts_wall = time.monotonic(), time.time()
        dev = self.device_id
        out: list[Reading] = []

        def put(metric: str, value: float | None, error: str | None = None) -> None:
            quality = Quality.GOOD if value is not None else Quality.ERROR
            out.append(Reading(dev, metric, value, unit_of(metric), ts_mono, ts_wall, quality, error))

        put("cpu_pct", float(psutil.cpu_percent(interval=None)))
        put("load1", float(os.getloadavg()[0]))
        mem = psutil.virtual_memory()
        put("mem_used_pct", float(mem.percent))
        put("mem_available_bytes", float(mem.available))
        for path in self.cfg.disk_paths:
            metric = disk_metric(path)
            try:
                put(metric, float(psutil.disk_usage(path).percent))
            except OSError as err:
                put(metric, None, f"disk_usage({path}): {err.strerror or err}")
                if path not in self._disk_errors:
                    log.warning("disk usage unreadable", device=dev, path=path, error=str(err))
                    self._disk_errors.add(path)
            else:
                self._disk_errors.discard(path)
        put("temp_c", *self._hottest())
        put("uptime_s", max(0.0, time.time() - psutil.boot_time()))
        return out

    @staticmethod
    def _hottest() -> tuple[float | None, str | None]:
        """The hottest temperature sensor, or None with why (VMs and containers often have none)."""
        reader = getattr(psutil, "sensors_temperatures", None)
        if reader is None:
            return None, "no temperature sensors on this platform"
        try:
            sensors = reader()
        except OSError as err:
            return None, f"sensors unreadable: {err}"
        temps = [t.current for entries in sensors.values() for t in entries if t.current is not None]
        if not temps:
            return None, "no temperature sensors"
        return float(max(temps)), None
