"""Device answers: SNMP varbinds of the wrong type, Modbus registers of any value and short
reads. Every reading is either GOOD with a finite number or ERROR with no value and a reason;
a short read is a clear error (ValueError / DeviceError), never a wrong number."""

from __future__ import annotations

import math
import time

from hypothesis import given
from hypothesis import strategies as st

from agent.config import ModbusDevice, SnmpDevice
from agent.drivers.modbus import ModbusDriver, WordOrder, decode_value, decoder
from agent.drivers.modbus import load_profile as modbus_profile
from agent.drivers.snmp import SnmpDriver
from agent.drivers.snmp import load_profile as snmp_profile
from agent.drivers.snmp_transport import Special
from agent.model import Quality
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
