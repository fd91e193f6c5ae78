"""podagent's own SNMPv2c client (agent/drivers/snmp_v2c.py): its BER against hwsim's encoder,
hostile bytes, and its timeouts and retries against a real UDP socket.

The readings it gives through the driver are compared with net-snmp's and pysnmp's in
test_driver_snmp_transport.py (same PDU, same readings)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.drivers.snmp_transport import Response, Special, TransportError, TransportTimeout
from agent.drivers.snmp_v2c import (
    Layout,
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


# ---------------------------------------------------------------------------------------------
# the layout fast path (Layout): an answer with the last one's layout decodes to exactly what the
# full decoder gives; anything else is not matched (and goes through the full decoder).

INT_TAGS = (0x02, 0x41, 0x42, 0x43, 0x46, 0x47)


def int_value(tag: int, x: int) -> bytes:
    """An integer-typed value, x folded into the type's range (signed for INTEGER only)."""
    if tag == 0x02:
        return wire.enc_int(0x02, x if x < 2**31 else x % 2**32 - 2**31)
    if tag == 0x46:  # Counter64: up to 9 bytes
        n = x % 2**64
        body = n.to_bytes(max(1, (n.bit_length() + 8) // 8), "big")
        return wire.tlv(0x46, body)
    return wire.enc_int(tag, x % 2**32)


# One varbind: an integer of some type (value drawn twice: the two answers' values), or a
# fixed non-integer value (a string, an exception, NULL), the same in both answers.
varbind_kinds = st.one_of(
    st.tuples(st.sampled_from(INT_TAGS), st.integers(0, 2**64), st.integers(0, 2**64)),
    st.sampled_from([b"\x80\x00", b"\x81\x00", b"\x82\x00", b"\x05\x00", wire.tlv(0x04, b"rack-3")]),
)


def two_answers(kinds: list[object], rid: int) -> tuple[bytes, bytes, bool]:
    """Two answers with the same names and types (request-ids rid, rid + 1), and whether every
    integer has the same number of bytes in both."""
    first: list[bytes] = []
    second: list[bytes] = []
    same_sizes = True
    for i, kind in enumerate(kinds, 1):
        oid = (*APC_OUTLET_POWER, i)
        if isinstance(kind, tuple):
            tag, a, b = kind
            first.append(bind(oid, int_value(tag, a)))
            second.append(bind(oid, int_value(tag, b)))
            same_sizes = same_sizes and len(first[-1]) == len(second[-1])
        else:
            assert isinstance(kind, bytes)
            first.append(bind(oid, kind))
            second.append(bind(oid, kind))
    return response(rid, first), response(rid + 1, second), same_sizes


def layout_of(msg: bytes) -> Layout:
    return Layout(msg, decode_response(msg, {}))


@FUZZ
@given(kinds=st.lists(varbind_kinds, min_size=1, max_size=30))
def test_an_answer_with_the_same_layout_decodes_like_the_full_decoder(kinds: list[object]) -> None:
    first, second, same_sizes = two_answers(kinds, 0x01000000)
    layout = layout_of(first)
    # The answer the layout was made from, and any answer of the same size and skeleton.
    again = layout.match(first, (0x01000000).to_bytes(4, "big"))
    assert again is not None and again.varbinds == decode_response(first, {}).varbinds
    got = layout.match(second, (0x01000001).to_bytes(4, "big"))
    full = decode_response(second, {})
    # Not matched only when some integer needs another number of bytes (lengths change).
    assert (got is not None) == same_sizes
    if got is None:
        return
    assert got.varbinds == full.varbinds
    assert got.layout is layout and (got.error_status, got.error_index) == (0, 0)
    assert all(type(v) is type(w) for (_, v), (_, w) in zip(got.varbinds, full.varbinds, strict=True))


def test_same_sized_integers_always_match() -> None:
    oids = [(*APC_OUTLET_POWER, i) for i in range(1, 6)]
    values = [
        (0x02, 1355, 1344), (0x02, -40, 100), (0x42, 2**32 - 1, 2**31), (0x43, 70000, 80000), (0x41, 5, 6)
    ]  # fmt: skip
    pairs = list(zip(oids, values, strict=True))
    first = response(0x01000000, [bind(o, int_value(t, a)) for o, (t, a, _) in pairs])
    second = response(0x01000000, [bind(o, int_value(t, b)) for o, (t, _, b) in pairs])
    got = layout_of(first).match(second, (0x01000000).to_bytes(4, "big"))
    assert got is not None
    assert [v for _, v in got.varbinds] == [1344, 100, 2**31, 80000, 6]
    assert [o for o, _ in got.varbinds] == oids


def test_another_request_id_or_another_oid_or_type_is_not_matched() -> None:
    rid = (0x01000000).to_bytes(4, "big")
    layout = layout_of(response(0x01000000, [bind((*APC_OUTLET_POWER, 1), wire.enc_int(0x02, 300))]))

    def one(request_id: int, row: int, value: bytes) -> bytes:
        return response(request_id, [bind((*APC_OUTLET_POWER, row), value)])

    assert layout.match(one(0x01000001, 1, wire.enc_int(0x02, 300)), rid) is None
    assert layout.match(one(0x01000000, 2, wire.enc_int(0x02, 300)), rid) is None
    assert layout.match(one(0x01000000, 1, wire.enc_int(0x42, 300)), rid) is None
    assert layout.match(one(0x01000000, 1, wire.enc_int(0x02, 3)), rid) is None
    assert layout.match(one(0x01000000, 1, wire.enc_int(0x02, 301)), rid) is not None
    no_such = response(0x01000000, [bind((*APC_OUTLET_POWER, 1), b"\x81\x00")])
    assert layout.match(no_such, rid) is None
    error = response(0x01000000, [bind((*APC_OUTLET_POWER, 1), wire.enc_int(0x02, 300))], status=5, index=1)
    assert layout.match(error, rid) is None


@FUZZ
@given(
    kinds=st.lists(varbind_kinds, min_size=1, max_size=12),
    edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 3),
)
def test_hostile_bytes_are_matched_only_as_what_the_full_decoder_reads(
    kinds: list[object], edits: list[tuple[int, int]], cut: int
) -> None:
    """Bytes flipped anywhere in an answer of a known layout (or the answer cut short/extended):
    either not matched, or matched to exactly what decode_response reads from the same bytes:
    never a value the full decoder would have refused."""
    first, second, _ = two_answers(kinds, 0x01000000)
    layout = layout_of(first)
    data = bytearray(second)
    for at, byte in edits:
        data[at % len(data)] = byte
    hostile = bytes(data[: len(data) - cut]) if cut < 2 else bytes(data) + b"\x00" * cut
    got = layout.match(hostile, (0x01000001).to_bytes(4, "big"))
    if got is None:
        return
    full = decode_response(hostile, {})  # must not raise: a matched answer is well-formed
    assert response_id(hostile) == 0x01000001
    assert got.varbinds == full.varbinds


async def test_the_client_takes_the_fast_path_and_still_refuses_garbage() -> None:
    client, agent = await _client_and_agent(drop=0, retries=0)
    try:
        first = await client.bulk([APC_OUTLET_POWER], 5)
        assert isinstance(first.layout, Layout)  # the first answer made the layout
        second = await client.bulk([APC_OUTLET_POWER], 5)
        assert second.layout is first.layout and second.varbinds == [((*APC_OUTLET_POWER, 1), 9)]
        assert first.layout.hits == 1
        # Same request, an answer of another layout (empty INTEGER): refused whole, as before.
        agent.garbage = True
        with pytest.raises(TransportError, match="malformed"):
            await client.bulk([APC_OUTLET_POWER], 5)
        agent.garbage = False
        third = await client.bulk([APC_OUTLET_POWER], 5)
        assert third.varbinds == [((*APC_OUTLET_POWER, 1), 9)] and third.layout is first.layout
    finally:
        client.close()
        assert agent.transport is not None
        agent.transport.close()


class _LayoutPdu:
    """A PDU at the transport seam (GETBULK over a dict of OIDs) that tags each answer with a
    layout token as the native client does: the same object for the same request whose answer
    has the same names and types, whatever the values."""

    name = "fake"

    def __init__(self, values: dict[tuple[int, ...], int], tokens: bool) -> None:
        self.values = values
        self.tokens: dict[object, object] | None = {} if tokens else None

    async def bulk(self, oids: list[tuple[int, ...]], max_repetitions: int) -> Response:
        keys = sorted(self.values)
        out: list[tuple[tuple[int, ...], int | str | Special]] = []
        cursor = list(oids)
        for _ in range(max_repetitions):
            for i, oid in enumerate(cursor):
                after = next((k for k in keys if k > oid), None)
                if after is None:
                    out.append((oid, Special.END_OF_MIB_VIEW))
                else:
                    out.append((after, self.values[after]))
                    cursor[i] = after
        if self.tokens is None:
            return Response(out)
        shape = (tuple(oids), max_repetitions, tuple((o, type(v)) for o, v in out))
        return Response(out, layout=self.tokens.setdefault(shape, object()))

    async def set_integer(self, oid: tuple[int, ...], value: int) -> Response:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


class _NoSteps(dict):  # type: ignore[type-arg]
    """A driver's walk steps that keep nothing: every answer walked the full way."""

    def __setitem__(self, key: object, value: object) -> None:
        pass


@settings(FUZZ, max_examples=40)  # each example: three drivers, up to 7 polls
@given(
    polls=st.lists(
        st.tuples(st.lists(st.integers(0, 3000), min_size=200, max_size=200), st.integers(1, 4)),
        min_size=2,
        max_size=7,
    )
)
async def test_a_walk_replayed_on_the_same_layout_reads_what_a_full_walk_reads(
    polls: list[tuple[list[int], int]],
) -> None:
    """Three drivers on the same PDU: one given layout tokens (its walks replay on them), one not
    (its walks replay on answers with the same names), and one that never replays and builds
    every Reading value by value (no whole-column fast path): the same readings
    every poll, while values change every poll (some out of range, unmapped or noSuchInstance) and
    the outlet count now and then (a new layout: no stale replay)."""
    from agent.config import SnmpDevice
    from agent.drivers.snmp import SnmpDriver, load_profile

    profile = load_profile("apc-rpdu2")
    cfg = SnmpDevice(kind="snmp", id="pdu-x", profile="apc-rpdu2", host="127.0.0.1", community="public")
    pdus = [_LayoutPdu({}, tokens=True), _LayoutPdu({}, tokens=False), _LayoutPdu({}, tokens=False)]
    drivers = [SnmpDriver(cfg), SnmpDriver(cfg), SnmpDriver(cfg)]
    drivers[2]._column = lambda *_: None  # type: ignore[method-assign]
    drivers[2]._steps = _NoSteps()
    for d, pdu in zip(drivers, pdus, strict=True):
        d._transport = pdu  # the transport seam: no socket
    for raw, outlets in polls:
        values: dict[tuple[int, ...], int] = {}
        it = iter(raw)
        for table in profile.tables.values():
            rows = {"device": 1, "phase": 3}.get(table.name, outlets)
            for col in table.columns:
                for row in range(1, rows + 1):
                    x = next(it)  # outlet states: 1 and 2 mapped, anything else an ERROR reading
                    if x % 23 == 0:
                        values[(*table.entry, col, row)] = Special.NO_SUCH_INSTANCE  # type: ignore[assignment]
                    elif x % 29 == 0:
                        values[(*table.entry, col, row)] = -(2**31)  # out of every range
                    else:
                        values[(*table.entry, col, row)] = x % 3 if table.name == "outlet_switched" else x
        for pdu in pdus:
            pdu.values = values
        fast, full, one_by_one = [[r[:4] + r[6:] for r in await d.poll()] for d in drivers]
        assert fast == full == one_by_one
    assert pdus[0].tokens  # the layouts were there to replay


class _Scripted:
    """A transport that answers each GETBULK with the next of a list of varbind lists."""

    name = "fake"

    def __init__(self, answers: list[list[tuple[tuple[int, ...], int | str | Special]]]) -> None:
        self.answers = answers

    async def bulk(self, oids: list[tuple[int, ...]], max_repetitions: int) -> Response:
        return Response(self.answers.pop(0))

    async def set_integer(self, oid: tuple[int, ...], value: int) -> Response:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


async def test_an_answer_with_the_same_names_but_end_of_mib_view_is_walked_not_replayed() -> None:
    """The walk replays an answer with the names of the last one (no layout) only where the
    endOfMibView markers are where they were: one in place of a row is the column's end."""
    from agent.config import SnmpDevice
    from agent.drivers.snmp import SnmpDriver

    cfg = SnmpDevice(kind="snmp", id="pdu-x", profile="apc-rpdu2", host="127.0.0.1", community="public")
    d = SnmpDriver(cfg)
    table = d.profile.tables["outlet_switched"]
    col = (*table.entry, table.columns[0])
    after = (*table.entry, table.columns[0] + 1, 1)  # the next column: past this one's end
    first = [((*col, 1), 1), ((*col, 2), 2), (after, 7)]
    d._transport = _Scripted([first, [((*col, 1), 2), ((*col, 2), 1), (after, 7)]])  # type: ignore[assignment]
    d._reps[table.name] = 3
    assert await d._walk(table) == {(table.name, table.columns[0]): {(1,): 1, (2,): 2}}
    replayed = await d._walk(table)  # same names: replayed, new values
    assert replayed == {(table.name, table.columns[0]): {(1,): 2, (2,): 1}}
    ended = [((*col, 1), 2), ((*col, 2), Special.END_OF_MIB_VIEW), (after, 7)]
    d._transport = _Scripted([ended])  # type: ignore[assignment]
    d._reps[table.name] = 3
    assert await d._walk(table) == {(table.name, table.columns[0]): {(1,): 2}}
