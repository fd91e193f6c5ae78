"""Simulated Modbus cooling units and metered PDUs, served live from the pod's state objects.

Each unit is served through the SAME profile file the agent reads (``config/profiles/*.toml``):
a request is answered by encoding the state's current fields into registers at request time, so
there is no datablock to refresh and an idle server costs nothing but its listening socket.

Behaviour copied from real slaves:
- an unmapped address (a reserved gap of the map) -> exception 2 (illegal data address);
- a write the device refuses (``set_setpoint`` raising ValueError) -> exception 3 (illegal value);
- ``busy`` fault -> exception 6 (device busy) for every request of that unit;
- ``unresponsive`` fault -> no answer at all;
- on an RTU line, a request for a unit id nobody has gets no answer (RTU slaves stay silent), so
  a master pays one timeout for it and nothing else.

pymodbus 3.16 notes: the classic datastore (``ModbusDeviceContext`` + datablocks) is deprecated and
holds values, not state; the new ``SimDevice`` cannot stay silent for one unit (an unknown id
becomes exception 4). ``ModbusBaseServer`` accepts any ``ModbusServerContext`` with
``old_simulator`` set and then only calls ``async_getValues`` / ``async_setValues`` /
``device_ids`` on it, and ``NoSuchIdException`` from those with ``ignore_missing_devices=True``
means "send nothing". ``_ProfileContext`` below is that small context.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer

from agent.drivers.modbus import ModbusPoint, ModbusProfile, load_profile
from hwsim.modbus_codec import decode, encode
from hwsim.modbus_tcp import FastModbusTcpServer
from hwsim.state import CduState, ChillerState, PduState

log = structlog.get_logger(__name__)

ModbusState = CduState | ChillerState | PduState
WordOrder = Literal["big", "little"]

# Function code -> table (Modbus application protocol: FC1/5/15 coils, FC2 discrete inputs,
# FC3/6/16/22/23 holding registers, FC4 input registers).
_FC_TABLE: dict[int, str] = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input"}
_FC_TABLE.update(dict.fromkeys((3, 6, 16, 22, 23), "holding"))


_PHASE = re.compile(r"^phase(\d+)_(.+)$")
_OUTLET = re.compile(r"^outlet(\d+)_(.+)$")


# ----------------------------------------------------------------------- state <-> metric names


def _getter(state: ModbusState, metric: str) -> Callable[[], float] | None:
    """How to read ``metric`` from the state now, or None if this state has no such value."""
    if isinstance(state, PduState):
        if m := _PHASE.match(metric):
            n, attr = int(m[1]), m[2]
            if not any(p.index == n for p in state.phases) or not hasattr(state.phases[0], attr):
                return None
            return lambda: float(getattr(next(p for p in state.phases if p.index == n), attr))
        if m := _OUTLET.match(metric):
            n, attr = int(m[1]), m[2]
            if not any(o.index == n for o in state.outlets) or not hasattr(state.outlets[0], attr):
                return None
            return lambda: float(getattr(next(o for o in state.outlets if o.index == n), attr))
    if not hasattr(state, metric) or callable(getattr(state, metric)):
        return None
    return lambda: float(getattr(state, metric))


def _setter(state: ModbusState, metric: str) -> Callable[[float], None] | None:
    """The state's validating ``set_*`` method behind a writable point (ValueError = refused)."""
    if isinstance(state, PduState):
        if (m := _OUTLET.match(metric)) and m[2] == "on":
            n = int(m[1])
            return lambda v: state.set_outlet(n, bool(v))
        return None
    if metric == "setpoint_c":
        return state.set_setpoint
    if metric == "pump_speed_pct" and isinstance(state, CduState):
        return state.set_pump_speed
    # Other devices (battery/BMS): a validating ``set_<metric>`` method on the state, if any.
    fn = getattr(state, f"set_{metric}", None)
    return fn if callable(fn) else None


@dataclass(frozen=True, slots=True)
class _Mapped:
    point: ModbusPoint
    get: Callable[[], float]
    set: Callable[[float], None] | None


class _UnitImage:
    """One unit's register space, computed from its state at request time."""

    def __init__(self, state: ModbusState, profile: ModbusProfile, word_order: WordOrder) -> None:
        self.state = state
        self.word_order = word_order
        # (table, address) -> (mapped point, offset of this register within the point)
        self.cells: dict[tuple[str, int], tuple[_Mapped, int]] = {}
        for point in profile.points:
            get = _getter(state, point.metric)
            if get is None:
                # This state has no such value (e.g. fewer outlets than the map): the address
                # stays unmapped and answers exception 2, as a smaller model would.
                log.warning("profile point not served", device=state.id, metric=point.metric)
                continue
            mapped = _Mapped(point, get, _setter(state, point.metric) if point.writable else None)
            for off in range(point.width):
                self.cells[(point.table, point.address + off)] = (mapped, off)

    def _encode(self, mapped: _Mapped) -> list[int]:
        point = mapped.point
        # Fault bad-value: this point serves NaN / Inf / a number / garbage instead of the state.
        bad = self.state.bad_values.get(point.metric)
        value: float | str = bad if bad is not None else mapped.get()
        return encode(point.type, point.scale, value, self.word_order)

    def read(self, table: str, address: int, count: int) -> list[int] | list[bool] | ExcCodes:
        out: list[int] = []
        cache: dict[int, list[int]] = {}
        for addr in range(address, address + count):
            cell = self.cells.get((table, addr))
            if cell is None:
                return ExcCodes.ILLEGAL_ADDRESS
            mapped, off = cell
            key = id(mapped)
            if key not in cache:
                cache[key] = self._encode(mapped)
            out.append(cache[key][off])
        if table in ("coil", "discrete"):
            return [bool(v) for v in out]
        return out

    def write(self, table: str, address: int, values: Sequence[int] | Sequence[bool]) -> ExcCodes | None:
        words = [int(v) for v in values]
        # Every written register must belong to a writable point, and whole points only.
        updates: list[tuple[_Mapped, float]] = []
        i = 0
        while i < len(words):
            cell = self.cells.get((table, address + i))
            if cell is None or cell[1] != 0 or cell[0].set is None:
                return ExcCodes.ILLEGAL_ADDRESS
            mapped = cell[0]
            width = mapped.point.width
            if i + width > len(words):
                return ExcCodes.ILLEGAL_ADDRESS
            point = mapped.point
            updates.append((mapped, decode(point.type, point.scale, words[i : i + width], self.word_order)))
            i += width
        for mapped, value in updates:
            assert mapped.set is not None
            try:
                mapped.set(value)
            except ValueError as err:
                log.info("modbus write refused", device=self.state.id, reason=str(err))
                return ExcCodes.ILLEGAL_VALUE
        return None


class _ProfileContext(ModbusServerContext):
    """The server context: unit id -> live register image (see the module docstring)."""

    def __init__(self, units: dict[int, _UnitImage], *, unknown_unit: ExcCodes | None) -> None:
        # super().__init__ is skipped on purpose: it only wraps classic datablocks into SimDevices
        # (and logs "removed in v4"). old_simulator=True makes the server use us as is.
        self.units = units
        self.unknown_unit = unknown_unit  # None: stay silent (RTU); else answer this code (TCP)
        self.old_simulator = True
        self.simdevices = []

    def _unit(self, device_id: int) -> _UnitImage | ExcCodes:
        unit = self.units.get(device_id)
        if unit is None:
            if self.unknown_unit is None:
                raise NoSuchIdException(f"unit {device_id}")
            return self.unknown_unit
        if unit.state.unresponsive:
            raise NoSuchIdException(f"unit {device_id} unresponsive")  # -> no answer at all
        if unit.state.busy:
            return ExcCodes.DEVICE_BUSY
        return unit

    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        unit = self._unit(device_id)
        if isinstance(unit, ExcCodes):
            return unit
        table = _FC_TABLE.get(func_code)
        if table is None:
            return ExcCodes.ILLEGAL_FUNCTION
        return unit.read(table, address, count)

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        unit = self._unit(device_id)
        if isinstance(unit, ExcCodes):
            return unit
        table = _FC_TABLE.get(func_code)
        if table not in ("holding", "coil"):
            return ExcCodes.ILLEGAL_FUNCTION
        return unit.write(table, address, values)

    def device_ids(self) -> list[int]:
        return list(self.units)


# ---------------------------------------------------------------------------------- the handle


class ModbusHandle:
    """A running simulated Modbus endpoint (one TCP device, or one RTU line of units)."""

    def __init__(
        self,
        *,
        server: FastModbusTcpServer | ModbusSerialServer,
        units: dict[int, tuple[ModbusState, str]],
        port: int | None = None,
        host: str | None = None,
        serial_path: Path | None = None,
        baudrate: int | None = None,
        socat: asyncio.subprocess.Process | None = None,
        socat_drain: asyncio.Task[None] | None = None,
        requests: Counter[int],
    ) -> None:
        self.server = server
        self.units = units
        self.port = port
        self.host = host
        self.serial_path = serial_path
        self.baudrate = baudrate
        self._socat = socat
        self._socat_drain = socat_drain
        # Requests received (decoded frames, answered or not), per unit id: tests use it to check
        # how many reads the agent needed.
        self.requests = requests
        self._closed = False

    @property
    def request_count(self) -> int:
        return sum(self.requests.values())

    def manifest_entries(self) -> list[dict[str, Any]]:
        """design.md manifest entries, one per unit."""
        out: list[dict[str, Any]] = []
        for unit, (state, profile) in sorted(self.units.items()):
            if self.serial_path is not None:
                entry: dict[str, Any] = {"device": state.id, "serial": str(self.serial_path)}
                entry |= {"baud": self.baudrate, "unit": unit, "profile": profile}
            else:
                entry = {"device": state.id, "host": self.host, "port": self.port}
                entry |= {"unit": unit, "profile": profile}
            out.append(entry)
        return out

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.server.shutdown()
        if self._socat is not None and self._socat.returncode is None:
            self._socat.terminate()
            try:
                async with asyncio.timeout(2.0):
                    await self._socat.wait()
            except TimeoutError:
                self._socat.kill()
                await self._socat.wait()
        if self._socat_drain is not None:
            self._socat_drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._socat_drain


# ------------------------------------------------------------------------------------ starting


def _counting(requests: Counter[int]) -> Callable[[bool, ModbusPDU], ModbusPDU]:
    """A pymodbus trace_pdu hook that counts received requests per unit id."""

    def trace(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            requests[pdu.dev_id] += 1
        return pdu

    return trace


async def start_modbus_tcp(
    device: ModbusState,
    *,
    profile: str,
    unit: int = 1,
    host: str = "127.0.0.1",
    port: int = 0,
    word_order: WordOrder | None = None,
) -> ModbusHandle:
    """Serve one device over Modbus TCP on ``host:port`` (port 0: a free port, see ``.port``).

    ``word_order`` overrides the profile's (to simulate a unit that puts the low word first).
    A port in use raises OSError naming it.
    """
    prof = load_profile(profile)
    image = _UnitImage(device, prof, word_order or prof.word_order)
    # A TCP device asked for another unit id answers "gateway target failed to respond" (11):
    # that is what Modbus TCP gateways do, and it tells a misconfigured agent why.
    context = _ProfileContext({unit: image}, unknown_unit=ExcCodes.GATEWAY_NO_RESPONSE)
    units = {unit: (device, profile)}
    requests: Counter[int] = Counter()
    # Our own MBAP server (hwsim/modbus_tcp.py): pymodbus's costs ~0.5 ms of CPU per request.
    server = FastModbusTcpServer(context, requests)
    try:
        bound = await server.start(host, port)
    except OSError as err:
        await server.shutdown()
        raise OSError(
            errno.EADDRINUSE, f"Modbus TCP for {device.id}: cannot listen on {host}:{port} (in use?)"
        ) from err
    handle = ModbusHandle(server=server, units=units, port=bound, host=host, requests=requests)
    log.info("modbus tcp serving", device=device.id, host=host, port=bound, unit=unit, profile=profile)
    return handle


def _fresh_links(link_dir: Path, name: str) -> tuple[Path, Path]:
    link_dir.mkdir(parents=True, exist_ok=True)
    server_end, client_end = link_dir / f"{name}.srv", link_dir / name
    for link in (server_end, client_end):
        link.unlink(missing_ok=True)  # a stale link from a killed run
    return server_end, client_end


async def start_modbus_rtu_bus(
    units: dict[int, tuple[ModbusState, str]],
    *,
    link_dir: Path,
    name: str = "rtu0",
    baudrate: int = 19200,
) -> ModbusHandle:
    """Serve several units (unit id -> (state, profile name)) on ONE simulated RS-485 line.

    socat makes a pseudo-terminal pair: the server opens ``link_dir/<name>.srv``, clients open
    ``link_dir/<name>`` (``.serial_path``). Unknown unit ids get no answer.
    """
    if not units:
        raise ValueError("an RTU bus needs at least one unit")
    server_end, client_end = _fresh_links(link_dir, name)
    images = {
        uid: _UnitImage(state, prof, prof.word_order)
        for uid, (state, pname) in units.items()
        for prof in [load_profile(pname)]
    }
    context = _ProfileContext(images, unknown_unit=None)

    socat = await asyncio.create_subprocess_exec(
        "socat",
        "-d",
        "-d",
        f"pty,raw,echo=0,link={server_end}",
        f"pty,raw,echo=0,link={client_end}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert socat.stderr is not None
    try:
        # socat says "starting data transfer loop" once both ptys and links exist.
        async with asyncio.timeout(5.0):
            while b"starting data transfer loop" not in (line := await socat.stderr.readline()):
                if not line:
                    raise OSError(f"socat exited before creating {client_end}")
    except BaseException:
        if socat.returncode is None:
            socat.kill()
        await socat.wait()
        raise

    async def drain(stream: asyncio.StreamReader) -> None:
        # Keep reading socat's notices so that its stderr pipe never fills and blocks it.
        while await stream.readline():
            pass

    drain_task = asyncio.create_task(drain(socat.stderr), name=f"socat-stderr[{name}]")
    requests: Counter[int] = Counter()
    server = ModbusSerialServer(
        context,
        framer=FramerType.RTU,
        port=str(server_end),
        baudrate=baudrate,
        ignore_missing_devices=True,
        trace_pdu=_counting(requests),
    )
    handle = ModbusHandle(
        server=server,
        units=dict(units),
        serial_path=client_end,
        baudrate=baudrate,
        socat=socat,
        socat_drain=drain_task,
        requests=requests,
    )
    try:
        await server.serve_forever(background=True)
    except BaseException:
        await handle.close()
        raise
    log.info("modbus rtu serving", line=str(client_end), units=sorted(units), baud=baudrate)
    return handle


__all__ = ["ModbusHandle", "start_modbus_rtu_bus", "start_modbus_tcp"]
