"""The one type that flows: a driver yields Readings, the StateStore keeps the latest of each.

Metric names carry their unit as a suffix (``_c``, ``_w``, ``_a``, ``_lpm``, ``_kpa``, ``_pct``,
``_wh``, ``_mj``, ``_mhz``, ``_bytes``) and, for per-channel values, the channel in the name:
``phase1_current_a``, ``outlet12_power_w``. GPU readings use one device id per GPU (``gpu0``...).
Missing data is ``value=None`` with a non-good quality, never 0.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple


class Quality(StrEnum):
    GOOD = "good"
    STALE = "stale"  # the value is older than its device's staleness limit
    ERROR = "error"  # the device answered with an error, or did not answer


class _ReadingFields(NamedTuple):
    device: str
    metric: str
    value: float | None
    unit: str
    ts_mono: float
    ts_wall: float
    quality: Quality
    # Why a value is missing or bad ("timeout", "NVML_ERROR_GPU_IS_LOST", "modbus exception 6"...).
    error: str | None


class Reading(_ReadingFields):
    """One value of one metric of one device, immutable.

    A NamedTuple rather than a frozen dataclass: the agent builds ~20,000 of these a second on a
    full pod, and a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) costs
    4x as much. Timestamps default to now."""

    __slots__ = ()

    def __new__(
        cls,
        device: str,
        metric: str,
        value: float | None,
        unit: str = "",
        ts_mono: float | None = None,
        ts_wall: float | None = None,
        quality: Quality = Quality.GOOD,
        error: str | None = None,
    ) -> Reading:
        return tuple.__new__(
            cls,
            (
                device,
                metric,
                value,
                unit,
                time.monotonic() if ts_mono is None else ts_mono,
                time.time() if ts_wall is None else ts_wall,
                quality,
                error,
            ),
        )

    @property
    def key(self) -> tuple[str, str]:
        return (self.device, self.metric)

    def age_s(self, now_mono: float | None = None) -> float:
        return (time.monotonic() if now_mono is None else now_mono) - self.ts_mono


@functools.lru_cache(maxsize=4096)
def unit_of(metric: str) -> str:
    """The unit a metric name declares by its suffix (``supply_temp_c`` -> ``C``)."""
    suffix = metric.rsplit("_", 1)[-1]
    return _UNITS.get(suffix, "")


_UNITS = {
    "c": "C",
    "w": "W",
    "kw": "kW",
    "a": "A",
    "v": "V",
    "wh": "Wh",
    "kwh": "kWh",
    "mj": "mJ",
    "j": "J",
    "lpm": "L/min",
    "kpa": "kPa",
    "pct": "%",
    "mhz": "MHz",
    "bytes": "B",
    "s": "s",
    "hz": "Hz",
}


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """Something a device reported that is not a sample: an XID error, an alarm edge."""

    device: str
    kind: str  # "xid", "alarm", ...
    detail: dict[str, object]
    ts_wall: float = field(default_factory=time.time)
