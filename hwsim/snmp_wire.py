"""The fast path of hwsim's SNMP agents: GET / GETNEXT / GETBULK answered straight from BER bytes.

pysnmp's command responder costs 0.4-0.8 ms of CPU per value answered (its ASN.1 objects, the
message/security/VACM pipeline), which made the simulator the bottleneck of every full-pod figure.
This module answers the hot requests itself:

- SNMPv2c GET, GETNEXT and GETBULK with the agent's community;
- SNMPv3 authPriv (HMAC-SHA-96 + AES-128-CFB, RFC 3414 / 3826) GET, GETNEXT and GETBULK for the
  agent's user, once the manager has discovered the engine (engine id, boots, time) through pysnmp;

from a :class:`VarbindCache` of encoded varbinds (``SEQUENCE {OID, value}``) that is refilled lazily
once per generation (hwsim's physics tick, or a SET). Everything else (SET, a wrong community or key,
an unknown engine id or user, engine discovery, a time-window report, SNMPv1, a malformed datagram)
returns None from :meth:`FastResponder.answer` and goes to pysnmp, which keeps every behaviour the
tests pin down (silence for a bad community, reports, notWritable, wrongValue ...).

Values are ``Raw`` pairs ``(BER tag, int | bytes | OID tuple)``; ``to_pysnmp`` converts them for the
pysnmp path.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography >= 47 keeps CFB (SNMP's AES mode, RFC 3826) among the "decrepit" ciphers
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

Oid = tuple[int, ...]
Raw = tuple[int, Any]  # (BER tag, value)

INTEGER, OCTET_STRING, NULL, OBJECT_ID, SEQUENCE = 0x02, 0x04, 0x05, 0x06, 0x30
GAUGE32, TIMETICKS = 0x42, 0x43
NO_SUCH_OBJECT, END_OF_MIB_VIEW = 0x80, 0x82
GET, GETNEXT, RESPONSE, SET, GETBULK, REPORT = 0xA0, 0xA1, 0xA2, 0xA3, 0xA5, 0xA8

# A UDP answer must fit one datagram; GETBULK answers stop adding rows before this (RFC 3416 4.2.3).
MAX_ANSWER = 65000


class Malformed(Exception):
    """Not a message this fast path understands: pysnmp gets it."""


# ------------------------------------------------------------------------------------ BER encode


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return bytes((0x81, n))
    return bytes((0x82, n >> 8, n & 0xFF))


def tlv(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + length(len(body)) + body


def enc_int(tag: int, v: int) -> bytes:
    """INTEGER and its application types (Gauge32, TimeTicks): minimal two's complement."""
    if 0 <= v < 0x80:
        return bytes((tag, 1, v))
    n = ((v if v >= 0 else ~v).bit_length() + 8) // 8
    return bytes((tag, n)) + v.to_bytes(n, "big", signed=True)


def enc_oid(oid: Sequence[int]) -> bytes:
    if len(oid) < 2:
        raise ValueError(f"OID {oid} too short")
    out = bytearray((40 * oid[0] + oid[1],))
    for arc in oid[2:]:
        if arc < 0x80:
            out.append(arc)
            continue
        chunk = bytearray()
        rest = arc
        while rest:
            chunk.append((rest & 0x7F) | (0x80 if chunk else 0))
            rest >>= 7
        chunk.reverse()
        out += chunk
    return tlv(OBJECT_ID, bytes(out))


def enc_value(raw: Raw) -> bytes:
    tag, v = raw
    if tag in (INTEGER, GAUGE32, TIMETICKS):
        return enc_int(tag, int(v))
    if tag == OCTET_STRING:
        return tlv(OCTET_STRING, bytes(v))
    if tag == OBJECT_ID:
        return enc_oid(v)
    raise ValueError(f"no encoding for tag {tag:#x}")


# ------------------------------------------------------------------------------------ BER decode


def read_tlv(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the TLV at ``pos``."""
    try:
        tag = buf[pos]
        n = buf[pos + 1]
        pos += 2
        if n & 0x80:
            k = n & 0x7F
            if not 1 <= k <= 3:
                raise Malformed("length")
            n = int.from_bytes(buf[pos : pos + k], "big")
            pos += k
    except IndexError as err:
        raise Malformed("truncated") from err
    end = pos + n
    if end > len(buf):
        raise Malformed("truncated")
    return tag, pos, end


def dec_int(buf: bytes, start: int, end: int) -> int:
    return int.from_bytes(buf[start:end], "big", signed=True)


def dec_oid(body: bytes) -> Oid:
    if not body:
        raise Malformed("empty OID")
    first = body[0]
    arcs = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    v = 0
    for b in body[1:]:
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            arcs.append(v)
            v = 0
    return tuple(arcs)


def parse_pdu(buf: bytes, pos: int, end: int) -> tuple[int, bytes, int, int, list[Oid]]:
    """(pdu tag, request-id TLV bytes, field 2, field 3, requested OIDs) of the PDU at ``pos``."""
    tag, s, e = read_tlv(buf, pos)
    if e != end or tag not in (GET, GETNEXT, GETBULK):
        raise Malformed("pdu")
    t, _rs, re_ = read_tlv(buf, s)
    if t != INTEGER:
        raise Malformed("request-id")
    reqid = buf[s:re_]
    t, a, b = read_tlv(buf, re_)
    f2 = dec_int(buf, a, b)
    t, c, d = read_tlv(buf, b)
    f3 = dec_int(buf, c, d)
    t, vs, ve = read_tlv(buf, d)
    if t != SEQUENCE:
        raise Malformed("varbind list")
    oids: list[Oid] = []
    p = vs
    while p < ve:
        t, s1, e1 = read_tlv(buf, p)
        t2, s2, e2 = read_tlv(buf, s1)
        if t2 != OBJECT_ID:
            raise Malformed("varbind")
        oids.append(dec_oid(buf[s2:e2]))
        p = e1
    return tag, reqid, f2, f3, oids


# ------------------------------------------------------------------------------------ the MIB


class VarbindCache:
    """Encoded varbinds of one agent's MIB, refilled lazily once per ``generation()``.

    ``generation`` returns anything comparable (hwsim's tick count and SET counter); None means
    every request reads the state afresh (a standalone agent in a test: values always live).
    """

    def __init__(
        self, objects: dict[Oid, Callable[[], Raw]], generation: Callable[[], object] | None
    ) -> None:
        self.oids = sorted(objects)
        self._getters = [objects[o] for o in self.oids]
        self._index = {o: i for i, o in enumerate(self.oids)}
        self._oid_tlv = [enc_oid(o) for o in self.oids]
        self._generation = generation
        self._gen: object = object()
        self._cache: list[bytes | None] = [None] * len(self.oids)
        self.encoded = 0  # varbinds encoded (not served from the cache): the bench reads it

    def start_request(self) -> None:
        gen = self._generation() if self._generation is not None else object()
        if gen != self._gen:
            self._gen = gen
            self._cache = [None] * len(self.oids)

    def invalidate(self) -> None:
        self._gen = object()

    def varbind(self, i: int) -> bytes:
        vb = self._cache[i]
        if vb is None:
            body = self._oid_tlv[i] + enc_value(self._getters[i]())
            vb = self._cache[i] = bytes((SEQUENCE,)) + length(len(body)) + body
            self.encoded += 1
        return vb

    def get(self, oid: Oid) -> bytes:
        i = self._index.get(oid)
        if i is None:
            return tlv(SEQUENCE, enc_oid(oid) + bytes((NO_SUCH_OBJECT, 0)))
        return self.varbind(i)

    def next_index(self, oid: Oid) -> int:
        """Index of the first OID after ``oid`` (len(oids) = end of the MIB view)."""
        i = self._index.get(oid)
        return i + 1 if i is not None else bisect.bisect_right(self.oids, oid)

    def end_of_view(self, oid: Oid) -> bytes:
        return tlv(SEQUENCE, enc_oid(oid) + bytes((END_OF_MIB_VIEW, 0)))

    def answer_pdu(self, tag: int, reqid: bytes, f2: int, f3: int, oids: list[Oid]) -> bytes:
        """The Response-PDU (``A2 ...``) to a GET / GETNEXT / GETBULK."""
        self.start_request()
        out: list[bytes] = []
        n = len(self.oids)
        if tag == GET:
            out = [self.get(o) for o in oids]
        elif tag == GETNEXT:
            for o in oids:
                i = self.next_index(o)
                out.append(self.varbind(i) if i < n else self.end_of_view(o))
        else:  # GETBULK: f2 non-repeaters, f3 max-repetitions
            non_rep = max(0, min(f2, len(oids)))
            for o in oids[:non_rep]:
                i = self.next_index(o)
                out.append(self.varbind(i) if i < n else self.end_of_view(o))
            reps = oids[non_rep:]
            pos = [self.next_index(o) for o in reps]
            size = sum(len(b) for b in out)
            for _ in range(max(0, f3) if reps else 0):
                row = [self.varbind(p) if p < n else self.end_of_view(reps[k]) for k, p in enumerate(pos)]
                size += sum(len(b) for b in row)
                if size > MAX_ANSWER and out:
                    break
                out += row
                if all(p >= n for p in pos):
                    break  # every column ran off the end: one row of endOfMibView says so
                pos = [p + 1 for p in pos]
        vbl = b"".join(out)
        body = reqid + b"\x02\x01\x00\x02\x01\x00" + bytes((SEQUENCE,)) + length(len(vbl)) + vbl
        return bytes((RESPONSE,)) + length(len(body)) + body


# ------------------------------------------------------------------------------------ SNMPv3 USM


def password_to_key_sha(password: bytes, engine_id: bytes) -> bytes:
    """RFC 3414 A.2.2: the SHA key of a password, localized to ``engine_id``."""
    rep = (password * (1048576 // len(password) + 1))[:1048576]
    ku = hashlib.sha1(rep).digest()
    return hashlib.sha1(ku + engine_id + ku).digest()


class UsmFast:
    """One SNMPv3 user (authPriv, SHA + AES-128) of one engine, for the fast path."""

    def __init__(self, *, user: bytes, auth_key: bytes, priv_key: bytes, engine_id: bytes,
                 boots: Callable[[], int], engine_time: Callable[[], int]) -> None:  # fmt: skip
        self.user = user
        self.engine_id = engine_id
        self.k_auth = password_to_key_sha(auth_key, engine_id)
        self.k_priv = password_to_key_sha(priv_key, engine_id)[:16]
        # Keyed once: HMAC's inner/outer pads and the AES key schedule are per user, not per message
        # (a Raritan poll is ~10 messages of a few hundred bytes: the set-up was a third of the cost).
        self._hmac = hmac.new(self.k_auth, digestmod=hashlib.sha1)
        self._aes_key = algorithms.AES(self.k_priv)
        self.boots = boots
        self.engine_time = engine_time
        self._salt = int.from_bytes(os.urandom(8), "big")

    def _mac(self, msg: bytes) -> bytes:
        h = self._hmac.copy()
        h.update(msg)
        return h.digest()[:12]

    def _aes(self, boots: int, etime: int, salt: bytes) -> Cipher[CFB]:
        iv = struct.pack(">II", boots, etime) + salt
        return Cipher(self._aes_key, CFB(iv))

    def answer(self, msg: bytes, cache: VarbindCache) -> bytes | None:
        """The encrypted, authenticated answer to ``msg``, or None (not ours: pysnmp decides)."""
        tag, s, end = read_tlv(msg, 0)
        if tag != SEQUENCE or end != len(msg):
            return None
        t, a, b = read_tlv(msg, s)  # msgVersion
        if t != INTEGER or dec_int(msg, a, b) != 3:
            return None
        t, gs, ge = read_tlv(msg, b)  # msgGlobalData
        _t1, _a1, b1 = read_tlv(msg, gs)
        msg_id = msg[gs:b1]
        _t2, _a2, b2 = read_tlv(msg, b1)
        _t3, a3, b3 = read_tlv(msg, b2)
        flags = msg[a3] if b3 > a3 else 0
        if flags & 0x03 != 0x03:
            return None  # discovery (noAuthNoPriv) and authNoPriv: pysnmp
        t, ss, se = read_tlv(msg, ge)  # msgSecurityParameters OCTET STRING
        t, ps, _pe = read_tlv(msg, ss)  # its SEQUENCE
        t, es, ee = read_tlv(msg, ps)
        if msg[es:ee] != self.engine_id:
            return None
        t, bs, be = read_tlv(msg, ee)
        boots = dec_int(msg, bs, be)
        t, ts, te = read_tlv(msg, be)
        etime = dec_int(msg, ts, te)
        t, us, ue = read_tlv(msg, te)
        if msg[us:ue] != self.user:
            return None
        t, aus, aue = read_tlv(msg, ue)
        if aue - aus != 12:
            return None
        t, pvs, pve = read_tlv(msg, aue)
        salt = msg[pvs:pve]
        if len(salt) != 8:
            return None
        if not hmac.compare_digest(self._mac(msg[:aus] + bytes(12) + msg[aue:]), msg[aus:aue]):
            return None  # wrong key: pysnmp counts it and stays silent
        my_boots, my_time = self.boots(), self.engine_time()
        if boots != my_boots or abs(etime - my_time) > 150:
            return None  # outside the time window: pysnmp sends the report
        t, ds, de = read_tlv(msg, se)  # encryptedPDU
        if t != OCTET_STRING:
            return None
        dec = self._aes(boots, etime, salt).decryptor()
        scoped = dec.update(msg[ds:de]) + dec.finalize()
        # ScopedPDU: SEQUENCE {contextEngineID, contextName, PDU}; CFB leaves padding-free bytes but
        # a manager may pad: take the SEQUENCE's own length.
        t, cs, ce = read_tlv(scoped, 0)
        t, _xs, xe = read_tlv(scoped, cs)
        t, ns, ne = read_tlv(scoped, xe)
        if ne != ns:
            return None  # a named context: not served here
        pdu_tag, reqid, f2, f3, oids = parse_pdu(scoped, ne, ce)
        answer = cache.answer_pdu(pdu_tag, reqid, f2, f3, oids)
        scoped_out = tlv(SEQUENCE, scoped[cs:xe] + b"\x04\x00" + answer)
        self._salt = (self._salt + 1) & 0xFFFFFFFFFFFFFFFF
        salt_out = self._salt.to_bytes(8, "big")
        enc = self._aes(my_boots, my_time, salt_out).encryptor()
        encrypted = tlv(OCTET_STRING, enc.update(scoped_out) + enc.finalize())
        global_data = tlv(SEQUENCE, msg_id + b"\x02\x03\x00\xff\xe3" + b"\x04\x01\x03" + b"\x02\x01\x03")
        sec_head = (
            tlv(OCTET_STRING, self.engine_id)
            + enc_int(INTEGER, my_boots)
            + enc_int(INTEGER, my_time)
            + tlv(OCTET_STRING, self.user)
            + b"\x04\x0c"
        )
        sec_tail = tlv(OCTET_STRING, salt_out)
        sec_seq_body_len = len(sec_head) + 12 + len(sec_tail)
        sec_seq_head = bytes((SEQUENCE,)) + length(sec_seq_body_len)
        sec_octets_head = bytes((OCTET_STRING,)) + length(len(sec_seq_head) + sec_seq_body_len)
        body_head = b"\x02\x01\x03" + global_data + sec_octets_head + sec_seq_head + sec_head
        body_tail = sec_tail + encrypted
        body_len = len(body_head) + 12 + len(body_tail)
        prefix = bytes((SEQUENCE,)) + length(body_len) + body_head
        unsigned = prefix + bytes(12) + body_tail
        return prefix + self._mac(unsigned) + body_tail


class FastResponder:
    """Answers what it can of one agent's datagrams; None = hand the datagram to pysnmp."""

    def __init__(self, cache: VarbindCache, *, community: bytes | None, usm: UsmFast | None) -> None:
        self.cache = cache
        self.community = community
        self.usm = usm
        self.answered = 0  # datagrams answered here
        self.values = 0  # varbinds answered here

    def answer(self, msg: bytes) -> bytes | None:
        try:
            out = self.usm.answer(msg, self.cache) if self.usm is not None else self._v2c(msg)
        except (Malformed, ValueError, IndexError):
            return None
        if out is not None:
            self.answered += 1
        return out

    def _v2c(self, msg: bytes) -> bytes | None:
        tag, s, end = read_tlv(msg, 0)
        if tag != SEQUENCE or end != len(msg):
            return None
        t, a, b = read_tlv(msg, s)
        if t != INTEGER or dec_int(msg, a, b) != 1:  # 1 = SNMPv2c
            return None
        t, cs, ce = read_tlv(msg, b)
        if t != OCTET_STRING or msg[cs:ce] != self.community:
            return None
        pdu_tag, reqid, f2, f3, oids = parse_pdu(msg, ce, end)
        answer = self.cache.answer_pdu(pdu_tag, reqid, f2, f3, oids)
        body = b"\x02\x01\x01" + msg[b:ce] + answer
        return bytes((SEQUENCE,)) + length(len(body)) + body


__all__ = ["FastResponder", "Raw", "UsmFast", "VarbindCache", "enc_oid", "enc_value", "read_tlv"]
