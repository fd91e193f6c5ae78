"""The Modbus driver against hwsim's Modbus servers: real Modbus TCP on loopback and real RTU
frames through a socat pseudo-terminal pair."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import PROFILE_DIR, ModbusDevice
from agent.drivers.base import DeviceError, DeviceUnavailable, driver_class
from agent.drivers.modbus import ModbusDriver, ModbusPoint, load_profile, plan_reads
from agent.model import Quality, Reading
from hwsim.modbus_devices import ModbusHandle, start_modbus_rtu_bus, start_modbus_tcp
from hwsim.state import (
    CDU_ALARM_LEAK,
    CDU_ALARM_PUMP_FAULT,
    CHILLER_ALARM_TRIP,
    CduState,
    ChillerState,
    OutletState,
    PduState,
    PhaseState,
)

needs_socat = pytest.mark.skipif(not shutil.which("socat"), reason="needs socat")

State = CduState | ChillerState | PduState


def make_cdu(id: str = "cdu-1") -> CduState:
    return CduState(
        id=id,
        setpoint_c=28.5,
        supply_temp_c=31.4,
        return_temp_c=38.9,
        facility_supply_temp_c=18.2,
        facility_return_temp_c=27.5,
        dew_point_c=-2.5,  # signed int16: a dry winter room
        flow_lpm=7123.4,  # > 6553.5: needs both words of the 32-bit register
        supply_pressure_kpa=210.0,
        return_pressure_kpa=145.5,
        pump_running=True,
        pump_speed_pct=72.5,
        pump_fault=True,
        leak=True,
        reservoir_level_pct=88.1,
        heat_removed_kw=42.5,
        alarms=CDU_ALARM_PUMP_FAULT | CDU_ALARM_LEAK,
    )


def make_chiller(id: str = "chiller-1") -> ChillerState:
    return ChillerState(
        id=id,
        running=False,
        tripped=True,
        setpoint_c=12.5,
        supply_temp_c=16.8,
        return_temp_c=22.1,
        capacity_kw=350.0,
        load_kw=7000.7,
        compressor_pct=63.2,
        alarms=CHILLER_ALARM_TRIP,
    )


def make_pdu(id: str = "mpdu-1") -> PduState:
    return PduState(
        id=id,
        vendor="modbus",
        model="branch-meter",
        rating_a=32.0,
        phases=[
            PhaseState(i, voltage_v=229.5 + i, current_a=10.25 * i, power_w=2300.5 * i) for i in (1, 2, 3)
        ],
        outlets=[
            OutletState(i, f"o{i}", (i - 1) % 3 + 1, on=i != 4, current_a=1.25 * i, power_w=280.0 + i)
            for i in range(1, 9)
        ],
        power_w=13803.0,
        apparent_power_va=14085.0,
        energy_wh=4_000_123_456.0,  # close to the uint32 top: the high word matters
    )


def expected(state: State) -> dict[str, float]:
    """The value every profile metric must read, taken from the state by hand."""
    if isinstance(state, CduState):
        names = [
            "setpoint_c",
            "supply_temp_c",
            "return_temp_c",
            "facility_supply_temp_c",
            "facility_return_temp_c",
            "dew_point_c",
            "flow_lpm",
            "supply_pressure_kpa",
            "return_pressure_kpa",
            "pump_speed_pct",
            "reservoir_level_pct",
            "heat_removed_kw",
            "alarms",
        ]
        out = {n: float(getattr(state, n)) for n in names}
        out |= {"pump_running": 1.0, "pump_fault": 1.0, "leak": 1.0, "diff_pressure_kpa": 64.5}
        return out
    if isinstance(state, ChillerState):
        names = ["setpoint_c", "supply_temp_c", "return_temp_c", "capacity_kw", "load_kw", "compressor_pct"]
        return {n: float(getattr(state, n)) for n in names} | {
            "running": 0.0,
            "tripped": 1.0,
            "alarms": float(CHILLER_ALARM_TRIP),
        }
    out = {
        "power_w": state.power_w,
        "apparent_power_va": state.apparent_power_va,
        "energy_wh": state.energy_wh,
    }
    for p in state.phases:
        out |= {f"phase{p.index}_voltage_v": p.voltage_v, f"phase{p.index}_current_a": p.current_a}
        out[f"phase{p.index}_power_w"] = p.power_w
    for o in state.outlets:
        out |= {f"outlet{o.index}_current_a": o.current_a, f"outlet{o.index}_power_w": o.power_w}
        out[f"outlet{o.index}_on"] = 1.0 if o.on else 0.0
    return out


CASES: list[tuple[str, Callable[[], State]]] = [
    ("generic-cdu", make_cdu),
    ("generic-chiller", make_chiller),
    ("modbus-pdu", make_pdu),
]


def tcp_cfg(h: ModbusHandle, profile: str, **kw: Any) -> ModbusDevice:
    base: dict[str, Any] = {"timeout_s": 0.5, "retries": 0}
    return ModbusDevice(
        id=kw.pop("id", "dev"), kind="modbus", profile=profile, host="127.0.0.1", port=h.port, **(base | kw)
    )


def rtu_cfg(h: ModbusHandle, profile: str, unit: int, **kw: Any) -> ModbusDevice:
    base: dict[str, Any] = {"timeout_s": 0.3, "retries": 0}
    return ModbusDevice(
        id=kw.pop("id", f"unit{unit}"),
        kind="modbus",
        profile=profile,
        transport="rtu",
        serial=h.serial_path,
        unit=unit,
        **(base | kw),
    )


def check_all_good(readings: list[Reading], state: State, profile: str) -> None:
    want = expected(state)
    assert {r.metric for r in readings} == {p.metric for p in load_profile(profile).points} == set(want)
    for r in readings:
        assert r.quality is Quality.GOOD, r
        assert r.device == state.id
        # float32 points carry ~7 significant digits; scaled integers are exact to their scale.
        assert r.value == pytest.approx(want[r.metric], rel=1e-6, abs=1e-9), r.metric


@pytest.fixture
async def served() -> AsyncIterator[list[ModbusHandle]]:
    handles: list[ModbusHandle] = []
    yield handles
    for h in handles:
        await h.close()


# ---------------------------------------------------------------------------- reading profiles


@pytest.mark.parametrize(("profile", "make"), CASES)
async def test_reads_every_metric_over_tcp(
    served: list[ModbusHandle], profile: str, make: Callable[[], State]
) -> None:
    state = make()
    h = await start_modbus_tcp(state, profile=profile, unit=4)
    served.append(h)
    drv = driver_class("modbus")(tcp_cfg(h, profile, id=state.id, unit=4))
    assert isinstance(drv, ModbusDriver)
    await drv.open()
    try:
        readings = await drv.poll()
        check_all_good(readings, state, profile)
        # Few reads: one per contiguous run of the map, far fewer than metrics.
        assert h.requests[4] == len(drv.blocks) < len(readings)
    finally:
        await drv.close()


@needs_socat
async def test_reads_every_profile_over_one_rtu_line(served: list[ModbusHandle], tmp_path: Path) -> None:
    states = {10 + i: make() for i, (_, make) in enumerate(CASES)}
    units = {uid: (states[uid], CASES[i][0]) for i, uid in enumerate(states)}
    h = await start_modbus_rtu_bus(units, link_dir=tmp_path)
    served.append(h)
    drivers = [ModbusDriver(rtu_cfg(h, prof, uid, id=st.id)) for uid, (st, prof) in units.items()]
    for d in drivers:
        await d.open()
    try:
        # One serial client and one lock for the whole line.
        assert len({id(d._line) for d in drivers}) == 1
        results = await asyncio.gather(*(d.poll() for d in drivers))
        for (uid, (st, prof)), readings in zip(units.items(), results, strict=True):
            check_all_good(readings, st, prof)
            assert h.requests[uid] == len(plan_reads(load_profile(prof).points, 60))
    finally:
        for d in drivers:
            await d.close()


# ---------------------------------------------------------------------------------- coalescing


def test_plan_reads_splits_at_gaps_and_limits() -> None:
    points = load_profile("generic-cdu").points
    blocks = plan_reads(points, 60)
    layout = [(b.table, b.address, b.count) for b in blocks]
    assert layout == [
        ("discrete", 0, 2),
        ("holding", 0, 2),
        ("input", 900, 5),  # 30901-30905, then the reserved 30906-30907
        ("input", 907, 2),  # the 32-bit flow
        ("input", 910, 3),
        ("input", 914, 1),
        ("input", 920, 2),
        ("input", 1099, 2),
    ]
    # A tight per-device limit splits runs but never splits a 32-bit value.
    small = plan_reads(points, 2)
    assert all(b.count <= 2 for b in small)
    assert ("input", 900, 2) in [(b.table, b.address, b.count) for b in small]
    assert sum(len(b.points) for b in small) == len(points)
    with pytest.raises(ValueError, match="wider"):
        plan_reads([ModbusPoint(metric="x", table="input", address=0, type="uint32")], 1)


async def test_max_registers_per_read_is_obeyed(served: list[ModbusHandle]) -> None:
    pdu = make_pdu()
    h = await start_modbus_tcp(pdu, profile="modbus-pdu")
    served.append(h)
    drv = ModbusDriver(tcp_cfg(h, "modbus-pdu", id=pdu.id, max_registers_per_read=4))
    await drv.open()
    try:
        check_all_good(await drv.poll(), pdu, "modbus-pdu")
        # 18 phase registers in 4-register reads (float pairs kept whole) -> 5, 16 outlet
        # registers -> 4, 3 single 32-bit values, 8 coils in one bit read.
        assert h.request_count == len(drv.blocks) == 5 + 4 + 3 + 1
    finally:
        await drv.close()


# ---------------------------------------------------------------------------------- word order


async def test_word_order_override(served: list[ModbusHandle]) -> None:
    cdu = make_cdu()
    h = await start_modbus_tcp(cdu, profile="generic-cdu", word_order="little")  # low word first
    served.append(h)
    right = ModbusDriver(tcp_cfg(h, "generic-cdu", id=cdu.id, word_order="little"))
    wrong = ModbusDriver(tcp_cfg(h, "generic-cdu", id=cdu.id))  # profile default: big
    for d in (right, wrong):
        await d.open()
    try:
        good = {r.metric: r.value for r in await right.poll()}
        assert good["flow_lpm"] == pytest.approx(7123.4)
        assert good["heat_removed_kw"] == pytest.approx(42.5)
        bad = {r.metric: r for r in await wrong.poll()}
        # 71234 = 0x0001_1642: swapped words read as 0x1642_0001 tenths (37 million L/min): past
        # the profile's physical range, so the wrong map shows as an ERROR, not as a flow.
        assert bad["flow_lpm"].value is None and "physical range" in (bad["flow_lpm"].error or "")
        assert {p.metric: p.value for p in await wrong.poll_raw()}["flow_lpm"] == pytest.approx(
            0x16420001 / 10
        )
        assert bad["heat_removed_kw"].value != pytest.approx(42.5)
        assert bad["supply_temp_c"].value == pytest.approx(31.4)  # 16-bit values do not care
        raw = {p.metric: p.raw for p in await right.poll_raw()}
        assert raw["flow_lpm"] == [0x1642, 0x0001]
        assert raw["supply_temp_c"] == [314]
    finally:
        for d in (right, wrong):
            await d.close()


# ---------------------------------------------------------------------------------- faults


async def test_busy_is_device_error_and_unresponsive_is_unavailable(served: list[ModbusHandle]) -> None:
    chiller = make_chiller()
    h = await start_modbus_tcp(chiller, profile="generic-chiller")
    served.append(h)
    drv = ModbusDriver(tcp_cfg(h, "generic-chiller", id=chiller.id, timeout_s=0.3))
    await drv.open()
    try:
        chiller.busy = True
        with pytest.raises(DeviceError, match=r"modbus exception 6 \(device busy\)"):
            await drv.poll()
        chiller.busy = False
        chiller.unresponsive = True
        sent = h.request_count
        with pytest.raises(DeviceUnavailable, match="timeout"):
            await drv.poll()
        # It stopped at the first silent request instead of paying a timeout per block.
        assert h.request_count - sent == 1
        chiller.unresponsive = False
        check_all_good(await drv.poll(), chiller, "generic-chiller")
    finally:
        await drv.close()


async def test_refused_connection_is_unavailable() -> None:
    cdu = make_cdu()
    h = await start_modbus_tcp(cdu, profile="generic-cdu")
    port = h.port
    await h.close()  # nothing listens there now
    drv = ModbusDriver(
        ModbusDevice(
            id="gone", kind="modbus", profile="generic-cdu", host="127.0.0.1", port=port, timeout_s=0.5
        )
    )
    await drv.open()
    try:
        with pytest.raises(DeviceUnavailable):
            await drv.poll()
    finally:
        await drv.close()


async def test_one_bad_block_gives_error_readings_not_zeros(
    served: list[ModbusHandle], tmp_path: Path
) -> None:
    # A profile that maps one register the unit does not have (a wrong map for this firmware).
    text = (PROFILE_DIR / "generic-chiller.toml").read_text()
    text += '\n[[points]]\nmetric = "bogus_c"\ntable = "input"\naddress = 700\ntype = "int16"\n'
    prof = tmp_path / "chiller-plus.toml"
    prof.write_text(text)
    chiller = make_chiller()
    h = await start_modbus_tcp(chiller, profile="generic-chiller")
    served.append(h)
    drv = ModbusDriver(tcp_cfg(h, str(prof), id=chiller.id))
    await drv.open()
    try:
        readings = {r.metric: r for r in await drv.poll()}
        bogus = readings.pop("bogus_c")
        assert bogus.value is None and bogus.quality is Quality.ERROR
        assert bogus.error == "modbus exception 2 (illegal data address)"
        assert all(r.quality is Quality.GOOD for r in readings.values())
        assert readings["load_kw"].value == pytest.approx(7000.7)
    finally:
        await drv.close()


@needs_socat
async def test_dead_unit_on_shared_rtu_line_loses_no_other_readings(
    served: list[ModbusHandle], tmp_path: Path
) -> None:
    cdu, chiller = make_cdu(), make_chiller()
    h = await start_modbus_rtu_bus(
        {1: (cdu, "generic-cdu"), 2: (chiller, "generic-chiller")}, link_dir=tmp_path
    )
    served.append(h)
    good = [
        ModbusDriver(rtu_cfg(h, "generic-cdu", 1, id=cdu.id)),
        ModbusDriver(rtu_cfg(h, "generic-chiller", 2, id=chiller.id)),
    ]
    dead = ModbusDriver(rtu_cfg(h, "generic-cdu", 9, id="cdu-dead"))  # nobody is unit 9
    for d in (*good, dead):
        await d.open()
    try:
        for _ in range(2):  # twice: the line is still usable after the dead unit's timeout
            results = await asyncio.gather(dead.poll(), *(d.poll() for d in good), return_exceptions=True)
            assert isinstance(results[0], DeviceUnavailable)
            check_all_good(results[1], cdu, "generic-cdu")  # type: ignore[arg-type]
            check_all_good(results[2], chiller, "generic-chiller")  # type: ignore[arg-type]
        assert h.requests[9] == 2  # one timeout per poll, not one per block: one frame each
        # A unit that goes silent later: the others still answer.
        chiller.unresponsive = True
        results = await asyncio.gather(*(d.poll() for d in good), return_exceptions=True)
        check_all_good(results[0], cdu, "generic-cdu")  # type: ignore[arg-type]
        assert isinstance(results[1], DeviceUnavailable)
    finally:
        for d in (*good, dead):
            await d.close()


# ---------------------------------------------------------------------------------- writes


async def test_write_point_round_trip(served: list[ModbusHandle]) -> None:
    cdu, pdu = make_cdu(), make_pdu()
    hc = await start_modbus_tcp(cdu, profile="generic-cdu")
    hp = await start_modbus_tcp(pdu, profile="modbus-pdu")
    served += [hc, hp]
    dc = ModbusDriver(tcp_cfg(hc, "generic-cdu", id=cdu.id))
    dp = ModbusDriver(tcp_cfg(hp, "modbus-pdu", id=pdu.id))
    for d in (dc, dp):
        await d.open()
    try:
        assert await dc.write_point("setpoint_c", 26.7) == pytest.approx(26.7)
        assert cdu.setpoint_c == pytest.approx(26.7)
        assert await dc.write_point("pump_speed_pct", 95) == pytest.approx(95.0)
        assert cdu.pump_speed_pct == pytest.approx(95.0)
        assert await dp.write_point("outlet2_on", 0) == 0.0
        assert not pdu.outlets[1].on
        assert await dp.write_point("outlet4_on", 1) == 1.0
        assert pdu.outlets[3].on
    finally:
        for d in (dc, dp):
            await d.close()


@needs_socat
async def test_write_point_over_rtu(served: list[ModbusHandle], tmp_path: Path) -> None:
    chiller = make_chiller()
    h = await start_modbus_rtu_bus({3: (chiller, "generic-chiller")}, link_dir=tmp_path)
    served.append(h)
    drv = ModbusDriver(rtu_cfg(h, "generic-chiller", 3, id=chiller.id))
    await drv.open()
    try:
        assert await drv.write_point("setpoint_c", 14.2) == pytest.approx(14.2)
        assert chiller.setpoint_c == pytest.approx(14.2)
    finally:
        await drv.close()


async def test_bad_writes_refused_before_any_io(served: list[ModbusHandle], tmp_path: Path) -> None:
    cdu = make_cdu()
    h = await start_modbus_tcp(cdu, profile="generic-cdu")
    served.append(h)
    drv = ModbusDriver(tcp_cfg(h, "generic-cdu", id=cdu.id))
    await drv.open()
    try:
        for metric, value in [
            ("setpoint_c", 50.0),  # above the profile's 45 C
            ("setpoint_c", 5.0),
            ("pump_speed_pct", 10.0),
            ("setpoint_c", float("nan")),
            ("supply_temp_c", 30.0),  # a reading, not writable
            ("no_such_metric", 1.0),
        ]:
            with pytest.raises(ValueError, match=metric):
                await drv.write_point(metric, value)
        assert h.request_count == 0
        assert cdu.setpoint_c == 28.5
        # When the device is stricter than the profile, its refusal comes back as exception 3.
        loose = tmp_path / "loose-cdu.toml"
        loose.write_text((PROFILE_DIR / "generic-cdu.toml").read_text().replace("max = 45.0", "max = 60.0"))
        drv2 = ModbusDriver(tcp_cfg(h, str(loose), id=cdu.id))
        await drv2.open()
        with pytest.raises(DeviceError, match=r"modbus exception 3 \(illegal data value\)"):
            await drv2.write_point("setpoint_c", 50.0)
        await drv2.close()
        assert cdu.setpoint_c == 28.5
    finally:
        await drv.close()


# ---------------------------------------------------------------------------------- quirks


async def test_quirks_pause_and_reconnect_per_poll(served: list[ModbusHandle]) -> None:
    chiller = make_chiller()
    h = await start_modbus_tcp(chiller, profile="generic-chiller")
    served.append(h)
    drv = ModbusDriver(
        tcp_cfg(h, "generic-chiller", id=chiller.id, pause_between_requests_s=0.02, reconnect_per_poll=True)
    )
    await drv.open()
    try:
        for _ in range(2):
            t0 = time.monotonic()
            check_all_good(await drv.poll(), chiller, "generic-chiller")
            assert time.monotonic() - t0 >= 0.02 * len(drv.blocks)
        assert len(h.server.active_connections) == 1  # the old connection was closed, not leaked
    finally:
        await drv.close()


def test_profiles_are_valid_and_cover_the_contract() -> None:
    cdu = {p.metric for p in load_profile("generic-cdu").points}
    assert cdu == {
        "supply_temp_c",
        "return_temp_c",
        "facility_supply_temp_c",
        "facility_return_temp_c",
        "flow_lpm",
        "supply_pressure_kpa",
        "return_pressure_kpa",
        "diff_pressure_kpa",
        "pump_running",
        "pump_speed_pct",
        "pump_fault",
        "leak",
        "reservoir_level_pct",
        "heat_removed_kw",
        "setpoint_c",
        "dew_point_c",
        "alarms",
    }
    chiller = {p.metric for p in load_profile("generic-chiller").points}
    assert chiller == {
        "supply_temp_c",
        "return_temp_c",
        "setpoint_c",
        "running",
        "tripped",
        "load_kw",
        "compressor_pct",
        "capacity_kw",
        "alarms",
    }
    writable = {p.metric for p in load_profile("generic-cdu").points if p.writable}
    assert writable == {"setpoint_c", "pump_speed_pct"}
