"""Simulated SNMP PDUs: one in-process pysnmp command responder per ``PduState``.

Each PDU gets its own ``SnmpEngine`` on its own UDP loopback port and serves the vendor's real MIB
layout, computed from the ``PduState`` at request time (no copies, no refresh task: an idle agent
costs nothing but one timer tick a second).

* ``vendor == "apc"``: APC PowerNet-MIB rPDU2 (``1.3.6.1.4.1.318.1.1.26``): device status, phase
  status, metered outlet status, switched outlet status and control tables. Like the MIB, every
  rPDU2 table has one integer index (the row: device 1, phase 1..3, outlet 1..N); the ``Module``
  column says which PDU of a daisy chain the row belongs to (always 1 here).
* ``vendor == "raritan"``: Raritan PDU2-MIB (``1.3.6.1.4.1.13742.6``): inlet, inlet-pole (per phase)
  and outlet sensor measurements indexed ``{pduId}.{inlet|outlet}[.{pole}].{sensorType}`` with the
  matching ``*SensorDecimalDigits`` configuration columns, and outlet switching.

SNMPv2c (community) or SNMPv3 authPriv (SHA + AES-128), GET / GETNEXT / GETBULK on every object and
SET on the outlet control objects only. The MIB is served by a small instrumentation controller of
our own (a sorted OID list + bisect) rather than pysnmp's MIB tree: it gives exact lexicographic
ordering for walks and costs a few microseconds per varbind.

Fault: ``pdu.unresponsive`` drops every datagram unread (the manager times out). ``handle.delay_s``
delays every answer (a slow agent) without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pysnmp.carrier.asyncio.dgram import udp
from pysnmp.entity import config, engine
from pysnmp.entity.rfc3413 import cmdrsp, context
from pysnmp.proto import rfc1902, rfc1905
from pysnmp.smi import error as smi_error
from pysnmp.smi.instrum import AbstractMibInstrumController

from hwsim import snmp_wire as wire
from hwsim.snmp_wire import FastResponder, Raw, UsmFast, VarbindCache
from hwsim.state import OutletState, PduState, PhaseState

Oid = tuple[int, ...]
Getter = Callable[[], Raw]
Setter = Callable[[Any], None]

APC_RPDU2 = (1, 3, 6, 1, 4, 1, 318, 1, 1, 26)
RARITAN_PDU2 = (1, 3, 6, 1, 4, 1, 13742, 6)
SYSTEM = (1, 3, 6, 1, 2, 1, 1)

# Raritan SensorTypeEnumeration (PDU2-MIB).
RMS_CURRENT = 1
RMS_VOLTAGE = 4
ACTIVE_POWER = 5
APPARENT_POWER = 6
POWER_FACTOR = 7
ACTIVE_ENERGY = 8
ON_OFF = 14
# Decimal digits a PX3 reports for each sensor type (inletSensorDecimalDigits & co.): the served
# value is round(x * 10**digits).
RARITAN_DIGITS = {
    RMS_CURRENT: 3,
    RMS_VOLTAGE: 0,
    ACTIVE_POWER: 0,
    APPARENT_POWER: 0,
    POWER_FACTOR: 2,
    ACTIVE_ENERGY: 0,
    ON_OFF: 0,
}
# Raritan SensorStateEnumeration values used here.
RARITAN_STATE_NORMAL = 4
RARITAN_STATE_ON = 7
RARITAN_STATE_OFF = 8
TRUTH_TRUE = 1

# APC rPDU2OutletSwitchedControlCommand.
APC_IMMEDIATE_ON = 1
APC_IMMEDIATE_OFF = 2
APC_IMMEDIATE_REBOOT = 3
APC_DELAYED_ON = 5
APC_DELAYED_OFF = 6
APC_DELAYED_REBOOT = 7
APC_CANCEL_PENDING = 8
# rPDU2OutletSwitchedStatusState.
APC_STATE_OFF = 1
APC_STATE_ON = 2

# Raritan switchingOperation.
RARITAN_OFF = 0
RARITAN_ON = 1
RARITAN_CYCLE = 2

# How long a reboot/cycle keeps the outlet off (APC rPDU2OutletSwitchedConfigRebootDuration default).
REBOOT_OFF_S = 5.0

_INT32_MAX = 2**31 - 1
_UINT32_MAX = 2**32 - 1


def _i32(x: float) -> Raw:
    return (wire.INTEGER, max(-_INT32_MAX - 1, min(_INT32_MAX, round(x))))


def _u32(x: float) -> Raw:
    return (wire.GAUGE32, max(0, min(_UINT32_MAX, round(x))))


def _str(s: str) -> Raw:
    return (wire.OCTET_STRING, s.encode())


_PYSNMP_TYPE: dict[int, Callable[[Any], Any]] = {
    wire.INTEGER: rfc1902.Integer32,
    wire.GAUGE32: rfc1902.Unsigned32,
    wire.TIMETICKS: rfc1902.TimeTicks,
    wire.OCTET_STRING: rfc1902.OctetString,
    wire.OBJECT_ID: rfc1902.ObjectIdentifier,
}


def to_pysnmp(raw: Raw) -> Any:
    """A served value as pysnmp's object (the pysnmp path: SET, discovery, anything unusual)."""
    return _PYSNMP_TYPE[raw[0]](raw[1])


@dataclass(slots=True)
class _Obj:
    get: Getter
    # Validates and applies a SET value; None = read-only. Raises an smi_error for a bad value.
    set: Setter | None = None


class PduMib(AbstractMibInstrumController):  # type: ignore[misc]
    """A flat, sorted MIB: OID -> live getter (and setter for the writable objects)."""

    def __init__(self, objects: dict[Oid, _Obj]) -> None:
        self._objects = objects
        self._oids = sorted(objects)
        self.on_write: Callable[[], None] | None = None  # after a SET: the fast path's cache is stale

    @property
    def getters(self) -> dict[Oid, Getter]:
        return {oid: obj.get for oid, obj in self._objects.items()}

    @property
    def oids(self) -> list[Oid]:
        return list(self._oids)

    def _allowed(self, name: Oid, context: dict[str, Any], view: str = "read") -> bool:
        ac = context.get("acFun")
        if ac is None:
            return True
        try:
            not_in_view = ac(view, (name, None), **context)
        except smi_error.NoAccessError:
            return False
        return not not_in_view

    def read_variables(self, *var_binds: Any, **context: Any) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = []
        for idx, (name, _val) in enumerate(var_binds):
            context["idx"] = idx
            oid = tuple(name)
            obj = self._objects.get(oid)
            if obj is None or not self._allowed(oid, context):
                out.append((name, rfc1905.noSuchObject))
            else:
                out.append((name, to_pysnmp(obj.get())))
        return out

    def read_next_variables(self, *var_binds: Any, **context: Any) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = []
        for idx, (name, _val) in enumerate(var_binds):
            context["idx"] = idx
            pos = bisect.bisect_right(self._oids, tuple(name))
            while pos < len(self._oids):
                oid = self._oids[pos]
                if self._allowed(oid, context):
                    out.append((rfc1902.ObjectName(oid), to_pysnmp(self._objects[oid].get())))
                    break
                pos += 1
            else:
                out.append((name, rfc1905.endOfMibView))
        return out

    def write_variables(self, *var_binds: Any, **context: Any) -> list[tuple[Any, Any]]:
        # Test every varbind first, then commit: SNMP SET is all or nothing.
        todo: list[tuple[_Obj, Any]] = []
        for idx, (name, val) in enumerate(var_binds):
            context["idx"] = idx
            oid = tuple(name)
            obj = self._objects.get(oid)
            if obj is None:
                raise smi_error.NoSuchObjectError(name=name, idx=idx)
            if obj.set is None or not self._allowed(oid, context, "write"):
                raise smi_error.NotWritableError(name=name, idx=idx)
            if not isinstance(val, rfc1902.Integer32 | rfc1902.Integer):
                raise smi_error.WrongTypeError(name=name, idx=idx)
            todo.append((obj, val))
        for idx, (obj, val) in enumerate(todo):
            try:
                assert obj.set is not None
                obj.set(int(val))
            except ValueError as err:
                raise smi_error.WrongValueError(name=var_binds[idx][0], idx=idx) from err
        if self.on_write is not None:
            self.on_write()
        return [(name, to_pysnmp(self._objects[tuple(name)].get())) for name, _ in var_binds]


# ---------------------------------------------------------------------------------------------
# Vendor MIBs


def _system_group(pdu: PduState, started: float, descr: str, sys_oid: Oid) -> dict[Oid, _Obj]:
    def uptime() -> Raw:
        return (wire.TIMETICKS, int((time.monotonic() - started) * 100) & _UINT32_MAX)

    return {
        (*SYSTEM, 1, 0): _Obj(lambda: _str(descr)),
        (*SYSTEM, 2, 0): _Obj(lambda: (wire.OBJECT_ID, sys_oid)),
        (*SYSTEM, 3, 0): _Obj(uptime),
        (*SYSTEM, 4, 0): _Obj(lambda: _str("hwsim")),
        (*SYSTEM, 5, 0): _Obj(lambda: _str(pdu.id)),
        (*SYSTEM, 6, 0): _Obj(lambda: _str("simulated pod")),
        (*SYSTEM, 7, 0): _Obj(lambda: _i32(72)),
    }


def _load_state(current_a: float, rating_a: float) -> int:
    """rPDU2 load state: lowLoad 1, normal 2, nearOverload 3, overload 4 (default thresholds)."""
    frac = current_a / rating_a if rating_a > 0 else 0.0
    if frac >= 1.0:
        return 4
    if frac >= 0.8:
        return 3
    if frac < 0.05:
        return 1
    return 2


def _outlet_switcher(
    pdu: PduState, outlet: OutletState, loop: asyncio.AbstractEventLoop, timers: set[asyncio.TimerHandle]
) -> Callable[[bool, bool], None]:
    """Switch an outlet now; with cycle=True switch it off and back on after REBOOT_OFF_S."""

    def switch(on: bool, cycle: bool) -> None:
        pdu.set_outlet(outlet.index, on)
        if cycle:

            def back_on() -> None:
                timers.discard(handle)
                pdu.set_outlet(outlet.index, True)

            handle = loop.call_later(REBOOT_OFF_S, back_on)
            timers.add(handle)

    return switch


def apc_mib(
    pdu: PduState, started: float, loop: asyncio.AbstractEventLoop, timers: set[asyncio.TimerHandle]
) -> dict[Oid, _Obj]:
    """PowerNet-MIB rPDU2 tables for one PDU (device 1)."""
    objs = _system_group(
        pdu,
        started,
        f"APC Web/SNMP Management Card (MB:v4.1.0 PF:v6.9.6 PN:apc_hw05_aos) {pdu.model}",
        (1, 3, 6, 1, 4, 1, 318, 1, 3, 4, 6),
    )
    dev = (*APC_RPDU2, 4, 3, 1)  # rPDU2DeviceStatusEntry

    def max_phase_a() -> float:
        return max((p.current_a for p in pdu.phases), default=0.0)

    objs |= {
        (*dev, 1, 1): _Obj(lambda: _i32(1)),  # Index
        (*dev, 2, 1): _Obj(lambda: _i32(1)),  # Module
        (*dev, 3, 1): _Obj(lambda: _str(pdu.id)),  # Name
        (*dev, 4, 1): _Obj(lambda: _i32(_load_state(max_phase_a(), pdu.rating_a))),  # LoadState
        (*dev, 5, 1): _Obj(lambda: _i32(pdu.power_w / 10.0)),  # Power, hundredths of kW
        (*dev, 9, 1): _Obj(lambda: _i32(pdu.energy_wh / 100.0)),  # Energy, tenths of kWh
        (*dev, 16, 1): _Obj(lambda: _i32(pdu.apparent_power_va / 10.0)),  # ApparentPower, hundredths kVA
        (*dev, 17, 1): _Obj(lambda: _i32(pdu.power_factor * 100.0)),  # PowerFactor, hundredths
    }

    ph = (*APC_RPDU2, 6, 3, 1)  # rPDU2PhaseStatusEntry
    for p in pdu.phases:
        i = p.index
        objs |= _apc_phase(ph, i, p, pdu)

    sw_status = (*APC_RPDU2, 9, 2, 3, 1)  # rPDU2OutletSwitchedStatusEntry
    sw_ctl = (*APC_RPDU2, 9, 2, 4, 1)  # rPDU2OutletSwitchedControlEntry
    met = (*APC_RPDU2, 9, 4, 3, 1)  # rPDU2OutletMeteredStatusEntry
    for o in pdu.outlets:
        objs |= _apc_outlet(sw_status, sw_ctl, met, o, _outlet_switcher(pdu, o, loop, timers))
    return objs


def _apc_phase(ph: Oid, i: int, p: PhaseState, pdu: PduState) -> dict[Oid, _Obj]:
    return {
        (*ph, 1, i): _Obj(lambda: _i32(i)),  # Index
        (*ph, 2, i): _Obj(lambda: _i32(1)),  # Module
        (*ph, 3, i): _Obj(lambda: _i32(i)),  # Number
        (*ph, 4, i): _Obj(lambda: _i32(_load_state(p.current_a, pdu.rating_a))),  # LoadState
        (*ph, 5, i): _Obj(lambda: _i32(p.current_a * 10.0)),  # Current, tenths of A
        (*ph, 6, i): _Obj(lambda: _i32(p.voltage_v)),  # Voltage, V
        (*ph, 7, i): _Obj(lambda: _i32(p.power_w / 10.0)),  # Power, hundredths of kW
        (*ph, 8, i): _Obj(lambda: _i32(p.apparent_power_va / 10.0)),  # ApparentPower, hundredths kVA
        (*ph, 9, i): _Obj(lambda: _i32(pdu.power_factor * 100.0)),  # PowerFactor, hundredths
        (*ph, 10, i): _Obj(lambda: _i32(p.peak_current_a * 10.0)),  # PeakCurrent, tenths of A
    }


def _apc_outlet(
    sw_status: Oid, sw_ctl: Oid, met: Oid, o: OutletState, switch: Callable[[bool, bool], None]
) -> dict[Oid, _Obj]:
    i = o.index

    def command(value: int) -> None:
        # The simulator applies the delayed variants at once (no per-outlet delay configuration).
        if value in (APC_IMMEDIATE_ON, APC_DELAYED_ON):
            switch(True, False)
        elif value in (APC_IMMEDIATE_OFF, APC_DELAYED_OFF):
            switch(False, False)
        elif value in (APC_IMMEDIATE_REBOOT, APC_DELAYED_REBOOT):
            switch(False, True)
        elif value != APC_CANCEL_PENDING:
            raise ValueError(f"rPDU2OutletSwitchedControlCommand {value}")

    def state() -> Raw:
        return _i32(APC_STATE_ON if o.on else APC_STATE_OFF)

    return {
        (*sw_status, 1, i): _Obj(lambda: _i32(i)),  # Index
        (*sw_status, 2, i): _Obj(lambda: _i32(1)),  # Module
        (*sw_status, 3, i): _Obj(lambda: _str(o.name)),  # Name
        (*sw_status, 4, i): _Obj(lambda: _i32(i)),  # Number
        (*sw_status, 5, i): _Obj(state),  # State: off 1, on 2
        (*sw_status, 6, i): _Obj(lambda: _i32(2)),  # CommandPending: false 2
        (*sw_ctl, 1, i): _Obj(lambda: _i32(i)),
        (*sw_ctl, 2, i): _Obj(lambda: _i32(1)),
        (*sw_ctl, 3, i): _Obj(lambda: _str(o.name)),
        (*sw_ctl, 4, i): _Obj(lambda: _i32(i)),
        # Command reads back immediateOn 1 / immediateOff 2, as the real card does.
        (*sw_ctl, 5, i): _Obj(lambda: _i32(APC_IMMEDIATE_ON if o.on else APC_IMMEDIATE_OFF), command),
        (*met, 1, i): _Obj(lambda: _i32(i)),
        (*met, 2, i): _Obj(lambda: _i32(1)),
        (*met, 3, i): _Obj(lambda: _str(o.name)),
        (*met, 4, i): _Obj(lambda: _i32(i)),
        (*met, 5, i): _Obj(lambda: _i32(2)),  # State: normal 2
        (*met, 6, i): _Obj(lambda: _i32(o.current_a * 10.0)),  # Current, tenths of A
        (*met, 7, i): _Obj(lambda: _i32(o.power_w)),  # Power, W
        (*met, 8, i): _Obj(lambda: _i32(o.peak_power_w)),  # PeakPower, W
        (*met, 11, i): _Obj(lambda: _i32(o.energy_wh / 100.0)),  # Energy, tenths of kWh
    }


def _raritan_sensor(
    objs: dict[Oid, _Obj],
    *,
    value_col: Oid,
    config_col: Oid,
    index: Oid,
    sensor: int,
    value: Callable[[], float],
    state: Callable[[], int] | None = None,
) -> None:
    """One Raritan sensor: IsAvailable (.2), State (.3), Value (.4) and its DecimalDigits (.7)."""
    digits = RARITAN_DIGITS[sensor]
    scale = 10.0**digits
    idx = (*index, sensor)
    st = state or (lambda: RARITAN_STATE_NORMAL)
    objs[(*value_col, 2, *idx)] = _Obj(lambda: _i32(TRUTH_TRUE))
    objs[(*value_col, 3, *idx)] = _Obj(lambda: _i32(st()))
    objs[(*value_col, 4, *idx)] = _Obj(lambda: _u32(value() * scale))
    objs[(*config_col, 7, *idx)] = _Obj(lambda: _u32(digits))


def raritan_mib(
    pdu: PduState, started: float, loop: asyncio.AbstractEventLoop, timers: set[asyncio.TimerHandle]
) -> dict[Oid, _Obj]:
    """PDU2-MIB for one PDU (pduId 1) with one three-phase inlet (inletId 1, poles 1..3)."""
    objs = _system_group(pdu, started, f"Raritan PX3 {pdu.model}", RARITAN_PDU2)
    pdu_id = 1
    inlet_val = (*RARITAN_PDU2, 5, 2, 3, 1)  # measurementsInletSensorEntry
    inlet_cfg = (*RARITAN_PDU2, 3, 3, 4, 1)  # inletSensorConfigurationEntry
    pole_val = (*RARITAN_PDU2, 5, 3, 3, 1)  # measurementsInletPoleSensorEntry
    pole_cfg = (*RARITAN_PDU2, 3, 3, 6, 1)  # inletPoleSensorConfigurationEntry
    outlet_val = (*RARITAN_PDU2, 5, 4, 3, 1)  # measurementsOutletSensorEntry
    outlet_cfg = (*RARITAN_PDU2, 3, 5, 4, 1)  # outletSensorConfigurationEntry
    switch_ctl = (*RARITAN_PDU2, 4, 1, 2, 1)  # outletSwitchControlEntry

    def add(col: Oid, cfg: Oid, index: Oid, sensor: int, value: Callable[[], float]) -> None:
        _raritan_sensor(objs, value_col=col, config_col=cfg, index=index, sensor=sensor, value=value)

    inlet = (pdu_id, 1)
    add(inlet_val, inlet_cfg, inlet, RMS_CURRENT, lambda: max((p.current_a for p in pdu.phases), default=0.0))
    add(inlet_val, inlet_cfg, inlet, RMS_VOLTAGE, lambda: _mean([p.voltage_v for p in pdu.phases]))
    add(inlet_val, inlet_cfg, inlet, ACTIVE_POWER, lambda: pdu.power_w)
    add(inlet_val, inlet_cfg, inlet, APPARENT_POWER, lambda: pdu.apparent_power_va)
    add(inlet_val, inlet_cfg, inlet, POWER_FACTOR, lambda: pdu.power_factor)
    add(inlet_val, inlet_cfg, inlet, ACTIVE_ENERGY, lambda: pdu.energy_wh)

    for p in pdu.phases:
        _raritan_pole(add, col=pole_val, cfg=pole_cfg, index=(pdu_id, 1, p.index), p=p, pdu=pdu)

    for o in pdu.outlets:
        _raritan_outlet(
            objs,
            add,
            col=outlet_val,
            cfg=outlet_cfg,
            switch_ctl=switch_ctl,
            pdu=pdu,
            o=o,
            loop=loop,
            timers=timers,
        )
    return objs


def _raritan_pole(
    add: Callable[[Oid, Oid, Oid, int, Callable[[], float]], None],
    *,
    col: Oid,
    cfg: Oid,
    index: Oid,
    p: PhaseState,
    pdu: PduState,
) -> None:
    add(col, cfg, index, RMS_CURRENT, lambda: p.current_a)
    add(col, cfg, index, RMS_VOLTAGE, lambda: p.voltage_v)
    add(col, cfg, index, ACTIVE_POWER, lambda: p.power_w)
    add(col, cfg, index, APPARENT_POWER, lambda: p.apparent_power_va)
    add(col, cfg, index, POWER_FACTOR, lambda: pdu.power_factor)
    add(col, cfg, index, ACTIVE_ENERGY, lambda: p.energy_wh)


def _raritan_outlet(
    objs: dict[Oid, _Obj],
    add: Callable[[Oid, Oid, Oid, int, Callable[[], float]], None],
    *,
    col: Oid,
    cfg: Oid,
    switch_ctl: Oid,
    pdu: PduState,
    o: OutletState,
    loop: asyncio.AbstractEventLoop,
    timers: set[asyncio.TimerHandle],
) -> None:
    index = (1, o.index)
    phase = next((p for p in pdu.phases if p.index == o.phase), None)
    add(col, cfg, index, RMS_CURRENT, lambda: o.current_a)
    add(col, cfg, index, RMS_VOLTAGE, lambda: phase.voltage_v if phase and o.on else 0.0)
    add(col, cfg, index, ACTIVE_POWER, lambda: o.power_w)
    add(col, cfg, index, APPARENT_POWER, lambda: o.power_w / pdu.power_factor if pdu.power_factor else 0.0)
    add(col, cfg, index, POWER_FACTOR, lambda: pdu.power_factor)
    add(col, cfg, index, ACTIVE_ENERGY, lambda: o.energy_wh)

    def on_state() -> int:
        return RARITAN_STATE_ON if o.on else RARITAN_STATE_OFF

    _raritan_sensor(
        objs, value_col=col, config_col=cfg, index=index, sensor=ON_OFF, value=lambda: 0.0, state=on_state
    )

    switch = _outlet_switcher(pdu, o, loop, timers)

    def operate(value: int) -> None:
        if value == RARITAN_OFF:
            switch(False, False)
        elif value == RARITAN_ON:
            switch(True, False)
        elif value == RARITAN_CYCLE:
            switch(False, True)
        else:
            raise ValueError(f"switchingOperation {value}")

    objs[(*switch_ctl, 2, *index)] = _Obj(lambda: _i32(RARITAN_ON if o.on else RARITAN_OFF), operate)
    objs[(*switch_ctl, 3, *index)] = _Obj(lambda: _i32(on_state()))  # outletSwitchingState


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


_MIBS = {"apc": apc_mib, "raritan": raritan_mib}


# ---------------------------------------------------------------------------------------------
# Transport with the fault hooks


class _SimUdpTransport(udp.UdpAsyncioTransport):  # type: ignore[misc]
    """UDP server transport that honours ``pdu.unresponsive`` and ``handle.delay_s``."""

    def __init__(self, handle: SnmpAgentHandle) -> None:
        super().__init__()
        self._handle = handle
        self.ready = asyncio.Event()
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.ready.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.lost.set()  # the socket is closed now: the port is free

    def datagram_received(self, datagram: bytes, address: Any) -> None:
        h = self._handle
        if h.pdu.unresponsive or h.closed:
            h.dropped += 1
            return
        delay = max(h.delay_s, h.pdu.response_delay_s)
        if delay > 0:
            timer: asyncio.TimerHandle

            def later() -> None:
                h.timers.discard(timer)
                if not h.closed:
                    self._dispatch(datagram, address)

            timer = self.loop.call_later(delay, later)
            h.timers.add(timer)
            return
        self._dispatch(datagram, address)

    def _dispatch(self, datagram: bytes, address: Any) -> None:
        fast = self._handle.fast
        answer = fast.answer(datagram) if fast is not None else None
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, address)
            return
        super().datagram_received(datagram, address)  # pysnmp: SET, discovery, errors


class SnmpAgentHandle:
    """A running simulated PDU agent. ``port`` is the bound port; ``close()`` frees it."""

    def __init__(
        self,
        pdu: PduState,
        *,
        host: str,
        version: str,
        community: str,
        v3_user: str | None,
        v3_auth_key: str | None,
        v3_priv_key: str | None,
    ) -> None:
        self.pdu = pdu
        self.host = host
        self.port = 0
        self.version = version
        self.community = community
        self.v3_user = v3_user
        self.v3_auth_key = v3_auth_key
        self.v3_priv_key = v3_priv_key
        # Seconds every answer is held back (a slow agent); 0 = answer at once.
        self.delay_s = 0.0
        self.dropped = 0  # datagrams dropped while unresponsive
        self.closed = False
        self.timers: set[asyncio.TimerHandle] = set()
        self.engine: Any = None
        self.mib: PduMib | None = None
        # GET/GETNEXT/GETBULK answered from encoded varbinds (snmp_wire); None until started.
        self.fast: FastResponder | None = None
        self._transport: _SimUdpTransport | None = None

    def manifest_entry(self) -> dict[str, object]:
        """The hwsim manifest entry (design.md) for this agent."""
        entry: dict[str, object] = {
            "device": self.pdu.id,
            "vendor": self.pdu.vendor,
            "host": self.host,
            "port": self.port,
            "version": self.version,
        }
        if self.version == "3":
            entry |= {
                "user": self.v3_user,
                "auth_protocol": "SHA",
                "auth_key": self.v3_auth_key,
                "priv_protocol": "AES",
                "priv_key": self.v3_priv_key,
            }
        else:
            entry["community"] = self.community
        return entry

    async def wait_closed(self) -> None:
        """After ``close()``: returns once the socket is closed (asyncio closes it a loop turn later)."""
        if self._transport is not None and self._transport.ready.is_set():
            await self._transport.lost.wait()

    async def aclose(self) -> None:
        """``close()`` and wait until the port is free (to rebind the same port at once)."""
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        """Stop answering and free the UDP port (idempotent; the socket closes on the next loop turn)."""
        if self.closed:
            return
        self.closed = True
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        if self.engine is not None:
            self.engine.close_dispatcher()
            self.engine = None


async def start_snmp_agent(
    pdu: PduState,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    version: str = "2c",
    community: str = "public",
    v3_user: str | None = None,
    v3_auth_key: str | None = None,
    v3_priv_key: str | None = None,
    generation: Callable[[], object] | None = None,
) -> SnmpAgentHandle:
    """Start an SNMP agent serving ``pdu`` on UDP ``host:port`` (0 = a free port) in this loop.

    ``generation`` (hwsim's tick counter): answers are encoded once per value it returns, so that
    an agent polled many times a tick encodes each value once; None = every request reads the
    state afresh (always live, for tests that change the state under a running agent).
    """
    if pdu.vendor not in _MIBS:
        raise ValueError(f"{pdu.id}: no SNMP MIB for vendor {pdu.vendor!r} (have: {', '.join(_MIBS)})")
    if version not in ("2c", "3"):
        raise ValueError(f"{pdu.id}: SNMP version must be '2c' or '3', not {version!r}")
    if version == "3" and not (v3_user and v3_auth_key and v3_priv_key):
        raise ValueError(f"{pdu.id}: SNMPv3 needs v3_user, v3_auth_key and v3_priv_key")
    if version == "3" and (len(v3_auth_key or "") < 8 or len(v3_priv_key or "") < 8):
        raise ValueError(f"{pdu.id}: SNMPv3 keys need at least 8 characters (RFC 3414)")

    loop = asyncio.get_running_loop()
    handle = SnmpAgentHandle(
        pdu,
        host=host,
        version=version,
        community=community,
        v3_user=v3_user,
        v3_auth_key=v3_auth_key,
        v3_priv_key=v3_priv_key,
    )

    # Bind the socket ourselves: a port in use fails here, with the port named, not later in a task.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        reason = "address already in use" if err.errno == errno.EADDRINUSE else err.strerror
        raise OSError(err.errno, f"SNMP agent for {pdu.id}: cannot bind UDP {host}:{port}: {reason}") from err
    sock.setblocking(False)
    handle.port = sock.getsockname()[1]

    snmp_engine = engine.SnmpEngine()
    handle.engine = snmp_engine
    try:
        transport = _SimUdpTransport(handle)
        handle._transport = transport
        config.add_transport(snmp_engine, udp.DOMAIN_NAME, transport.open_server_mode(sock=sock))
        # The dispatcher's housekeeping tick (cache expiry) need not run 10 times a second for an
        # agent: once a second keeps 32 idle agents at ~no CPU.
        snmp_engine.transport_dispatcher.set_timer_resolution(1.0)
        await transport.ready.wait()

        if version == "3":
            config.add_v3_user(
                snmp_engine,
                v3_user,
                config.USM_AUTH_HMAC96_SHA,
                v3_auth_key,
                config.USM_PRIV_CFB128_AES,
                v3_priv_key,
            )
            config.add_vacm_user(snmp_engine, 3, v3_user, "authPriv", (1, 3, 6), (1, 3, 6))
        else:
            config.add_v1_system(snmp_engine, "hwsim-area", community)
            config.add_vacm_user(snmp_engine, 2, "hwsim-area", "noAuthNoPriv", (1, 3, 6), (1, 3, 6))

        # Which objects are writable is the MIB's business (PduMib.write_variables): the VACM write
        # view is the whole tree so a SET on a read-only object answers notWritable, as real agents do.
        mib = PduMib(_MIBS[pdu.vendor](pdu, time.monotonic(), loop, handle.timers))
        handle.mib = mib
        snmp_context = context.SnmpContext(snmp_engine)
        snmp_context.unregister_context_name(b"")
        snmp_context.register_context_name(b"", mib)
        cmdrsp.GetCommandResponder(snmp_engine, snmp_context)
        cmdrsp.NextCommandResponder(snmp_engine, snmp_context)
        cmdrsp.BulkCommandResponder(snmp_engine, snmp_context)
        cmdrsp.SetCommandResponder(snmp_engine, snmp_context)

        cache = VarbindCache(mib.getters, generation)
        mib.on_write = cache.invalidate
        usm = None
        if version == "3":
            assert v3_user and v3_auth_key and v3_priv_key
            boots, engine_time = _engine_clock(snmp_engine)
            usm = UsmFast(
                user=v3_user.encode(),
                auth_key=v3_auth_key.encode(),
                priv_key=v3_priv_key.encode(),
                engine_id=bytes(snmp_engine.snmpEngineID),
                boots=boots,
                engine_time=engine_time,
            )
        handle.fast = FastResponder(cache, community=community.encode() if version == "2c" else None, usm=usm)
    except BaseException:
        handle.close()
        sock.close()
        raise
    return handle


def _engine_clock(snmp_engine: Any) -> tuple[Callable[[], int], Callable[[], int]]:
    """snmpEngineBoots and snmpEngineTime as pysnmp's engine reports them (discovery goes through
    pysnmp; the fast path must then speak with the same clock)."""
    mib_builder = snmp_engine.get_mib_builder()
    (boots, etime) = mib_builder.import_symbols("__SNMP-FRAMEWORK-MIB", "snmpEngineBoots", "snmpEngineTime")
    return (lambda: int(boots.syntax)), (lambda: int(etime.syntax.clone()))


__all__ = ["PduMib", "SnmpAgentHandle", "start_snmp_agent", "to_pysnmp"]
