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
import random

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
        # The request in flight: (request-id, future, bytes to resend, tries left, timer).
        self._pending_id = -1
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

    async def _exchange(self, message: bytes, request_id: int) -> Response:
        udp = self._udp
        if udp is None or udp.is_closing():
            raise TransportError("transport closed")
        if self._future is not None and not self._future.done():
            raise TransportError("a request is already in flight")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Response] = loop.create_future()
        self._future, self._pending_id, self._message = future, request_id, message
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
        if future is None or future.done() or response_id(data) != self._pending_id:
            return  # late, duplicate or foreign: ignore, as any SNMP manager does
        try:
            future.set_result(decode_response(data, self._known_oids))
        except Malformed as err:
            future.set_exception(TransportError(f"malformed SNMP answer: {err}"))

    # -- Transport protocol

    async def bulk(self, oids: list[Oid], max_repetitions: int) -> Response:
        rid = self._next_id()
        try:
            message = self._request_bytes(_GETBULK, tuple(oids), max_repetitions, rid)
        except ValueError as err:
            raise TransportError(str(err)) from err
        return await self._exchange(message, rid)

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


__all__ = ["Malformed", "NativeV2cTransport", "decode_oid", "decode_response", "encode_oid", "response_id"]
