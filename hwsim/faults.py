"""Fault injection: every fault is a named, clearable change to the running pod.

Physical faults change the physics (a tripped chiller removes no heat); protocol faults set flags the
protocol servers honour (an SNMP agent that stops answering, a Modbus unit answering "busy").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hwsim.physics import Physics
from hwsim.state import BMS_FAULT_OVERTEMP

FAULTS: dict[str, str] = {
    "chiller-trip": "the chiller's compressor trips: facility water warms, then the CDU supply",
    "pump-fail": "the CDU's pump fails: flow drops to zero, GPUs heat up",
    "coolant-leak": "a leak detector on the CDU loop reports a leak; the reservoir drains",
    "gpu-runaway": "one GPU's cold plate fails: its thermal resistance doubles",
    "pdu-overload": "the partner feed fails over: this PDU carries all its servers' load",
    "snmp-timeout": "the PDU's SNMP agent stops answering (requests are dropped)",
    "snmp-slow": "the PDU's SNMP agent answers every request late (--value seconds, default 5)",
    "modbus-exception": "the Modbus unit answers every request with exception 6 (device busy)",
    "modbus-timeout": "the Modbus unit stops answering",
    "gpu-lost": "the GPU falls off the bus: NVML answers NVML_ERROR_GPU_IS_LOST",
    "xid": "the GPU reports an XID error (--value N, default 79); not a lasting fault",
    "bad-value": "one Modbus point serves an untrustworthy value instead of the state's (--point METRIC"
    " --value nan|inf|-inf|garbage|NUMBER); --clear without --point clears every point of the unit",
    "battery-fault": "the BMS reports a fault (--value bitmask, default 1: over-temperature); its"
    " contactor opens: no charge or discharge until cleared",
    "grid-outage": "the grid is lost: the site meter reads 0 and says outage, the BMS islands and"
    " carries the site alone (what it cannot is unserved)",
    "grid-sag": "the grid voltage sags to 70%: meter and BMS say sag, the inverter rides through"
    " carrying the site, the grid supplies only what the battery cannot",
}


class FaultError(ValueError):
    """A fault request that cannot be applied; the message says why."""


@dataclass(frozen=True)
class FaultResult:
    name: str
    device: str
    active: bool
    description: str


def apply_fault(
    physics: Physics,
    name: str,
    device: str | None,
    *,
    clear: bool,
    value: float | str | None = None,
    point: str | None = None,
) -> FaultResult:
    """Inject (or clear) a fault. ``device`` None picks the first device the fault applies to."""
    if name not in FAULTS:
        raise FaultError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}")
    st = physics.state
    on = not clear

    def pick(ids: list[str], kind: str) -> str:
        if device is None:
            if not ids:
                raise FaultError(f"fault {name}: this pod has no {kind}")
            return ids[0]
        if device not in ids:
            raise FaultError(
                f"fault {name}: {device!r} is not a {kind} of this pod (have: {', '.join(ids[:8])})"
            )
        return device

    gpu_ids = [f"gpu{g.index}" for g in st.gpus]
    dev: str
    action: Callable[[], None]
    if name == "chiller-trip":
        dev = pick([c.id for c in st.chillers], "chiller")
        chiller = st.chiller(dev)

        def action() -> None:
            chiller.tripped = on
    elif name in ("pump-fail", "coolant-leak"):
        dev = pick([c.id for c in st.cdus], "CDU")
        cdu = st.cdu(dev)

        def action() -> None:
            if name == "pump-fail":
                cdu.pump_fault = on
            else:
                cdu.leak = on
                if clear:
                    cdu.reservoir_level_pct = 92.0  # leak fixed, loop topped up
    elif name in ("gpu-runaway", "gpu-lost", "xid"):
        dev = pick(gpu_ids, "GPU")
        idx = int(dev.removeprefix("gpu"))

        def action() -> None:
            if name == "gpu-runaway":
                (physics.runaway.add if on else physics.runaway.discard)(idx)
            elif name == "gpu-lost":
                st.gpus[idx].lost = on
            elif on:
                physics.add_xid(idx, int(value) if isinstance(value, int | float) else 79)
    elif name in ("pdu-overload", "snmp-timeout", "snmp-slow"):
        ids = [p.id for p in st.pdus if (p.vendor != "modbus" or name == "pdu-overload")]
        if name == "pdu-overload":
            ids = [p.id for p in st.pdus if physics.partner_of(p.id)]
        dev = pick(ids, "PDU with a partner feed" if name == "pdu-overload" else "SNMP PDU")
        pdu = st.pdu(dev)

        def action() -> None:
            if name == "snmp-timeout":
                pdu.unresponsive = on
            elif name == "snmp-slow":
                pdu.response_delay_s = (
                    (float(value) if isinstance(value, int | float) else 5.0) if on else 0.0
                )
            else:
                (physics.overloaded_pdus.add if on else physics.overloaded_pdus.discard)(dev)
    elif name == "battery-fault":
        bat = st.battery
        dev = pick([bat.id] if bat is not None else [], "battery")
        assert bat is not None

        def action() -> None:
            bat.faults = (int(value) if isinstance(value, int | float) else BMS_FAULT_OVERTEMP) if on else 0
    elif name in ("grid-outage", "grid-sag"):
        meter = st.site_meter
        dev = pick([meter.id] if meter is not None else [], "site meter")

        def action() -> None:
            if name == "grid-outage":
                physics.grid_outage = on
            else:
                physics.grid_sag = on
    else:  # modbus-exception, modbus-timeout, bad-value
        units: dict[str, object] = {c.id: c for c in st.cdus}
        units.update({c.id: c for c in st.chillers})
        units.update({p.id: p for p in st.pdus if p.vendor == "modbus"})
        if st.battery is not None:
            units[st.battery.id] = st.battery
        if st.site_meter is not None:
            units[st.site_meter.id] = st.site_meter
        dev = pick(list(units), "Modbus unit")
        unit = units[dev]
        if name == "bad-value":
            return _bad_value(unit, dev, point, value, clear=clear)

        def action() -> None:
            setattr(unit, "busy" if name == "modbus-exception" else "unresponsive", on)

    action()
    return FaultResult(name=name, device=dev, active=on and name != "xid", description=FAULTS[name])


def _bad_value(unit: object, dev: str, point: str | None, value: object, *, clear: bool) -> FaultResult:
    from hwsim.modbus_codec import parse_bad_value

    bad: dict[str, float | str] = getattr(unit, "bad_values")  # noqa: B009 - every Modbus state has it
    if clear:
        if point is None:
            bad.clear()
        else:
            bad.pop(point, None)
        return FaultResult("bad-value", dev, bool(bad), FAULTS["bad-value"])
    if not point:
        raise FaultError("fault bad-value needs --point METRIC (the profile point to corrupt)")
    if not hasattr(unit, point) and not point.startswith(("phase", "outlet")):
        raise FaultError(f"fault bad-value: {dev} serves no point {point!r}")
    try:
        bad[point] = parse_bad_value(value)
    except ValueError as err:
        raise FaultError(str(err)) from None
    return FaultResult("bad-value", dev, True, FAULTS["bad-value"])
