"""podagent's own SNMPv2c client: GETBULK and SET over one asyncio UDP socket per device.

Why not net-snmp for v2c: profiled in the running agent (24 PDUs of the ``full`` pod, 1 s polls),
most of the net-snmp transport's CPU was not BER at all but its event-loop glue (netsnmp-cffi
recomputes libnetsnmp's select set, walks its fd set and re-arms a timer after every send, and
``snmp_read2`` scans every session), plus a cffi attribute read per varbind field. A v2c request is
a few bytes that only change in their request-id, and an answer's varbinds are the same OIDs poll
after poll, so this client

- keeps each request's BER once built (per OID list and max-repetitions) and patches the
  request-id into it;
- decodes an answer in one pass, looking each varbind's OID bytes up in a per-session table of the
  OIDs seen before (a walk's rows repeat every poll);
- keeps the layout of the last answer to each kept request (``Layout``): the next answer with the
  same bytes but for the request-id and the integers' values (same OIDs, types and value lengths:
  most polls) is read by one ``struct`` unpack and a tuple comparison, in C, and carries the layout
  so the driver can replay its walk (``Response.layout``); any other answer goes through the full
  decoder and becomes the new layout;
- does its own timeout and retries with one timer per request.

SNMPv3 stays on net-snmp (USM, keys, engine discovery). The values are those of the other
transports (``snmp_transport`` module docstring): integer types as ``int``, the v2 exceptions as
``Special``, anything else as text. An answer that is not well-formed BER is never half-used: one
to our request-id fails the request with ``TransportError``; anything else (another request's,
noise) is dropped and the request keeps waiting.
"""

from __future__ import annotations

import asyncio
import itertools
import operator
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

from agent.drivers.snmp_transport import (
    Oid,
    Response,
    Special,
    TransportError,
    TransportTimeout,
    Value,
    VarBind,
)

_RESPONSE = 0xA2
_GETBULK = 0xA5
_SET = 0xA3
_UNSIGNED = frozenset((0x41, 0x42, 0x43, 0x46, 0x47))  # Counter32, Gauge32, TimeTicks, Counter64, UInteger32
_SPECIAL = {0x80: Special.NO_SUCH_OBJECT, 0x81: Special.NO_SUCH_INSTANCE, 0x82: Special.END_OF_MIB_VIEW}
# Request-ids stay in [2^24, 2^31): their BER INTEGER is always 4 bytes, so a kept request's
# bytes only need those 4 patched.
_REQID_LOW, _REQID_HIGH = 1 << 24, (1 << 31) - 1
_MAX_KEPT_REQUESTS = 256
_MAX_KNOWN_OIDS = 20_000


class Malformed(ValueError):
    """Bytes that are not the BER they claim to be."""


# ---------------------------------------------------------------------------------------------
# encoding


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(size),)) + size


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + _length(len(body)) + body


def _int(value: int) -> bytes:
    return _tlv(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def encode_oid(oid: Oid) -> bytes:
    if len(oid) < 2 or oid[0] > 2 or (oid[0] < 2 and oid[1] >= 40) or min(oid) < 0:
        raise ValueError(f"not an encodable OID: {'.'.join(map(str, oid))}")
    out = bytearray()
    for sub in (oid[0] * 40 + oid[1], *oid[2:]):
        rest = sub >> 7
        chunk = [sub & 0x7F]
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return bytes(out)


def encode_request(
    community: bytes, tag: int, request_id: int, field1: int, field2: int, varbinds: list[bytes]
) -> bytes:
    """A v2c message; ``varbinds`` already encoded (each ``30 .. 06 oid value``)."""
    pdu = _tlv(tag, _int(request_id) + _int(field1) + _int(field2) + _tlv(0x30, b"".join(varbinds)))
    return _tlv(0x30, _int(1) + _tlv(0x04, community) + pdu)


def _varbind(oid: Oid, value: bytes = b"\x05\x00") -> bytes:
    return _tlv(0x30, _tlv(0x06, encode_oid(oid)) + value)


# ---------------------------------------------------------------------------------------------
# decoding


def decode_oid(body: bytes) -> Oid:
    if not body or body[-1] & 0x80:
        raise Malformed("OID")
    subs: list[int] = []
    sub = 0
    for b in body:
        sub = (sub << 7) | (b & 0x7F)
        if not b & 0x80:
            subs.append(sub)
            sub = 0
    first = subs[0]
    head = (first // 40, first % 40) if first < 80 else (2, first - 80)
    return (*head, *subs[1:])


def _value(tag: int, body: bytes) -> Value:
    if tag == 0x02:
        if not body:
            raise Malformed("empty INTEGER")
        return int.from_bytes(body, "big", signed=True)
    if tag in _UNSIGNED:
        if not body:
            raise Malformed("empty unsigned")
        return int.from_bytes(body, "big")
    special = _SPECIAL.get(tag)
    if special is not None:
        return special
    if tag == 0x04:
        return body.decode("utf-8", "replace")
    if tag == 0x06:
        return ".".join(map(str, decode_oid(body)))
    if tag == 0x40 and len(body) == 4:  # IpAddress
        return ".".join(map(str, body))
    if tag == 0x05:
        return "NULL"
    return body.hex()


def _header(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the TLV at ``pos``; Malformed if it overruns."""
    tag = data[pos]
    n = data[pos + 1]
    pos += 2
    if n & 0x80:
        width = n & 0x7F
        if not 0 < width <= 4:
            raise Malformed("length")
        n = int.from_bytes(data[pos : pos + width], "big")
        pos += width
    end = pos + n
    if end > len(data):
        raise Malformed("truncated")
    return tag, pos, end


def response_id(data: bytes) -> int | None:
    """The request-id of a v2c Response message, None for anything else (noise, other versions)."""
    try:
        tag, pos, _ = _header(data, 0)
        if tag != 0x30:
            return None
        tag, start, pos = _header(data, pos)
        if tag != 0x02 or data[start:pos] != b"\x01":
            return None
        tag, _, pos = _header(data, pos)  # community
        if tag != 0x04:
            return None
        tag, pos, _ = _header(data, pos)
        if tag != _RESPONSE:
            return None
        tag, start, pos = _header(data, pos)
        if tag != 0x02 or start == pos:
            return None
        return int.from_bytes(data[start:pos], "big", signed=True)
    except (IndexError, Malformed):
        return None


def decode_response(data: bytes, known_oids: dict[bytes, Oid]) -> Response:
    """Error status, index and varbinds of a v2c Response message (Malformed if it is not one).

    ``known_oids`` maps OID bytes to tuples: filled as OIDs are seen, so a walk's rows, the same
    every poll, are decoded once per session."""
    try:
        _, pos, end = _header(data, 0)
        _, _, pos = _header(data, pos)  # version
        _, _, pos = _header(data, pos)  # community
        tag, pos, pdu_end = _header(data, pos)
        if tag != _RESPONSE or pdu_end != end:
            raise Malformed("not a Response PDU")
        _, _, pos = _header(data, pos)  # request-id (matched by the caller)
        tag, start, pos = _header(data, pos)
        if tag != 0x02 or start == pos:
            raise Malformed("error-status")
        status = int.from_bytes(data[start:pos], "big", signed=True)
        tag, start, pos = _header(data, pos)
        if tag != 0x02 or start == pos:
            raise Malformed("error-index")
        index = int.from_bytes(data[start:pos], "big", signed=True)
        tag, pos, list_end = _header(data, pos)
        if tag != 0x30 or list_end != pdu_end:
            raise Malformed("varbind list")
        binds: list[VarBind] = []
        append = binds.append
        get_oid = known_oids.get
        while pos < list_end:
            # Each varbind: 30 L 06 L <oid> T L <value>. Short lengths (< 128) are what every
            # agent sends for these; the general form goes through _header.
            if data[pos] != 0x30:
                raise Malformed("varbind")
            n = data[pos + 1]
            if n < 0x80 and data[pos + 2] == 0x06 and data[pos + 3] < 0x80:
                bind_end = pos + 2 + n
                oid_end = pos + 4 + data[pos + 3]
                oid_raw = data[pos + 4 : oid_end]
                pos = oid_end
            else:
                _, pos, bind_end = _header(data, pos)
                tag, start, pos = _header(data, pos)
                if tag != 0x06:
                    raise Malformed("varbind name")
                oid_raw = data[start:pos]
            if bind_end > list_end:
                raise Malformed("varbind overruns its list")
            oid = get_oid(oid_raw)
            if oid is None:
                oid = decode_oid(oid_raw)
                if len(known_oids) < _MAX_KNOWN_OIDS:
                    known_oids[oid_raw] = oid
            tag = data[pos]
            n = data[pos + 1]
            if n < 0x80:
                start, pos = pos + 2, pos + 2 + n
            else:
                tag, start, pos = _header(data, pos)
            if pos != bind_end:
                raise Malformed("varbind length")
            if tag == 0x02 and pos > start:
                append((oid, int.from_bytes(data[start:pos], "big", signed=True)))
            else:
                append((oid, _value(tag, data[start:pos])))
        return Response(binds, status, index)
    except IndexError:
        raise Malformed("truncated") from None


# ---------------------------------------------------------------------------------------------
# the layout fast path

# struct codes of an integer value of 1, 2, 4 or 8 bytes: (length, signed) -> code. Other lengths
# are read as bytes and converted one by one.
_INT_CODES = {
    (1, True): "b", (2, True): "h", (4, True): "i", (8, True): "q",
    (1, False): "B", (2, False): "H", (4, False): "I", (8, False): "Q",
}  # fmt: skip
# A layout that never matched an answer is rebuilt only every this many answers (a PDU whose
# answers differ in more than integer values, e.g. a changing string past a table's end, must not
# cost a rebuild per poll).
_LAYOUT_RETRY = 16


def _spans(data: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    """Where the request-id's value starts, and (tag, start, end) of every varbind's value, in a
    message decode_response accepted (so no bounds are checked again here)."""
    _, pos, _ = _header(data, 0)
    _, _, pos = _header(data, pos)  # version
    _, _, pos = _header(data, pos)  # community
    _, pos, _ = _header(data, pos)  # PDU
    _, rid_at, pos = _header(data, pos)
    _, _, pos = _header(data, pos)  # error-status
    _, _, pos = _header(data, pos)  # error-index
    _, pos, list_end = _header(data, pos)
    values: list[tuple[int, int, int]] = []
    while pos < list_end:
        _, pos, bind_end = _header(data, pos)
        _, _, pos = _header(data, pos)  # the name
        tag, start, pos = _header(data, pos)
        values.append((tag, start, pos))
        pos = bind_end
    return rid_at, values


def _picker(indices: Sequence[int]) -> Callable[[tuple[object, ...]], tuple[object, ...]]:
    """itemgetter that always returns a tuple (itemgetter of one index returns the item)."""
    if len(indices) == 1:
        (i,) = indices
        return lambda parts: (parts[i],)
    return operator.itemgetter(*indices)


class Layout:
    """The byte layout of one well-formed answer to a kept request: every byte but the
    request-id's and the integer values' is its *skeleton* (lengths, OIDs, types, error status).

    The next answer to the same request usually differs only in its values. ``match`` reads
    such an answer with one ``struct`` unpack (in C): the skeleton compared in one tuple
    comparison, the integer values read as they are (1, 2, 4, 8 bytes; other lengths converted
    one by one). Same size and same skeleton bytes mean that BER parsing follows exactly the same
    path as for the answer the layout was made from (tags and lengths are skeleton bytes; an
    integer's content bytes never steer the parse), so the answer is as well-formed as that one
    and decodes to the same names and types with the new values. Anything else (another length,
    one skeleton byte different) returns None and goes through ``decode_response``, whose answer
    then becomes the new layout.
    """

    __slots__ = ("_fixed", "_fixups", "_oids", "_rid", "_skel", "_slots", "_struct", "_vals", "hits",
                 "misses", "size", "skeleton")  # fmt: skip

    def __init__(self, data: bytes, resp: Response) -> None:
        rid_at, values = _spans(data)
        if len(values) != len(resp.varbinds) or data[rid_at - 1] != 4:
            raise Malformed("layout")  # cannot happen for an answer decode_response accepted
        fmt: list[str] = [">"]
        skel_idx: list[int] = []
        val_idx: list[int] = []
        slots: list[int] = []
        fixups: list[tuple[int, bool]] = []
        at = 0

        def skeleton_to(end: int) -> None:
            if end > at:
                skel_idx.append(len(fmt) - 1)
                fmt.append(f"{end - at}s")

        skeleton_to(rid_at)
        self._rid = len(fmt) - 1
        fmt.append("4s")
        at = rid_at + 4
        for slot, (tag, start, end) in enumerate(values):
            if (tag != 0x02 and tag not in _UNSIGNED) or end == start:
                continue  # not an integer: its bytes are skeleton, its value the one decoded
            skeleton_to(start)
            code = _INT_CODES.get((end - start, tag == 0x02))
            if code is None:
                fixups.append((len(val_idx), tag == 0x02))
                code = f"{end - start}s"
            val_idx.append(len(fmt) - 1)
            slots.append(slot)
            fmt.append(code)
            at = end
        skeleton_to(len(data))
        self.size = len(data)
        self._struct = struct.Struct("".join(fmt))
        parts = self._struct.unpack(data)
        self._skel = _picker(skel_idx)
        self.skeleton = self._skel(parts)
        self._vals = _picker(val_idx) if val_idx else None
        self._fixups = tuple(fixups)
        self._oids = tuple(oid for oid, _ in resp.varbinds)
        self._fixed = [v for _, v in resp.varbinds]
        # None: every varbind is an integer, the values in order are the varbinds' values.
        self._slots = None if len(slots) == len(values) else tuple(slots)
        self.hits = 0
        self.misses = 0

    def match(self, data: bytes, rid: bytes) -> Response | None:
        """The answer ``data`` if it has this layout and carries request-id ``rid``, else None."""
        if len(data) != self.size:
            return None
        parts = self._struct.unpack(data)
        if parts[self._rid] != rid or self._skel(parts) != self.skeleton:
            return None
        self.hits += 1
        if self._vals is None:
            return Response(list(zip(self._oids, self._fixed, strict=True)), 0, 0, self)
        vals: Any = self._vals(parts)
        if self._fixups:
            vals = list(vals)
            for k, signed in self._fixups:
                vals[k] = int.from_bytes(vals[k], "big", signed=signed)
        if self._slots is not None:
            merged = list(self._fixed)
            for slot, v in zip(self._slots, vals, strict=True):
                merged[slot] = v
            vals = merged
        return Response(list(zip(self._oids, vals, strict=True)), 0, 0, self)


# ---------------------------------------------------------------------------------------------
# the transport


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, client: NativeV2cTransport) -> None:
        self._client = client

    def datagram_received(self, data: bytes, addr: object) -> None:
        self._client._received(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: net-snmp ignores them too; the request times out.
        pass


class NativeV2cTransport:
    """SNMPv2c to one agent; one request in flight at a time (the driver awaits each)."""

    name = "native"

    def __init__(self, community: str, timeout_s: float, retries: int) -> None:
        self._community = community.encode()
        self._timeout_s = timeout_s
        self._retries = retries
        self._udp: asyncio.DatagramTransport | None = None
        self._ids = itertools.count(random.randrange(_REQID_LOW, _REQID_HIGH // 2))
        self._kept: dict[tuple[int, tuple[Oid, ...], int], tuple[bytes, bytes]] = {}
        self._known_oids: dict[bytes, Oid] = {}
        # The layout of the last answer to each kept request (Layout: the fast path).
        self._layouts: dict[tuple[int, tuple[Oid, ...], int], Layout] = {}
        # The request in flight: (request-id, its kept request's key, future, bytes to resend,
        # tries left, timer).
        self._pending_id = -1
        self._pending_key: tuple[int, tuple[Oid, ...], int] | None = None
        self._future: asyncio.Future[Response] | None = None
        self._message = b""
        self._tries_left = 0
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    async def create(
        cls, address: str, port: int, community: str, timeout_s: float, retries: int
    ) -> NativeV2cTransport:
        self = cls(community, timeout_s, retries)
        loop = asyncio.get_running_loop()
        try:
            udp, _ = await loop.create_datagram_endpoint(lambda: _Endpoint(self), remote_addr=(address, port))
        except OSError as err:
            raise TransportError(f"cannot open a UDP socket to {address}:{port}: {err}") from err
        self._udp = udp
        return self

    # -- requests

    def _request_bytes(self, tag: int, oids: tuple[Oid, ...], field2: int, request_id: int) -> bytes:
        key = (tag, oids, field2)
        kept = self._kept.get(key)
        if kept is None:
            if len(self._kept) >= _MAX_KEPT_REQUESTS:
                self._kept.clear()
            whole = encode_request(self._community, tag, _REQID_LOW, 0, field2, [_varbind(o) for o in oids])
            marker = _int(_REQID_LOW)
            at = whole.index(marker) + 2  # the request-id's 4 value bytes
            kept = self._kept[key] = (whole[:at], whole[at + 4 :])
        head, tail = kept
        return head + request_id.to_bytes(4, "big") + tail

    def _next_id(self) -> int:
        rid = next(self._ids)
        if rid >= _REQID_HIGH:
            self._ids = itertools.count(_REQID_LOW)
            rid = next(self._ids)
        return rid

    async def _exchange(
        self, message: bytes, request_id: int, key: tuple[int, tuple[Oid, ...], int] | None = None
    ) -> Response:
        udp = self._udp
        if udp is None or udp.is_closing():
            raise TransportError("transport closed")
        if self._future is not None and not self._future.done():
            raise TransportError("a request is already in flight")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Response] = loop.create_future()
        self._future, self._pending_id, self._message = future, request_id, message
        self._pending_key = key
        self._tries_left = self._retries
        udp.sendto(message)
        self._timer = loop.call_later(self._timeout_s, self._expired)
        try:
            return await future
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._future = None
            self._pending_id = -1
            self._pending_key = None

    def _expired(self) -> None:
        future = self._future
        if future is None or future.done():
            return
        if self._tries_left > 0 and self._udp is not None and not self._udp.is_closing():
            self._tries_left -= 1
            self._udp.sendto(self._message)  # same request-id: a late answer to any try counts
            self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._expired)
            return
        self._timer = None
        future.set_exception(TransportTimeout("timeout"))

    def _received(self, data: bytes) -> None:
        future = self._future
        if future is None or future.done():
            return
        key = self._pending_key
        layout = None if key is None else self._layouts.get(key)
        if layout is not None:
            resp = layout.match(data, self._pending_id.to_bytes(4, "big"))
            if resp is not None:
                future.set_result(resp)
                return
        if response_id(data) != self._pending_id:
            return  # late, duplicate or foreign: ignore, as any SNMP manager does
        try:
            resp = decode_response(data, self._known_oids)
        except Malformed as err:
            future.set_exception(TransportError(f"malformed SNMP answer: {err}"))
            return
        if key is not None and resp.error_status == 0 and resp.error_index == 0:
            resp = self._learn(key, data, resp, layout)
        future.set_result(resp)

    def _learn(
        self, key: tuple[int, tuple[Oid, ...], int], data: bytes, resp: Response, old: Layout | None
    ) -> Response:
        """Make this answer the request's layout (the answer then carries it), unless the last
        layout never matched: then only every _LAYOUT_RETRY-th time."""
        if old is not None and old.hits == 0:
            old.misses += 1
            if old.misses < _LAYOUT_RETRY:
                return resp
        if len(self._layouts) >= _MAX_KEPT_REQUESTS:
            self._layouts.clear()
        try:
            layout = self._layouts[key] = Layout(data, resp)
        except (Malformed, IndexError, struct.error):
            return resp  # cannot happen for an answer decode_response accepted: no fast path
        return Response(resp.varbinds, 0, 0, layout)

    # -- Transport protocol

    async def bulk(self, oids: list[Oid], max_repetitions: int) -> Response:
        rid = self._next_id()
        names = tuple(oids)
        try:
            message = self._request_bytes(_GETBULK, names, max_repetitions, rid)
        except ValueError as err:
            raise TransportError(str(err)) from err
        return await self._exchange(message, rid, (_GETBULK, names, max_repetitions))

    async def set_integer(self, oid: Oid, value: int) -> Response:
        rid = self._next_id()
        try:
            body = [_varbind(oid, _int(int(value)))]
        except ValueError as err:
            raise TransportError(str(err)) from err
        return await self._exchange(encode_request(self._community, _SET, rid, 0, 0, body), rid)

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        future = self._future
        if future is not None and not future.done():
            future.set_exception(TransportError("transport closed"))


__all__ = [
    "Layout",
    "Malformed",
    "NativeV2cTransport",
    "decode_oid",
    "decode_response",
    "encode_oid",
    "response_id",
]
