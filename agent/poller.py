"""One supervised polling loop per device: deadlines without drift, no overlap, timeouts, backoff.

A slow or dead device only ever delays its own loop. A bug in a driver (any unexpected exception)
is logged with its traceback and the driver is re-opened on the next cycle; the daemon lives on.

The poller is the one place that says a device went down or came back: one log line and one
event per transition, with the reason (drivers raise, they do not log their own health).

Each device has one lock (``exclusive()``): a scheduled cycle, ``podctl poll`` and actuations on
the device's connection (outlet SETs, setpoint and battery writes) take turns, as the transports
expect one exchange in flight. Units on one RTU serial line also share the line's request lock
(in the Modbus driver); a unit on a shared line that stops answering is probed rarely enough that
its timeouts hold the line at most ``SHARED_LINE_SHARE`` of the time, so its neighbours keep
their cadence.

Deadlines sit at a stable phase inside the device's interval: a hash of its ``poll_phase`` where it
has one (node agents share "nodes", SNMP PDUs "pdus": polled at the same instant, their answers
reach the interlocks together and the agent wakes once for all of them, its code and data still
warm from the first; measured on the ``full`` pod's 24 v2c PDUs, ~0.5x the CPU of spread polls),
else of its id, so that other devices' polls spread over the interval; plus an optional random
``poll_jitter_s`` per cycle (Telegraf's ``collection_jitter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import operator
import random
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
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
_device_of = operator.itemgetter(0)  # Reading.device
# A dead unit on a shared serial line may hold the line at most this share of the time: after a
# failed cycle that took T seconds, the next probe waits at least T / SHARED_LINE_SHARE (capped).
SHARED_LINE_SHARE = 0.05
MAX_SHARED_LINE_BACKOFF_S = 120.0


def phase_offset(device_id: str, interval_s: float) -> float:
    """A stable place for the device's deadlines inside its interval (same id, same phase)."""
    return (zlib.crc32(device_id.encode()) / 2**32) * interval_s


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def shared_bus(cfg: DeviceBase) -> str | None:
    """The bus several configured devices share (an RTU serial line), or None."""
    # Duck-typed on the Modbus config's fields: the node agent runs the poller without loading the
    # controller's device models (agent.config), which would cost every GPU server memory.
    serial = getattr(cfg, "serial", None)
    if getattr(cfg, "transport", None) == "rtu" and serial is not None:
        return f"rtu:{serial}"
    return None


@dataclass
class PollStats:
    durations_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    polls: int = 0
    failures: int = 0
    missed_deadlines: int = 0
    driver_restarts: int = 0
    bookkeeping_errors: int = 0  # the poller's own work after a poll raised (a bug; polling goes on)
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
        self,
        cfg: DeviceBase,
        driver: Driver,
        store: StateStore,
        events: EventBus | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.events = events
        self.driver = driver
        self.store = store
        self.stats = PollStats()
        self.first_cycle = asyncio.Event()
        self.heartbeat_mono = time.monotonic()
        self.sub_devices: set[str] = set()
        self._known_devices = {cfg.id}  # the device and its sub-devices
        self._overran = False  # the cycle in flight was cancelled by its budget guard
        self.bus = shared_bus(cfg)
        # A device may share its phase with others (NodeDevice.poll_phase: node answers together).
        self.phase_s = phase_offset(getattr(cfg, "poll_phase", None) or cfg.id, cfg.poll_interval_s)
        self._lock = asyncio.Lock()
        self._rng = rng or random.Random()
        self._poll_now = False  # asked for a cycle now (podctl, MQTT) while waiting for the next
        self._wake: asyncio.Future[None] | None = None  # the wait for the next deadline
        self._opened = False
        self._last_readings: list[Reading] = []
        self._last_bookkeeping_error: str | None = None
        self._cadence_known = False
        self.up: bool | None = None  # None until the first cycle's outcome
        self._down_since: float | None = None
        self.transitions = 0  # down + up, for tests and status
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
        self._poll_now = True
        _wake(self._wake)

    async def _wait_until(self, when: float) -> None:
        """Until loop time ``when`` or ``poll_now()``: one future and one timer, as asyncio.sleep
        costs (a timeout around an Event.wait also cancels the task and raises, every cycle)."""
        loop = asyncio.get_running_loop()
        wake = self._wake = loop.create_future()
        timer = loop.call_at(when, _wake, wake)
        try:
            await wake
        finally:
            timer.cancel()
            self._wake = None

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Driver]:
        """The device's connection to oneself: no poll (scheduled or not) or other actuation runs
        on it meanwhile. Yields the driver."""
        async with self._lock:
            yield self.driver

    async def poll_once(self) -> list[Reading]:
        """One cycle now, outside the schedule (podctl poll, MQTT poll_now). Returns the readings.
        Waits for a cycle in flight to end first (never two exchanges on one connection)."""
        await self._cycle()
        return list(self._last_readings)

    @property
    def has_raw(self) -> bool:
        """Can the driver show its raw registers / varbinds (``podctl poll --raw``)?"""
        return callable(getattr(self.driver, "poll_raw", None))

    async def poll_raw(self) -> object:
        """The driver's raw view of one read, under the device's lock like any other exchange."""
        async with self._lock:
            if not self._opened:
                await self.driver.open()
                self._opened = True
            result: object = await self.driver.poll_raw()  # type: ignore[attr-defined]
            return result

    def _next_phase(self, after: float) -> float:
        """The first deadline on this device's phase later than ``after`` (loop time)."""
        interval = self.cfg.poll_interval_s
        k = math.floor((after - self.phase_s) / interval) + 1
        return self.phase_s + k * interval

    def _failure_delay(self, duration_s: float) -> float:
        interval = self.cfg.poll_interval_s
        failures = self.store.health()[self.cfg.id].consecutive_failures
        delay: float = min(interval * 2.0 ** max(0, failures - 1), max(interval, MAX_BACKOFF_S))
        if self.bus is not None:
            # Its silence cost the line duration_s; keep that a small share of the line's time.
            delay = max(delay, min(MAX_SHARED_LINE_BACKOFF_S, duration_s / SHARED_LINE_SHARE))
        return delay

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.cfg.poll_interval_s
        # The first cycle at once (READY waits for it); then on the device's phase.
        deadline = loop.time()
        realign = True
        try:
            while True:
                try:
                    ok = await self._cycle()
                except Exception as err:
                    # Our own bookkeeping after the driver (store, sub-devices, the driver's
                    # metric_every/device_info callbacks) raised: a bug, but the loop must live on.
                    # The device's data then ages to stale, and the interlocks fail safe on it.
                    ok = False
                    self._bookkeeping_failed(err)
                raise_if_cancelling()
                self.first_cycle.set()
                now = loop.time()
                self.heartbeat_mono = time.monotonic()
                if ok and realign:
                    deadline, realign = self._next_phase(now), False
                elif ok:
                    deadline += interval
                    if deadline <= now:
                        # Overran: skip the cycles we missed, keep the phase (no burst to catch up).
                        missed = int((now - deadline) // interval) + 1
                        self.stats.missed_deadlines += missed
                        deadline += missed * interval
                else:
                    # Backing off; back on the phase once it answers again.
                    deadline, realign = now + self._failure_delay(self.stats.last_duration_s or 0.0), True
                self._poll_now = False
                jitter = self._rng.uniform(0.0, self.cfg.poll_jitter_s) if self.cfg.poll_jitter_s else 0.0
                await self._wait_until(deadline + jitter)
                raise_if_cancelling()
                if self._poll_now:
                    deadline, realign = loop.time(), True
        finally:
            await self._close()

    def _bookkeeping_failed(self, err: Exception) -> None:
        """Count every failure; log one with its traceback per distinct error, not one a cycle."""
        self.stats.bookkeeping_errors += 1
        what = f"{type(err).__name__}: {err}"
        if what == self._last_bookkeeping_error:
            return
        self._last_bookkeeping_error = what
        # Logging itself can fail (out of descriptors): keep polling.
        with contextlib.suppress(Exception):
            log.error("poll bookkeeping failed", device=self.cfg.id, error=what, exc_info=err)

    async def _cycle(self) -> bool:
        # acquire/release rather than ``async with``: no __aenter__/__aexit__ coroutines per cycle
        # (a cycle is ~1 ms of CPU, most of it fixed costs like these).
        lock = self._lock
        await lock.acquire()
        try:
            return await self._cycle_locked()
        finally:
            lock.release()

    def _overrun(self, task: asyncio.Task[object]) -> None:
        """The cycle's budget is spent: cancel it (``_cycle_locked`` turns that into an error)."""
        self._overran = True
        task.cancel()

    async def _cycle_locked(self) -> bool:
        loop = asyncio.get_running_loop()
        # The duration on the monotonic clock: uvloop's loop.time() counts whole milliseconds.
        started = time.monotonic()
        error: str | None = None
        readings: list[Reading] = []
        # The budget guard: what asyncio.timeout does (a timer that cancels this task, the cancel
        # turned into a timeout unless someone else asked for one too), without its context
        # manager's coroutines and state machine, per cycle.
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._overran = False
        guard = loop.call_later(self.budget_s, self._overrun, task)
        expired = False
        try:
            try:
                if not self._opened:
                    await self.driver.open()
                    self._opened = True
                readings = await self.driver.poll()
            finally:
                guard.cancel()
                if self._overran:  # withdraw our cancel, delivered or not
                    expired = task.uncancel() <= cancelling
        except asyncio.CancelledError:
            if not expired:
                raise  # someone else's cancel (shutdown, reload): let it through
            error = f"no answer within {self.budget_s:.1f} s"
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
            # Logging itself can fail (out of descriptors: the renderer's lazy imports): keep polling.
            with contextlib.suppress(Exception):
                log.exception("driver crashed; restarting it", device=self.cfg.id)
            self.stats.driver_restarts += 1
            await self._close()
        duration = time.monotonic() - started
        stats = self.stats
        stats.polls += 1
        stats.last_duration_s = duration
        stats.durations_s.append(duration)
        stats.histogram.observe(duration)
        if error is None:
            new_sub = False
            # In C (itemgetter, set): this runs on every reading of every poll.
            devices = set(map(_device_of, readings))
            if not devices <= self._known_devices:
                for dev in devices - self._known_devices:
                    self.sub_devices.add(dev)
                    self._known_devices.add(dev)
                    self.store.set_parent(dev, self.cfg.id)
                    new_sub = True
            if not self._cadence_known:
                every = getattr(self.driver, "metric_every", None)
                if callable(every):
                    for r in readings:
                        n = every(r.metric)
                        if n > 1:
                            self.store.set_cadence(r.device, r.metric, n)
                self._cadence_known = True  # the first poll reads every table: all metrics seen
            info = getattr(self.driver, "device_info", None) if new_sub else None
            if callable(info):
                for dev, attrs in info().items():
                    self.store.set_info(dev, attrs)
            self.store.update(readings)
            self._last_readings = readings
            self.store.record_poll(self.cfg.id, ok=True)
            self._note(up=True, reason=None, readings=len(readings))
            return True
        self.stats.failures += 1
        self._last_readings = []
        self.store.mark_device_error(self.cfg.id, error, devices=self.sub_devices)
        self.store.record_poll(self.cfg.id, ok=False, error=error)
        self._note(up=False, reason=error, readings=0)
        return False

    def _note(self, *, up: bool, reason: str | None, readings: int) -> None:
        """The device's one down/up record: a log line and an event per transition, nothing else."""
        was, self.up = self.up, up
        if was is up:
            return
        now = time.monotonic()
        if not up:
            self._down_since = now
            self.transitions += 1
            log.warning("device down", device=self.cfg.id, reason=reason)
            if self.events is not None:
                self.events.emit(
                    "device_down",
                    Severity.WARNING,
                    f"{self.cfg.id} down: {reason}",
                    device=self.cfg.id,
                    detail={"reason": reason},
                )
            return
        down_for = None if self._down_since is None else round(now - self._down_since, 1)
        why = "first poll answered" if was is None else f"answering again after {down_for} s down"
        self._down_since = None
        if was is not None:
            self.transitions += 1
        log.info("device up", device=self.cfg.id, reason=why, readings=readings)
        if self.events is not None:
            self.events.emit(
                "device_up",
                Severity.INFO,
                f"{self.cfg.id} up: {why}",
                device=self.cfg.id,
                detail={"reason": why, "down_for_s": down_for, "readings": readings},
            )

    async def _close(self) -> None:
        if self._opened:
            self._opened = False
            try:
                async with asyncio.timeout(self.budget_s):
                    await self.driver.close()
            except Exception:
                log.debug("driver close failed", device=self.cfg.id, exc_info=True)
