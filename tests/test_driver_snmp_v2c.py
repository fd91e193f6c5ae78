"""podagent's own SNMPv2c client (agent/drivers/snmp_v2c.py): its BER against hwsim's encoder,
hostile bytes, and its timeouts and retries against a real UDP socket.

The readings it gives through the driver are compared with net-snmp's and pysnmp's in
test_driver_snmp_transport.py (same PDU, same readings)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.drivers.snmp_transport import Special, TransportError, TransportTimeout
from agent.drivers.snmp_v2c import (
    Malformed,
    NativeV2cTransport,
    decode_oid,
    decode_response,
    encode_oid,
    response_id,
)
from hwsim import snmp_wire as wire
from tests.fuzz.conftest import FUZZ

oids = st.tuples(st.integers(0, 2), st.integers(0, 39)).flatmap(
    lambda head: st.lists(st.integers(0, 2**32 - 1), max_size=14).map(lambda rest: (*head, *rest))
)
APC_OUTLET_POWER = (1, 3, 6, 1, 4, 1, 318, 1, 1, 26, 9, 4, 3, 1, 7)


def response(request_id: int, binds: list[bytes], status: int = 0, index: int = 0) -> bytes:
    """A v2c Response message by hwsim's own encoder (the server side of the wire)."""
    pdu = wire.tlv(
        0xA2,
        wire.enc_int(0x02, request_id)
        + wire.enc_int(0x02, status)
        + wire.enc_int(0x02, index)
        + wire.tlv(0x30, b"".join(binds)),
    )
    return wire.tlv(0x30, wire.enc_int(0x02, 1) + wire.tlv(0x04, b"public") + pdu)


def bind(oid: tuple[int, ...], value: bytes) -> bytes:
    return wire.tlv(0x30, wire.enc_oid(oid) + value)


@given(oid=oids)
def test_oid_round_trip(oid: tuple[int, ...]) -> None:
    assert decode_oid(encode_oid(oid)) == oid
    assert wire.enc_oid(oid)[2:] == encode_oid(oid)  # the bytes hwsim's encoder writes


def test_every_value_type_decodes_like_the_other_transports() -> None:
    binds = [
        bind((*APC_OUTLET_POWER, 1), wire.enc_int(0x02, 1355)),
        bind((*APC_OUTLET_POWER, 2), wire.enc_int(0x02, -40)),
        bind((*APC_OUTLET_POWER, 3), wire.enc_int(0x42, 2**32 - 1)),  # Gauge32, top bit set
        bind((*APC_OUTLET_POWER, 4), wire.enc_int(0x43, 12345)),  # TimeTicks
        bind((*APC_OUTLET_POWER, 5), wire.tlv(0x46, (2**64 - 1).to_bytes(9, "big"))),  # Counter64
        bind((*APC_OUTLET_POWER, 6), wire.tlv(0x04, b"rack-3 \xff")),
        bind((*APC_OUTLET_POWER, 7), wire.enc_oid((1, 3, 6, 1, 4, 1, 318))),
        bind((*APC_OUTLET_POWER, 8), b"\x80\x00"),
        bind((*APC_OUTLET_POWER, 9), b"\x81\x00"),
        bind((1, 3, 6, 1, 4, 1, 318, 2**31), b"\x82\x00"),
    ]
    msg = response(0x01020304, binds, status=0, index=0)
    assert response_id(msg) == 0x01020304
    known: dict[bytes, tuple[int, ...]] = {}
    got = decode_response(msg, known)
    assert got.error_status == 0 and got.error_index == 0
    assert [v for _, v in got.varbinds] == [
        1355, -40, 2**32 - 1, 12345, 2**64 - 1, "rack-3 \ufffd", "1.3.6.1.4.1.318",
        Special.NO_SUCH_OBJECT, Special.NO_SUCH_INSTANCE, Special.END_OF_MIB_VIEW,
    ]  # fmt: skip
    assert got.varbinds[0][0] == (*APC_OUTLET_POWER, 1)
    assert got.varbinds[-1][0] == (1, 3, 6, 1, 4, 1, 318, 2**31)
    # The OIDs are remembered: the second answer with the same rows decodes to the same tuples.
    assert len(known) == len(binds)
    assert decode_response(msg, known) == got


def test_error_status_and_index_come_through() -> None:
    msg = response(0x01000000, [bind((1, 3, 6, 1, 2, 1, 1, 5, 0), b"\x05\x00")], status=17, index=1)
    got = decode_response(msg, {})
    assert (got.error_status, got.error_index) == (17, 1)


@pytest.mark.parametrize(
    "value",
    [b"\x02\x00", b"\x41\x00", b"\x02\x05\x01", b"\x30\x80"],  # empty INTEGER / Counter32, overruns
)
def test_malformed_varbinds_are_refused_whole(value: bytes) -> None:
    good = bind((*APC_OUTLET_POWER, 1), wire.enc_int(0x02, 7))
    with pytest.raises(Malformed):
        decode_response(response(0x01000000, [good, bind((*APC_OUTLET_POWER, 2), value)]), {})


@FUZZ
@given(
    data=st.binary(max_size=120) | st.builds(lambda n, b: (n, b), st.integers(0, 200), st.binary(max_size=3))
)
def test_hostile_bytes_never_raise_anything_but_malformed(data: bytes | tuple[int, bytes]) -> None:
    if isinstance(data, tuple):  # a valid answer cut short or with bytes spliced in
        cut, extra = data
        valid = response(0x01000000, [bind((*APC_OUTLET_POWER, i), wire.enc_int(0x02, i)) for i in (1, 2, 3)])
        data = valid[:cut] + extra + valid[cut + len(extra) :]
    assert response_id(data) is None or isinstance(response_id(data), int)
    try:
        got = decode_response(data, {})
    except Malformed:
        return
    for oid, value in got.varbinds:
        assert isinstance(oid, tuple) and all(isinstance(x, int) for x in oid)
        assert isinstance(value, int | str | Special)


class _Agent(asyncio.DatagramProtocol):
    """A UDP peer that drops the first ``drop`` requests and answers the others (or garbage)."""

    def __init__(self, drop: int, garbage: bool = False) -> None:
        self.drop = drop
        self.garbage = garbage
        self.requests = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.requests += 1
        if self.requests <= self.drop:
            return
        # The request-id is the PDU's first INTEGER: 4 bytes after "02 04" (the client's width).
        at = data.index(b"\x02\x04", data.index(b"\xa5")) + 2
        rid = int.from_bytes(data[at : at + 4], "big")
        assert self.transport is not None
        self.transport.sendto(response(rid + 1, []), addr)  # another request's answer: ignored
        if self.garbage:
            # Ours by its request-id, but an INTEGER with no content bytes.
            self.transport.sendto(response(rid, [bind((*APC_OUTLET_POWER, 1), b"\x02\x00")]), addr)
        else:
            self.transport.sendto(response(rid, [bind((*APC_OUTLET_POWER, 1), wire.enc_int(0x02, 9))]), addr)


async def _client_and_agent(
    drop: int, retries: int, garbage: bool = False
) -> tuple[NativeV2cTransport, _Agent]:
    loop = asyncio.get_running_loop()
    _, agent = await loop.create_datagram_endpoint(
        lambda: _Agent(drop, garbage), local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    assert agent.transport is not None
    port = agent.transport.get_extra_info("sockname")[1]
    return await NativeV2cTransport.create("127.0.0.1", port, "public", 0.2, retries), agent


async def test_a_retry_gets_the_answer_a_lost_request_did_not() -> None:
    client, agent = await _client_and_agent(drop=1, retries=1)
    try:
        got = await client.bulk([APC_OUTLET_POWER], 5)
        assert got.varbinds == [((*APC_OUTLET_POWER, 1), 9)]
        assert agent.requests == 2
    finally:
        client.close()
        assert agent.transport is not None
        agent.transport.close()


async def test_no_answer_within_timeout_and_retries_is_a_timeout() -> None:
    client, agent = await _client_and_agent(drop=10, retries=1)
    try:
        with pytest.raises(TransportTimeout):
            await client.bulk([APC_OUTLET_POWER], 5)
        assert agent.requests == 2  # the first try and one retry, nothing more
        # The transport is usable again at once: the next request is answered.
        agent.drop = 0
        assert (await client.bulk([APC_OUTLET_POWER], 5)).varbinds
    finally:
        client.close()
        assert agent.transport is not None
        agent.transport.close()


async def test_a_malformed_answer_to_our_request_is_an_error_not_a_value() -> None:
    client, agent = await _client_and_agent(drop=0, retries=0, garbage=True)
    try:
        with pytest.raises(TransportError, match="malformed"):
            await client.bulk([APC_OUTLET_POWER], 5)
    finally:
        client.close()
        assert agent.transport is not None
        agent.transport.close()
