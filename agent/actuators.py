"""The agent's typed actuators: what the interlocks and the power controller may change.

- ``PowerLimiter``: GPU power caps for a set of GPUs, with the limits read back. This is the
  interface a node agent implements for the GPUs of a remote server (design.md: cap leases), so
  it is kept small: ``set_caps`` and ``read_limits``.
- ``OutletSwitch``: a PDU outlet off (``shed``), verified by reading the outlet's state back.
- ``PointWriter``: a writable point of a device (CDU supply setpoint, battery setpoint, grid
  target, mode), with the value read back and compared.
- ``GpuSettings``: a GPU's power smoothing (Blackwell-class) and the software fallback's filler
  floor, local NVML or through the node agent, with the smoothing read back and compared.

Every exchange on a device's connection runs under that device's lock (``Poller.exclusive``),
so an actuation never interleaves with a poll. Failures of the outlet switch and the point writer
are events (``actuation_failed``, with what was asked and why it failed); the power limiter
reports per GPU and the interlock service, which retries, reports its failures once per streak.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from agent.drivers.base import DriverError
from agent.drivers.modbus import ModbusDriver
from agent.drivers.node import NodeDriver
from agent.drivers.nvml import NvmlDriver
from agent.drivers.smoothing import SMOOTHING_PRESET, GpuSettingsAsk, GpuSettingsOutcome
from agent.drivers.snmp import SnmpDriver
from agent.events import EventBus, Severity
from agent.poller import Poller
from agent.state import StateStore

log = structlog.get_logger(__name__)

CAP_TOLERANCE_W = 1.0  # NVML limits are whole mW; anything under a watt is the same limit


class ActuationError(Exception):
    """An actuation that did not happen, or whose read-back disagrees with what was asked."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"{device}: {reason}")
        self.device = device
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CapResult:
    """One GPU's outcome: the limit read back after the set (W), or why it failed."""

    readback_w: float | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class PowerLimiter(Protocol):
    """Sets and reads GPU power limits (local NVML, or a node agent for a remote server's GPUs)."""

    def set_caps(self, caps: Mapping[str, float]) -> Awaitable[dict[str, CapResult]]:
        """Set each GPU's power limit (W; clamped to its constraints by the implementation); the
        sets start on the call, before anything is awaited (a cap must not wait for the event
        loop). The awaitable gives, per GPU asked, the limit read back or the error; it never
        raises for one GPU."""
        ...

    async def read_limits(self, gpus: Collection[str]) -> dict[str, float | None]:
        """The power limit now in force on each GPU (W), None where unknown."""
        ...


class OutletSwitch(Protocol):
    async def switch_off(self, pdu: str, outlet: int, *, reason: str) -> None:
        """Switch the outlet off and verify it reads back off; ActuationError otherwise."""
        ...


class PointWriter(Protocol):
    async def write(self, device: str, point: str, value: float, *, reason: str) -> float:
        """Write the point, read it back; return the value read back. ActuationError if the write
        failed or the value read back is not the value asked."""
        ...


class GpuSettings(Protocol):
    async def apply(self, asks: Mapping[str, GpuSettingsAsk]) -> dict[str, GpuSettingsOutcome]:
        """Each GPU's smoothing / filler floor as asked; per GPU what was read back or why not
        (a smoothing read back other than asked is an error). Never raises for one GPU."""
        ...


class NoGpuSettings:
    """For a host without GPU settings (tests, tools): every ask is refused, with the reason."""

    async def apply(self, asks: Mapping[str, GpuSettingsAsk]) -> dict[str, GpuSettingsOutcome]:
        return {g: GpuSettingsOutcome(smoothing_error="no GPU settings actuator") for g in asks}


@dataclass(frozen=True, slots=True)
class Actuators:
    power: PowerLimiter
    outlets: OutletSwitch
    points: PointWriter
    gpu_settings: GpuSettings = field(default_factory=NoGpuSettings)


Pollers = Mapping[str, Poller]  # the agent's live poller table (reloads replace entries)


# ------------------------------------------------------------------------------ power limits
class NvmlPowerLimiter:
    """The GPUs of one NVML driver (this host), or of one node agent (a GPU server's, over the pod
    network: the driver sends the lease at once). Local sets run on the driver's actuation thread,
    beside its polls (NVML is thread-safe; a cap must not wait behind a poll of every GPU)."""

    def __init__(self, driver: NvmlDriver | NodeDriver, store: StateStore) -> None:
        self.driver = driver
        self.store = store

    def set_caps(self, caps: Mapping[str, float]) -> Awaitable[dict[str, CapResult]]:
        caps = dict(caps)
        try:
            future = self.driver.submit_power_limits(caps)  # the actuation thread starts now
        except DriverError as err:
            return _ready({g: CapResult(None, err.reason) for g in caps})
        return self._collect(caps, future)

    async def _collect(
        self, caps: Mapping[str, float], future: asyncio.Future[dict[str, float | DriverError]]
    ) -> dict[str, CapResult]:
        try:
            async with asyncio.timeout(max(1.0, self.driver.cfg.timeout_s)):
                raw = await asyncio.shield(future)
        except (DriverError, TimeoutError) as err:
            reason = err.reason if isinstance(err, DriverError) else "timed out"
            return {g: CapResult(None, reason) for g in caps}
        out: dict[str, CapResult] = {}
        for gpu, cap in caps.items():
            got = raw.get(gpu)
            if got is None:
                out[gpu] = CapResult(None, "no result")
            elif isinstance(got, DriverError):
                out[gpu] = CapResult(None, got.reason)
            else:
                out[gpu] = _checked(gpu, cap, got)
        return out

    async def read_limits(self, gpus: Collection[str]) -> dict[str, float | None]:
        return {g: self.store.value(g, "power_limit_w") for g in gpus}


async def _ready(results: dict[str, CapResult]) -> dict[str, CapResult]:
    return results


def _checked(gpu: str, cap: float, readback: float) -> CapResult:
    del gpu
    if not math.isfinite(readback):
        return CapResult(None, f"read back {readback!r} W")
    if abs(readback - cap) > max(CAP_TOLERANCE_W, 0.01 * cap):
        # The driver clamps to the GPU's constraints; anything else is a device that did not obey.
        return CapResult(readback, f"read back {readback:.1f} W after setting {cap:.1f} W")
    return CapResult(readback)


class PodPowerLimiter:
    """Every GPU of the pod: routes each GPU to the limiter of the host that has it."""

    def __init__(self, route: Callable[[str], PowerLimiter | None]) -> None:
        self.route = route

    def set_caps(self, caps: Mapping[str, float]) -> Awaitable[dict[str, CapResult]]:
        groups: dict[int, tuple[PowerLimiter, dict[str, float]]] = {}
        out: dict[str, CapResult] = {}
        for gpu, cap in caps.items():
            limiter = self.route(gpu)
            if limiter is None:
                out[gpu] = CapResult(None, "no power limiter for this GPU")
                continue
            groups.setdefault(id(limiter), (limiter, {}))[1][gpu] = cap
        started = [lim.set_caps(batch) for lim, batch in groups.values()]  # every host starts now
        return self._gather(out, started)

    @staticmethod
    async def _gather(
        out: dict[str, CapResult], started: list[Awaitable[dict[str, CapResult]]]
    ) -> dict[str, CapResult]:
        for result in await asyncio.gather(*started):
            out.update(result)
        return out

    async def read_limits(self, gpus: Collection[str]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for gpu in gpus:
            limiter = self.route(gpu)
            out[gpu] = None if limiter is None else (await limiter.read_limits([gpu])).get(gpu)
        return out


def nvml_router(pollers: Pollers, store: StateStore) -> Callable[[str], PowerLimiter | None]:
    """GPU id -> the limiter of the NVML driver or node agent that polls it (looked up live:
    reloads)."""
    limiters: dict[int, NvmlPowerLimiter] = {}

    def route(gpu: str) -> PowerLimiter | None:
        poller = pollers.get(store.parent_of(gpu))
        if poller is None or not isinstance(poller.driver, NvmlDriver | NodeDriver):
            return None
        lim = limiters.get(id(poller.driver))
        if lim is None or lim.driver is not poller.driver:
            lim = limiters[id(poller.driver)] = NvmlPowerLimiter(poller.driver, store)
        return lim

    return route


# ------------------------------------------------------------------------------ GPU settings
class PodGpuSettings:
    """GPU smoothing and filler floors of the pod: each GPU goes to the NVML driver or node agent
    that polls it (looked up live: reloads), all hosts at once."""

    def __init__(self, pollers: Pollers, store: StateStore) -> None:
        self.pollers = pollers
        self.store = store

    async def apply(self, asks: Mapping[str, GpuSettingsAsk]) -> dict[str, GpuSettingsOutcome]:
        out: dict[str, GpuSettingsOutcome] = {}
        groups: dict[int, tuple[NvmlDriver | NodeDriver, dict[str, GpuSettingsAsk]]] = {}
        for gpu, ask in asks.items():
            poller = self.pollers.get(self.store.parent_of(gpu))
            driver = None if poller is None else poller.driver
            if not isinstance(driver, NvmlDriver | NodeDriver):
                out[gpu] = GpuSettingsOutcome(smoothing_error="no NVML driver or node agent has this GPU")
                continue
            groups.setdefault(id(driver), (driver, {}))[1][gpu] = ask
        results = await asyncio.gather(*(d.set_gpu_settings(batch) for d, batch in groups.values()))
        for result in results:
            out.update(result)
        return {gpu: _checked_smoothing(asks[gpu], outcome) for gpu, outcome in out.items()}


def _checked_smoothing(ask: GpuSettingsAsk, outcome: GpuSettingsOutcome) -> GpuSettingsOutcome:
    """A smoothing set that reads back other than asked is an error (as a cap's read-back)."""
    rb = outcome.smoothing
    if not ask.set_smoothing or outcome.smoothing_error is not None:
        return outcome
    if rb is None:
        return _with_smoothing_error(outcome, "smoothing not read back")
    if not rb.agrees(ask.smoothing, SMOOTHING_PRESET):
        want = "off" if ask.smoothing is None else f"on, profile {SMOOTHING_PRESET}"
        got = f"{'on' if rb.enabled else 'off'}, profile {rb.profile}"
        return _with_smoothing_error(outcome, f"read back {got} after asking {want}")
    return outcome


def _with_smoothing_error(outcome: GpuSettingsOutcome, error: str) -> GpuSettingsOutcome:
    return GpuSettingsOutcome(
        outcome.smoothing, error, outcome.unsupported, outcome.filler_w, outcome.filler_error
    )


# ------------------------------------------------------------------------------ outlets
class PduOutletSwitch:
    """Outlets of SNMP PDUs (SET on the profile's control column) and Modbus PDUs (the outlet's
    relay coil). Verified: after the switch a poll reads ``outlet{n}_on`` back, it must be 0."""

    def __init__(self, pollers: Pollers, store: StateStore, events: EventBus) -> None:
        self.pollers = pollers
        self.store = store
        self.events = events

    async def switch_off(self, pdu: str, outlet: int, *, reason: str) -> None:
        try:
            await self._switch_off(pdu, outlet)
        except ActuationError as err:
            _failed(self.events, pdu, "outlet_off", outlet, reason, err.reason)
            raise

    async def _switch_off(self, pdu: str, outlet: int) -> None:
        poller = self.pollers.get(pdu)
        if poller is None:
            raise ActuationError(pdu, "no such PDU is polled")
        try:
            async with poller.exclusive() as driver:
                if isinstance(driver, SnmpDriver):
                    await driver.set_outlet(outlet, False)
                elif isinstance(driver, ModbusDriver):
                    await driver.write_point(f"outlet{outlet}_on", 0.0)
                else:
                    raise ActuationError(pdu, "its driver has no outlet control")
            await poller.poll_once()  # reads the outlet tables back (the driver asked for them)
        except (DriverError, ValueError) as err:
            raise ActuationError(pdu, f"outlet {outlet} off: {err}") from err
        state = self.store.get(pdu, f"outlet{outlet}_on")
        if state is None or state.value is None:
            raise ActuationError(pdu, f"outlet {outlet} switched, but its state could not be read back")
        if state.value != 0:
            raise ActuationError(pdu, f"outlet {outlet} still reads on after the switch-off")


# ------------------------------------------------------------------------------ points
class ModbusPointWriter:
    """Writable points of Modbus devices (profile ``writable``), read back after the write."""

    def __init__(self, pollers: Pollers, events: EventBus, *, timeout_s: float = 10.0) -> None:
        self.pollers = pollers
        self.events = events
        self.timeout_s = timeout_s
        self._failing: dict[tuple[str, str], str] = {}  # (device, point) -> last error

    async def write(self, device: str, point: str, value: float, *, reason: str) -> float:
        """One event per failure streak (a battery command is repeated every control period)."""
        key = (device, point)
        try:
            readback = await self._write(device, point, value)
        except ActuationError as err:
            if self._failing.get(key) != err.reason:
                _failed(self.events, device, f"write {point}", value, reason, err.reason)
            self._failing[key] = err.reason
            raise
        if self._failing.pop(key, None) is not None:
            self.events.emit(
                "actuation_recovered",
                Severity.INFO,
                f"{device}: {point} = {value:g} written after earlier failures",
                device=device,
                detail={"action": f"write {point}", "value": value, "readback": readback},
            )
        return readback

    async def _write(self, device: str, point: str, value: float) -> float:
        poller = self.pollers.get(device)
        if poller is None:
            raise ActuationError(device, "no such device is polled")
        try:
            async with asyncio.timeout(self.timeout_s), poller.exclusive() as driver:
                if not isinstance(driver, ModbusDriver):
                    raise ActuationError(device, "its driver has no writable points")
                readback = await driver.write_point(point, value)
        except TimeoutError:
            raise ActuationError(device, f"{point} = {value:g}: timed out") from None
        except (DriverError, ValueError) as err:
            raise ActuationError(device, f"{point} = {value:g}: {err}") from err
        if not math.isclose(readback, value, rel_tol=1e-3, abs_tol=1e-2):
            raise ActuationError(device, f"{point}: wrote {value:g}, read back {readback:g}")
        return readback


def _failed(events: EventBus, device: str, action: str, value: float, reason: str, error: str) -> None:
    log.error("actuation failed", device=device, action=action, value=value, error=error)
    events.emit(
        "actuation_failed",
        Severity.CRITICAL,
        f"{device}: {action} {value:g} failed: {error}",
        device=device,
        detail={"action": action, "value": value, "reason": reason, "error": error},
    )


def pod_actuators(pollers: Pollers, store: StateStore, events: EventBus) -> Actuators:
    """The controller's actuators over its own drivers."""
    return Actuators(
        power=PodPowerLimiter(nvml_router(pollers, store)),
        outlets=PduOutletSwitch(pollers, store, events),
        points=ModbusPointWriter(pollers, events),
        gpu_settings=PodGpuSettings(pollers, store),
    )
