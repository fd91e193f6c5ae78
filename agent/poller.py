"""One supervised polling loop per device: deadlines without drift, no overlap, timeouts, backoff.

A slow or dead device only ever delays its own loop. A bug in a driver (any unexpected exception)
is logged with its traceback and the driver is re-opened on the next cycle; the daemon lives on.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import structlog

from agent.aio import raise_if_cancelling
from agent.config_base import DeviceBase
from agent.drivers.base import AuthError, DeviceError, DeviceUnavailable, Driver
from agent.events import EventBus, Severity
from agent.histogram import POLL_BUCKETS_S, Histogram
from agent.model import Reading
from agent.state import StateStore

log = structlog.get_logger(__name__)

MAX_BACKOFF_S = 30.0


@dataclass
class PollStats:
    durations_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    polls: int = 0
    failures: int = 0
    missed_deadlines: int = 0
    driver_restarts: int = 0
    last_duration_s: float | None = None
    histogram: Histogram = field(default_factory=lambda: Histogram(POLL_BUCKETS_S))  # for /metrics

    def quantile(self, q: float) -> float | None:
        return quantile(self.durations_s, q)


def quantile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of recent durations; None without any."""
    data = sorted(values)
    if not data:
        return None
    return data[min(len(data) - 1, max(0, math.ceil(q * len(data)) - 1))]


class Poller:
    def __init__(
        self, cfg: DeviceBase, driver: Driver, store: StateStore, events: EventBus | None = None
    ) -> None:
        self.cfg = cfg
        self.events = events
        self.driver = driver
        self.store = store
        self.stats = PollStats()
        self.first_cycle = asyncio.Event()
        self.heartbeat_mono = time.monotonic()
        self.sub_devices: set[str] = set()
        self._poll_now = asyncio.Event()
        self._opened = False
        self._last_readings: list[Reading] = []
        self._cadence_known = False
        store.register_device(cfg.id, stale_after_s=cfg.poll_interval_s * cfg.stale_after_polls)

    @property
    def device_id(self) -> str:
        return self.cfg.id

    @property
    def budget_s(self) -> float:
        """The most one cycle may take: every try of the driver's requests, plus a little."""
        return self.cfg.timeout_s * (self.cfg.retries + 1) + 1.0

    def healthy(self, now: float) -> bool:
        """Is this loop alive (whatever the device's state)? For the systemd watchdog."""
        allowance = (
            max(3 * self.cfg.poll_interval_s, self.cfg.poll_interval_s + self.budget_s) + MAX_BACKOFF_S
        )
        return now - self.heartbeat_mono <= allowance

    def poll_now(self) -> None:
        self._poll_now.set()

    async def poll_once(self) -> list[Reading]:
        """One cycle now, outside the schedule (podctl poll, MQTT poll_now). Returns the readings."""
        await self._cycle()
        return list(self._last_readings)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.cfg.poll_interval_s
        deadline = loop.time()
        try:
            while True:
                ok = await self._cycle()
                raise_if_cancelling()
                self.first_cycle.set()
                now = loop.time()
                self.heartbeat_mono = time.monotonic()
                if ok:
                    deadline += interval
                    if deadline <= now:
                        # Overran: skip the cycles we missed, keep the phase (no burst to catch up).
                        missed = int((now - deadline) // interval) + 1
                        self.stats.missed_deadlines += missed
                        deadline += missed * interval
                else:
                    failures = self.store.health()[self.cfg.id].consecutive_failures
                    delay = min(interval * 2 ** max(0, failures - 1), max(interval, MAX_BACKOFF_S))
                    deadline = now + delay
                self._poll_now.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, deadline - loop.time())):
                        await self._poll_now.wait()
                raise_if_cancelling()
                if self._poll_now.is_set():
                    deadline = loop.time()
        finally:
            await self._close()

    async def _cycle(self) -> bool:
        loop = asyncio.get_running_loop()
        start = loop.time()
        error: str | None = None
        readings: list[Reading] = []
        try:
            async with asyncio.timeout(self.budget_s):
                if not self._opened:
                    await self.driver.open()
                    self._opened = True
                readings = await self.driver.poll()
        except AuthError as err:
            error = f"authentication failed: {err.reason}"
        except DeviceUnavailable as err:
            error = err.reason
        except DeviceError as err:
            error = err.reason
        except TimeoutError:
            error = f"no answer within {self.budget_s:.1f} s"
        except Exception as err:  # a driver bug: log it whole, restart the driver, keep going
            error = f"driver error: {type(err).__name__}: {err}"
            log.exception("driver crashed; restarting it", device=self.cfg.id)
            self.stats.driver_restarts += 1
            await self._close()
        duration = loop.time() - start
        self.stats.polls += 1
        self.stats.last_duration_s = duration
        self.stats.durations_s.append(duration)
        self.stats.histogram.observe(duration)
        if error is None:
            new_sub = False
            for r in readings:
                if r.device != self.cfg.id and r.device not in self.sub_devices:
                    self.sub_devices.add(r.device)
                    self.store.set_parent(r.device, self.cfg.id)
                    new_sub = True
            every = getattr(self.driver, "metric_every", None)
            if callable(every) and not self._cadence_known:
                for r in readings:
                    n = every(r.metric)
                    if n > 1:
                        self.store.set_cadence(r.device, r.metric, n)
                self._cadence_known = True  # the first poll reads every table: all metrics seen
            info = getattr(self.driver, "device_info", None)
            if new_sub and callable(info):
                for dev, attrs in info().items():
                    self.store.set_info(dev, attrs)
            self.store.update(readings)
            self._last_readings = readings
            if self.store.record_poll(self.cfg.id, ok=True):
                log.info("device up", device=self.cfg.id, readings=len(readings))
                if self.events is not None:
                    self.events.emit(
                        "device_up",
                        Severity.INFO,
                        f"{self.cfg.id} answering",
                        device=self.cfg.id,
                        detail={"readings": len(readings)},
                    )
            return True
        self.stats.failures += 1
        self._last_readings = []
        self.store.mark_device_error(self.cfg.id, error, devices=self.sub_devices)
        if self.store.record_poll(self.cfg.id, ok=False, error=error):
            log.warning("device unavailable", device=self.cfg.id, reason=error)
            if self.events is not None:
                self.events.emit(
                    "device_down",
                    Severity.WARNING,
                    f"{self.cfg.id} unavailable: {error}",
                    device=self.cfg.id,
                    detail={"reason": error},
                )
        return False

    async def _close(self) -> None:
        if self._opened:
            self._opened = False
            try:
                async with asyncio.timeout(self.budget_s):
                    await self.driver.close()
            except Exception:
                log.debug("driver close failed", device=self.cfg.id, exc_info=True)
