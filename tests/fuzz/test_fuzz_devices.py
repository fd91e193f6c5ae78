"""Device answers: SNMP varbinds of the wrong type, Modbus registers of any value and short
reads. Every reading is either GOOD with a finite number or ERROR with no value and a reason;
a short read is a clear error (ValueError / DeviceError), never a wrong number."""

from __future__ import annotations

import asyncio
import math
import struct
import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.config import ModbusDevice, SnmpDevice
from agent.drivers.base import DriverError
from agent.drivers.modbus import ModbusDriver, WordOrder, decode_value, decoder
from agent.drivers.modbus import load_profile as modbus_profile
from agent.drivers.snmp import SnmpDriver
from agent.drivers.snmp import load_profile as snmp_profile
from agent.drivers.snmp_transport import Special
from agent.model import Quality, Reading
from tests.fuzz.conftest import FUZZ

SNMP_PROFILES = ["apc-rpdu2", "raritan-pdu2"]
WORD_ORDERS: list[WordOrder] = ["big", "little"]
MODBUS_PROFILES = ["generic-cdu", "generic-chiller", "generic-bms", "generic-site-meter", "modbus-pdu"]
# What a varbind can carry: SNMP integers are at most 64 bits on the wire.
varbind_values = (
    st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=12)
    | st.sampled_from(list(Special))
)


@FUZZ
@given(profile=st.sampled_from(SNMP_PROFILES), data=st.data())
def test_snmp_varbinds_of_any_type(profile: str, data: st.DataObject) -> None:
    cfg = SnmpDevice.model_validate(
        {
            "id": "pdu-a",
            "kind": "snmp",
            "host": "127.0.0.1",
            "port": 161,
            "profile": profile,
            "community": "public",
        }
    )
    driver = SnmpDriver(cfg)
    prof = snmp_profile(profile)
    rows: dict[tuple[str, int], dict[tuple[int, ...], int | str | Special]] = {}
    for m in prof.metrics:
        col = rows.setdefault((m.table, m.column), {})
        for ch in data.draw(st.lists(st.integers(1, 4), max_size=3, unique=True)):
            col[m.index_for(ch)] = data.draw(varbind_values)
    static = {key: {idx: v for idx, v in col.items() if isinstance(v, int)} for key, col in rows.items()}
    for r in driver._readings(list(prof.metrics), rows, static, time.monotonic(), time.time()):
        if r.quality is Quality.GOOD:
            assert r.value is not None and math.isfinite(r.value), r
        else:
            assert r.value is None and r.error, r


@FUZZ
@given(profile=st.sampled_from(MODBUS_PROFILES), data=st.data())
def test_modbus_registers_of_any_value_and_short_reads(profile: str, data: st.DataObject) -> None:
    prof = modbus_profile(profile)
    point = data.draw(st.sampled_from(list(prof.points)))
    words = data.draw(st.lists(st.integers(0, 0xFFFF), max_size=4))
    order: WordOrder = data.draw(st.sampled_from(WORD_ORDERS))
    try:
        value = decode_value(point, words, order)
    except ValueError as err:
        assert len(words) != point.width and str(err)  # a short (or long) read: said so
        return
    assert len(words) == point.width and isinstance(value, float)


@FUZZ
@given(profile=st.sampled_from(MODBUS_PROFILES), data=st.data())
def test_decoder_is_decode_value(profile: str, data: st.DataObject) -> None:
    """The poll's per-point decoders (decided once) say what decode_value says, bit for bit."""
    point = data.draw(st.sampled_from(list(modbus_profile(profile).points)))
    order: WordOrder = data.draw(st.sampled_from(WORD_ORDERS))
    words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=point.width, max_size=point.width))
    offset = data.draw(st.integers(0, 3))
    want = decode_value(point, words, order)
    got = decoder(point, order)([0] * offset + words, offset)
    assert type(got) is float
    assert got == want or (math.isnan(got) and math.isnan(want)), (point.metric, words, order)


@FUZZ
@given(profile=st.sampled_from(MODBUS_PROFILES), data=st.data())
def test_modbus_block_decoding_is_total(profile: str, data: st.DataObject) -> None:
    cfg = ModbusDevice.model_validate(
        {"id": "cdu-1", "kind": "modbus", "host": "127.0.0.1", "port": 502, "profile": profile}
    )
    driver = ModbusDriver(cfg)
    for block, plan in zip(driver.blocks, driver._decode, strict=True):
        words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=block.count, max_size=block.count))
        for d in plan:
            assert isinstance(d.decode(words, d.offset), float), d.metric


@FUZZ
@given(profile=st.sampled_from(MODBUS_PROFILES), order=st.sampled_from(WORD_ORDERS), data=st.data())
def test_block_unpack_is_decode_value(profile: str, order: WordOrder, data: st.DataObject) -> None:
    """A Modbus TCP poll reads each block's answer in place (``unpack_block``: one struct call)
    and scales it in its hot loop: the readings it gives are the ones the per-point decoders give
    for the same registers (values bit for bit; NaN, Inf and out of range the same ERRORs)."""
    cfg = ModbusDevice.model_validate(
        {"id": "dev-1", "kind": "modbus", "host": "127.0.0.1", "profile": profile, "word_order": order}
    )
    driver = ModbusDriver(cfg)
    assert driver._batched
    words = [
        data.draw(st.lists(st.integers(0, 0xFFFF), min_size=b.count, max_size=b.count)) for b in driver.blocks
    ]
    # Answers as a device puts them on the wire, read by each request's own unpack.
    raws: list[tuple[Any, ...]] = []
    for block, request, ws in zip(driver.blocks, driver._requests, words, strict=True):
        if block.table in ("coil", "discrete"):
            wire = sum(1 << k for k, w in enumerate(ws) if w & 1).to_bytes((block.count + 7) // 8, "little")
            ws[:] = [w & 1 for w in ws]
        else:
            wire = struct.pack(f">{block.count}H", *ws)
        assert request.unpack is not None
        raws.append(request.unpack(b"\x00" * 9 + wire, 9))

    async def exchange(requests: list[Any]) -> tuple[list[Any], None]:
        assert len(requests) == len(raws)
        return list(raws), None  # every block answered in full

    async def read_blocks() -> list[list[int] | DriverError]:
        return list(words)

    driver._exchange = exchange  # type: ignore[method-assign]
    driver._read_blocks = read_blocks  # type: ignore[method-assign]
    fast = asyncio.run(driver.poll())  # all good: built in C (_Flat); else point by point
    flat, driver._flat = driver._flat, None
    by_point = asyncio.run(driver.poll())  # point by point whatever the values
    driver._batched = False  # the per-point decoders' path (RTU, paced TCP)
    slow = asyncio.run(driver.poll())
    assert flat is not None  # every shipped profile's scales are exact for the C path

    def strip(r: Reading) -> tuple[Any, ...]:
        return (r.device, r.metric, r.value, r.unit, r.quality, r.error, type(r.value))

    assert [strip(r) for r in fast] == [strip(r) for r in slow] == [strip(r) for r in by_point]
    for r, want in zip(
        fast,
        [
            decode_value(p, ws[p.address - b.address :][: p.width], order)
            for b, ws in zip(driver.blocks, words, strict=True)
            for p in b.points
        ],
        strict=True,
    ):
        if r.quality is Quality.GOOD:
            assert r.value == want and type(r.value) is float, (r, want)
