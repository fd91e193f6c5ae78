"""StateStore: the latest Reading per (device, metric), its age, device health, and subscribers.

Drivers' readings flow in through ``update``; interlocks, publishers and the control socket read.
Subscribers get each batch as it lands (no copy of the world), synchronously: a subscriber must be
cheap (set an event, append to a queue) and must not raise.
"""

from __future__ import annotations

import math
import operator
import time
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import compress, repeat
from types import MappingProxyType

import structlog

from agent.model import Quality, Reading

log = structlog.get_logger(__name__)
_device_of, _metric_of = operator.itemgetter(0), operator.itemgetter(1)  # Reading.device, .metric
_key_of = operator.itemgetter(0, 1)  # Reading.key: (device, metric)

Subscriber = Callable[[Sequence[Reading]], None]
POD_DEVICE = "pod"
# A loop's GPU heat load sums every GPU on the loop: with node agents, each node's batch would
# re-sum the whole loop (quadratic in nodes: 144 batches x 576 GPUs a second on the full pod).
# At most this often per loop (the sum is a display value: Prometheus, podctl; no rule reads it).
LOOP_SUM_MIN_S = 0.25


class DeviceStatus(StrEnum):
    UNKNOWN = "unknown"  # not polled yet
    OK = "ok"
    ERROR = "error"  # the last poll failed
    STALE = "stale"  # no fresh data for longer than its staleness limit


@dataclass
class DeviceHealth:
    device: str
    stale_after_s: float
    status: DeviceStatus = DeviceStatus.UNKNOWN
    last_ok_mono: float | None = None
    last_poll_mono: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    polls: int = 0
    failures: int = 0

    def current_status(self, now: float) -> DeviceStatus:
        stale = self.last_ok_mono is not None and now - self.last_ok_mono > self.stale_after_s
        if self.status is DeviceStatus.OK and stale:
            return DeviceStatus.STALE
        return self.status


class StateStore:
    def __init__(self) -> None:
        self._latest: dict[tuple[str, str], Reading] = {}
        self._by_device: dict[str, dict[str, Reading]] = {}
        self._health: dict[str, DeviceHealth] = {}
        self._stale_after: dict[str, float] = {}
        self._subscribers: list[Subscriber] = []
        # Derived values: which devices' power_w adds up to the pod's, which GPUs each loop cools.
        self._pod_power_devices: set[str] = set()
        # The pod's power inputs, compact (a PDU poll sums them: 24 Readings scattered over the
        # heap cost more than the sum, the process waking up cold every ~40 ms): per device, in
        # the set's order, its last GOOD power_w, when it was read and its staleness limit; NaN
        # where the exact rule (_sum_power) must decide (no value, not GOOD, no limit known).
        self._pod_slot: dict[str, int] = {}
        self._pod_w = array("d")
        self._pod_ts = array("d")
        self._pod_limit = array("d")
        self._loop_gpus: dict[str, list[str]] = {}
        self._loop_gpu_sets: dict[str, frozenset[str]] = {}  # for the disjoint test, in C
        self._loop_sum_at: dict[str, float] = {}
        self._info: dict[str, dict[str, str]] = {}
        self._slow: dict[tuple[str, str], int] = {}
        self._parent: dict[str, str] = {}  # sub-device (gpu3) -> configured device ("gpus")

    # ------------------------------------------------------------------ setup
    def register_device(self, device: str, *, stale_after_s: float) -> None:
        self._stale_after[device] = stale_after_s
        self._pod_forget(device)
        health = self._health.get(device)
        if health is None:
            self._health[device] = DeviceHealth(device=device, stale_after_s=stale_after_s)
        else:
            health.stale_after_s = stale_after_s

    def set_derivations(
        self, *, pod_power_devices: Iterable[str], loop_gpus: Mapping[str, list[str]]
    ) -> None:
        self._pod_power_devices = set(pod_power_devices)
        self._pod_slot = {d: i for i, d in enumerate(self._pod_power_devices)}
        nan = [math.nan] * len(self._pod_slot)
        self._pod_w, self._pod_ts, self._pod_limit = array("d", nan), array("d", nan), array("d", nan)
        self._loop_gpus = {k: list(v) for k, v in loop_gpus.items()}
        self._loop_gpu_sets = {k: frozenset(v) for k, v in loop_gpus.items()}

    def _pod_forget(self, device: str) -> None:
        """The device's compact pod-power entry no longer holds (its limit or cadence changed):
        the exact rule decides until its next power_w."""
        slot = self._pod_slot.get(device)
        if slot is not None:
            self._pod_w[slot] = math.nan

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # ------------------------------------------------------------------ writes
    def update(self, readings: Sequence[Reading]) -> None:
        if not readings:
            return
        latest = self._latest
        by_device = self._by_device
        first = readings[0].device
        if len(set(map(_device_of, readings))) == 1:
            # One device's batch (a PDU, a CDU: most of them), stored in C (itemgetter, zip,
            # dict.update): this runs for every reading of every poll.
            latest.update(zip(map(_key_of, readings), readings, strict=True))
            dev = by_device.get(first)
            if dev is None:
                dev = by_device[first] = {}
            dev.update(zip(map(_metric_of, readings), readings, strict=True))
            devices = {first}
            powered = devices if "power_w" in map(_metric_of, readings) else set()
        else:
            # Sub-devices (a node's or NVML's GPUs, ~50 readings a node): one pass noting the
            # batch's devices and those with a power_w reading (what _derive needs) on the way. A
            # batch comes grouped by device, so a device's dict is looked up once per run of its
            # readings.
            devices, powered = set(), set()
            device: str | None = None
            dev = {}
            for r in readings:
                metric = r.metric
                if r.device != device:
                    device = r.device
                    devices.add(device)
                    got = by_device.get(device)
                    if got is None:
                        got = by_device[device] = {}
                    dev = got
                latest[(device, metric)] = r  # not r.key: a property call per reading
                dev[metric] = r
                if metric == "power_w":
                    powered.add(device)
        derived = self._derive(readings, devices, powered) if powered else []
        batch = [*readings, *derived] if derived else readings
        for r in derived:
            latest[r.key] = r
            by_device.setdefault(r.device, {})[r.metric] = r
        for sub in tuple(self._subscribers):
            try:
                sub(batch)
            except Exception:  # a subscriber bug must not stop the data flowing
                log.exception("state subscriber failed", subscriber=getattr(sub, "__qualname__", repr(sub)))

    def _derive(self, readings: Sequence[Reading], devices: set[str], gpu_devices: set[str]) -> list[Reading]:
        """The pod's power and the loops' GPU heat load, for a batch with power readings
        (``gpu_devices``: the devices with power_w; ``devices``: every device in the batch)."""
        out: list[Reading] = []
        now_m, now_w = time.monotonic(), time.time()
        pod_slot = self._pod_slot
        # The pod's power is re-summed when the batch has any reading of one of its devices.
        touched_pod = bool(pod_slot) and not pod_slot.keys().isdisjoint(devices)
        for r in compress(readings, map("power_w".__eq__, map(_metric_of, readings))) if touched_pod else ():
            if (slot := pod_slot.get(r.device)) is not None:
                limit = self._stale_after.get(r.device)
                if r.quality is Quality.GOOD and r.value is not None and limit is not None:
                    self._pod_w[slot], self._pod_ts[slot] = r.value, r.ts_mono
                    self._pod_limit[slot] = limit * self._slow.get((r.device, "power_w"), 1)
                else:
                    self._pod_w[slot] = math.nan
        if touched_pod:
            total = sum(self._pod_w)
            # Every input a GOOD value within its staleness limit (_sum_power's test, in C, over
            # the same devices in the same order); else the exact rule says which are bad.
            if total - total == 0.0 and all(
                map(operator.le, map(operator.sub, repeat(now_m), self._pod_ts), self._pod_limit)
            ):
                bad: list[str] = []
            else:
                total, bad = self._sum_power(self._pod_power_devices)
            out.append(
                Reading(
                    POD_DEVICE,
                    "power_w",
                    None if bad else total,
                    "W",
                    now_m,
                    now_w,
                    Quality.ERROR if bad else Quality.GOOD,
                    error=f"no power from {', '.join(sorted(bad))}" if bad else None,
                )
            )
        for loop, gpus in self._loop_gpus.items():
            if now_m - self._loop_sum_at.get(loop, -LOOP_SUM_MIN_S) < LOOP_SUM_MIN_S:
                continue
            if gpu_devices.isdisjoint(self._loop_gpu_sets[loop]):
                continue
            self._loop_sum_at[loop] = now_m
            total, bad = self._sum_power(gpus)
            out.append(
                Reading(
                    loop,
                    "gpu_heat_load_kw",
                    None if bad else total / 1000.0,
                    "kW",
                    now_m,
                    now_w,
                    Quality.ERROR if bad else Quality.GOOD,
                    error=f"no power from {len(bad)} GPU(s)" if bad else None,
                )
            )
        return out

    def _sum_power(self, devices: Iterable[str]) -> tuple[float, list[str]]:
        total = 0.0
        bad = []
        now = time.monotonic()
        latest, stale_after, slow = self._latest, self._stale_after, self._slow
        for d in devices:
            key = (d, "power_w")
            r = latest.get(key)
            # A device gone quiet (older than its staleness limit, not yet failed by its poll
            # timeout) must not keep adding its last value to the pod's.
            if r is None or r.value is None:
                bad.append(d)
                continue
            limit = stale_after.get(d)
            if r.quality is Quality.GOOD and limit is not None:
                # effective_quality's own test, inline: this runs for every PDU on every PDU poll.
                good = now - r.ts_mono <= limit * slow.get(key, 1)
            else:
                good = self.effective_quality(r, now) is Quality.GOOD
            if good:
                total += r.value
            else:
                bad.append(d)
        return total, bad

    def record_poll(
        self, device: str, *, ok: bool, error: str | None = None, now: float | None = None
    ) -> bool:
        """Note a poll outcome. Returns True when the device's status changed (worth one log line)."""
        now = time.monotonic() if now is None else now
        h = self._health.get(device)
        if h is None:
            h = self._health[device] = DeviceHealth(
                device=device, stale_after_s=self._stale_after.get(device, 3.0)
            )
        before = h.current_status(now)
        h.polls += 1
        h.last_poll_mono = now
        if ok:
            h.status = DeviceStatus.OK
            h.last_ok_mono = now
            h.consecutive_failures = 0
            h.last_error = None
        else:
            h.status = DeviceStatus.ERROR
            h.failures += 1
            h.consecutive_failures += 1
            h.last_error = error
        return h.current_status(now) is not before

    def mark_device_error(self, device: str, error: str, *, devices: Iterable[str] = ()) -> None:
        """The device failed: every metric it (and its sub-devices, e.g. its GPUs) had becomes
        value None / ERROR, so nothing downstream mistakes the last value for a current one."""
        now_m, now_w = time.monotonic(), time.time()
        batch = []
        for dev in (device, *devices):
            for r in self._by_device.get(dev, {}).values():
                if r.quality is Quality.ERROR and r.error == error:
                    continue
                batch.append(
                    r._replace(value=None, quality=Quality.ERROR, error=error, ts_mono=now_m, ts_wall=now_w)
                )
        self.update(batch)

    # ------------------------------------------------------------------ reads
    def get(self, device: str, metric: str) -> Reading | None:
        return self._latest.get((device, metric))

    def value(self, device: str, metric: str, *, max_age_s: float | None = None) -> float | None:
        """The value if it is good (and, with max_age_s, fresh enough); None otherwise."""
        r = self._latest.get((device, metric))
        if r is None or r.quality is not Quality.GOOD or r.value is None:
            return None
        if max_age_s is not None and r.age_s() > max_age_s:
            return None
        return r.value

    def device_readings(self, device: str) -> Mapping[str, Reading]:
        return MappingProxyType(self._by_device.get(device, {}))

    def devices(self) -> list[str]:
        return sorted(self._by_device)

    def readings(self) -> Mapping[tuple[str, str], Reading]:
        """A read-only view (no copy): iterate inside one synchronous step of the loop."""
        return MappingProxyType(self._latest)

    def effective_quality(self, reading: Reading, now: float | None = None) -> Quality:
        """GOOD readings older than their device's staleness limit read as STALE."""
        if reading.quality is not Quality.GOOD:
            return reading.quality
        limit = self._stale_after.get(reading.device)
        if limit is None:
            limit = self._stale_after.get(self._parent.get(reading.device, ""), None)
        if limit is not None and reading.age_s(now) > limit * self._slow.get(reading.key, 1):
            return Quality.STALE
        return Quality.GOOD

    def set_cadence(self, device: str, metric: str, every_polls: int) -> None:
        """A metric its driver reads only every N polls (an SNMP outlet table): stale after N x."""
        self._slow[(device, metric)] = every_polls
        if metric == "power_w":
            self._pod_forget(device)

    def set_info(self, device: str, info: Mapping[str, str]) -> None:
        """Static attributes of a device or sub-device (a GPU's UUID, name, PCI bus id)."""
        self._info[device] = dict(info)

    def info(self, device: str) -> Mapping[str, str]:
        return MappingProxyType(self._info.get(device, {}))

    def set_parent(self, sub_device: str, device: str) -> None:
        """gpu3 is polled by the nvml device "gpus": it shares its staleness limit and health."""
        self._parent[sub_device] = device

    def parent_of(self, device: str) -> str:
        return self._parent.get(device, device)

    def health(self) -> Mapping[str, DeviceHealth]:
        return MappingProxyType(self._health)

    def stale_devices(self, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return sorted(d for d, h in self._health.items() if h.current_status(now) is not DeviceStatus.OK)
