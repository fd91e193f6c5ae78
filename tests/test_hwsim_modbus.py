"""hwsim Modbus servers, checked from the outside: Debian's mbpoll (libmodbus) and a plain pymodbus
client, over TCP on loopback and RTU through a socat pseudo-terminal pair."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException

from hwsim.modbus_devices import ModbusHandle, start_modbus_rtu_bus, start_modbus_tcp
from hwsim.state import CduState, ChillerState, OutletState, PduState, PhaseState

pytestmark = pytest.mark.skipif(
    not (shutil.which("mbpoll") and shutil.which("socat")), reason="needs mbpoll and socat"
)


def make_cdu() -> CduState:
    return CduState(
        id="cdu-1",
        supply_temp_c=31.4,
        return_temp_c=38.9,
        facility_supply_temp_c=18.2,
        facility_return_temp_c=27.5,
        dew_point_c=11.3,
        flow_lpm=287.5,
        supply_pressure_kpa=210.0,
        return_pressure_kpa=145.5,
        heat_removed_kw=42.5,
        reservoir_level_pct=88.1,
    )


def make_chiller() -> ChillerState:
    return ChillerState(id="chiller-1", supply_temp_c=16.8, return_temp_c=22.1, load_kw=55.5)


def make_pdu() -> PduState:
    return PduState(
        id="mpdu-1",
        vendor="modbus",
        model="branch-meter",
        rating_a=32.0,
        phases=[PhaseState(i, voltage_v=229.5 + i, current_a=10.25 * i) for i in (1, 2, 3)],
        outlets=[OutletState(i, f"o{i}", (i - 1) % 3 + 1, current_a=1.25 * i) for i in range(1, 9)],
    )


@pytest.fixture
async def cdu_tcp() -> AsyncIterator[tuple[CduState, ModbusHandle]]:
    cdu = make_cdu()
    handle = await start_modbus_tcp(cdu, profile="generic-cdu", unit=3)
    yield cdu, handle
    await handle.close()


@pytest.fixture
async def rtu_bus(tmp_path: Path) -> AsyncIterator[tuple[CduState, ChillerState, ModbusHandle]]:
    cdu, chiller = make_cdu(), make_chiller()
    handle = await start_modbus_rtu_bus(
        {1: (cdu, "generic-cdu"), 2: (chiller, "generic-chiller")}, link_dir=tmp_path, name="bus0"
    )
    yield cdu, chiller, handle
    await handle.close()


async def mbpoll(*args: str) -> tuple[int, str]:
    # Async subprocess: the server under test runs in this very event loop.
    proc = await asyncio.create_subprocess_exec(
        "mbpoll", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def values(output: str) -> dict[int, str]:
    """mbpoll prints one "[ref]: value" line per value."""
    return {int(m[1]): m[2] for m in re.finditer(r"^\[(\d+)\]:\s+(\S+)", output, re.M)}


# ------------------------------------------------------------------------------------------ TCP


async def test_mbpoll_reads_cdu_temperatures_over_tcp(cdu_tcp: tuple[CduState, ModbusHandle]) -> None:
    cdu, h = cdu_tcp
    tcp = ["-m", "tcp", "-p", str(h.port), "-a", "3", "-1", "-o", "1"]
    rc, out = await mbpoll(*tcp, "-t", "3", "-r", "901", "-c", "5", "127.0.0.1")
    assert rc == 0, out
    # Modicon 30901-30905 = supply, return, facility supply, facility return, dew point in tenths.
    assert values(out) == {901: "314", 902: "389", 903: "182", 904: "275", 905: "113"}
    # With -0 mbpoll uses protocol addresses: the same registers are 900..904.
    rc, out = await mbpoll(*tcp, "-0", "-t", "3", "-r", "900", "-c", "2", "127.0.0.1")
    assert rc == 0, out
    assert values(out) == {900: "314", 901: "389"}
    # Flow is a 32-bit tenths-of-L/min value at 30908, high word first (mbpoll -B).
    rc, out = await mbpoll(*tcp, "-B", "-t", "3:int", "-r", "908", "127.0.0.1")
    assert rc == 0, out
    assert values(out) == {908: "2875"}
    # Heat removed: float32 at 30921.
    rc, out = await mbpoll(*tcp, "-B", "-t", "3:float", "-r", "921", "127.0.0.1")
    assert rc == 0, out
    assert float(values(out)[921]) == pytest.approx(42.5)
    # Live: a change in the state shows in the next read, no refresh step.
    cdu.supply_temp_c = 44.0
    rc, out = await mbpoll(*tcp, "-t", "3", "-r", "901", "127.0.0.1")
    assert values(out) == {901: "440"}


async def test_word_order_override_is_served(tmp_path: Path) -> None:
    cdu = make_cdu()
    h = await start_modbus_tcp(cdu, profile="generic-cdu", word_order="little")
    try:
        # mbpoll's default word order is little endian (low word first): no -B.
        tcp = ["-m", "tcp", "-p", str(h.port), "-1", "-o", "1"]
        rc, out = await mbpoll(*tcp, "-t", "3:int", "-r", "908", "127.0.0.1")
        assert rc == 0, out
        assert values(out) == {908: "2875"}
    finally:
        await h.close()


async def test_write_setpoint_changes_state_and_limits(cdu_tcp: tuple[CduState, ModbusHandle]) -> None:
    cdu, h = cdu_tcp
    client = AsyncModbusTcpClient("127.0.0.1", port=h.port, timeout=1, retries=0)
    await client.connect()
    try:
        rr = await client.write_register(0, 273, device_id=3)  # 40001: 27.3 C in tenths
        assert not rr.isError()
        assert cdu.setpoint_c == pytest.approx(27.3)
        rr = await client.read_holding_registers(0, count=2, device_id=3)
        assert rr.registers == [273, 800]
        # 50.0 C is outside CduState.SETPOINT_RANGE: the device refuses, exception 3.
        rr = await client.write_register(0, 500, device_id=3)
        assert rr.isError() and rr.exception_code == 3
        assert cdu.setpoint_c == pytest.approx(27.3)
        rr = await client.write_register(1, 100, device_id=3)  # pump 10 % < 20 % minimum
        assert rr.isError() and rr.exception_code == 3
        assert cdu.pump_speed_pct == 80.0
        rr = await client.write_register(1, 655, device_id=3)
        assert not rr.isError() and cdu.pump_speed_pct == pytest.approx(65.5)
        # Writing a register that is not writable (input table has no write FC; holding 2 unmapped).
        rr = await client.write_register(2, 1, device_id=3)
        assert rr.isError() and rr.exception_code == 2
    finally:
        client.close()


async def test_unmapped_address_answers_exception_2(cdu_tcp: tuple[CduState, ModbusHandle]) -> None:
    _, h = cdu_tcp
    client = AsyncModbusTcpClient("127.0.0.1", port=h.port, timeout=1, retries=0)
    await client.connect()
    try:
        rr = await client.read_input_registers(905, count=1, device_id=3)  # 30906, reserved
        assert rr.isError() and rr.exception_code == 2
        rr = await client.read_input_registers(900, count=10, device_id=3)  # runs into the gap
        assert rr.isError() and rr.exception_code == 2
        rr = await client.read_input_registers(900, count=5, device_id=3)  # right up to it: fine
        assert rr.registers == [314, 389, 182, 275, 113]
        # Asked for a unit this TCP device is not: gateway-style exception 11, not silence.
        rr = await client.read_input_registers(900, count=1, device_id=9)
        assert rr.isError() and rr.exception_code == 11
    finally:
        client.close()


async def test_busy_answers_exception_6_until_cleared(cdu_tcp: tuple[CduState, ModbusHandle]) -> None:
    cdu, h = cdu_tcp
    client = AsyncModbusTcpClient("127.0.0.1", port=h.port, timeout=1, retries=0)
    await client.connect()
    try:
        cdu.busy = True
        rr = await client.read_input_registers(900, count=1, device_id=3)
        assert rr.isError() and rr.exception_code == 6
        rr = await client.write_register(0, 250, device_id=3)  # writes too
        assert rr.isError() and rr.exception_code == 6
        assert cdu.setpoint_c == 30.0
        cdu.busy = False
        rr = await client.read_input_registers(900, count=1, device_id=3)
        assert rr.registers == [314]
    finally:
        client.close()


async def test_unresponsive_unit_never_answers(cdu_tcp: tuple[CduState, ModbusHandle]) -> None:
    cdu, h = cdu_tcp
    client = AsyncModbusTcpClient("127.0.0.1", port=h.port, timeout=0.3, retries=0)
    await client.connect()
    try:
        cdu.unresponsive = True
        with pytest.raises(ModbusIOException):
            await client.read_input_registers(900, count=1, device_id=3)
        assert h.requests[3] == 1  # it was received, just not answered
        cdu.unresponsive = False
        rr = await client.read_input_registers(900, count=1, device_id=3)
        assert rr.registers == [314]
    finally:
        client.close()


async def test_pdu_coils_switch_outlets() -> None:
    pdu = make_pdu()
    h = await start_modbus_tcp(pdu, profile="modbus-pdu")
    client = AsyncModbusTcpClient("127.0.0.1", port=h.port, timeout=1, retries=0)
    await client.connect()
    try:
        rr = await client.write_coil(2, False, device_id=1)  # 00003: outlet 3
        assert not rr.isError()
        assert [o.on for o in pdu.outlets] == [True, True, False, True, True, True, True, True]
        rr = await client.read_coils(0, count=8, device_id=1)
        assert rr.bits[:8] == [True, True, False, True, True, True, True, True]
        rr = await client.write_coil(8, False, device_id=1)  # no outlet 9 on this map
        assert rr.isError() and rr.exception_code == 2
        rr = await client.read_input_registers(6, count=2, device_id=1)  # L1 current float32
        assert not rr.isError()
        rr = await client.read_input_registers(1024, count=2, device_id=1)  # outlet 1 A/100, W
        assert rr.registers == [125, 0]
    finally:
        client.close()
        await h.close()


async def test_port_in_use_raises_oserror_naming_it_and_close_frees_it() -> None:
    h = await start_modbus_tcp(make_cdu(), profile="generic-cdu")
    port = h.port
    assert port
    with pytest.raises(OSError, match=str(port)):
        await start_modbus_tcp(make_chiller(), profile="generic-chiller", port=port)
    assert h.manifest_entries() == [
        {"device": "cdu-1", "host": "127.0.0.1", "port": port, "unit": 1, "profile": "generic-cdu"}
    ]
    await h.close()
    with socket.socket() as s:  # freed: the port can be bound again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


# ------------------------------------------------------------------------------------------ RTU


async def test_mbpoll_reads_two_units_on_one_rtu_line(
    rtu_bus: tuple[CduState, ChillerState, ModbusHandle],
) -> None:
    cdu, chiller, h = rtu_bus
    assert h.serial_path is not None and h.serial_path.exists()
    rtu = ["-m", "rtu", "-b", "19200", "-P", "none", "-1", "-o", "1"]
    rc, out = await mbpoll(*rtu, "-a", "1", "-t", "3", "-r", "901", "-c", "2", str(h.serial_path))
    assert rc == 0, out
    assert values(out) == {901: "314", 902: "389"}
    # Chiller table: 30493 supply, 30494 return (tenths of C).
    rc, out = await mbpoll(*rtu, "-a", "2", "-t", "3", "-r", "493", "-c", "2", str(h.serial_path))
    assert rc == 0, out
    assert values(out) == {493: "168", 494: "221"}
    # Both units in one mbpoll call (it polls the address list in turn).
    rc, out = await mbpoll(*rtu, "-a", "1,2", "-t", "4", "-r", "1", str(h.serial_path))
    assert rc == 0, out
    assert re.findall(r"^\[1\]:\s+(\d+)", out, re.M) == ["300", "200"]  # CDU 30.0, chiller 20.0
    assert cdu.setpoint_c == 30.0 and chiller.setpoint_c == 20.0
    assert h.manifest_entries() == [
        {"device": "cdu-1", "serial": str(h.serial_path), "baud": 19200, "unit": 1, "profile": "generic-cdu"},
        {
            "device": "chiller-1",
            "serial": str(h.serial_path),
            "baud": 19200,
            "unit": 2,
            "profile": "generic-chiller",
        },
    ]


async def test_rtu_unknown_unit_is_silent_and_others_still_answer(
    rtu_bus: tuple[CduState, ChillerState, ModbusHandle],
) -> None:
    cdu, chiller, h = rtu_bus
    rtu = ["-m", "rtu", "-b", "19200", "-P", "none", "-1", "-o", "0.3"]
    rc, out = await mbpoll(*rtu, "-a", "7", "-t", "3", "-r", "901", str(h.serial_path))
    assert rc != 0 and "timed out" in out.lower(), out
    assert h.requests[7] == 1  # the frame reached the line; nobody answered it

    client = AsyncModbusSerialClient(str(h.serial_path), baudrate=19200, timeout=0.3, retries=0)
    assert await client.connect()
    try:
        with pytest.raises(ModbusIOException):
            await client.read_input_registers(900, count=1, device_id=7)
        rr = await client.read_input_registers(900, count=1, device_id=1)
        assert rr.registers == [314]
        rr = await client.write_register(0, 150, device_id=2)  # chiller setpoint 15.0 C
        assert not rr.isError() and chiller.setpoint_c == pytest.approx(15.0)
        cdu.busy = True  # a busy unit on the line answers 6; its neighbour is unaffected
        rr = await client.read_input_registers(900, count=1, device_id=1)
        assert rr.isError() and rr.exception_code == 6
        rr = await client.read_input_registers(492, count=1, device_id=2)
        assert rr.registers == [168]
    finally:
        client.close()


async def test_rtu_close_kills_socat(tmp_path: Path) -> None:
    h = await start_modbus_rtu_bus({5: (make_pdu(), "modbus-pdu")}, link_dir=tmp_path)
    socat = h._socat
    assert socat is not None and socat.returncode is None
    pid = socat.pid
    assert psutil.pid_exists(pid)
    await h.close()
    assert socat.returncode is not None
    assert not psutil.pid_exists(pid)  # reaped, no orphan
    await h.close()  # idempotent
