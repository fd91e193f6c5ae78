"""SNMP transports for the SNMP driver: one small interface, three implementations.

The driver (``agent/drivers/snmp.py``) owns profiles, table walks, scaling, cadence and the mapping
of failures to DeviceUnavailable / DeviceError / AuthError. A transport only sends one request and
hands back varbinds with plain Python values, or raises one of the three ``Transport*`` errors
below. Library exceptions stop here.

- ``PysnmpTransport``: pysnmp 7.1, pure Python, v2c and v3 (authPriv). ~150-300 us of CPU per value.
- ``NetsnmpTransport``: netsnmp-cffi 0.2 (``import netsnmpy``: libnetsnmp through CFFI, asyncio
  native, the wheel bundles the C library). v2c, and v3 authPriv (MD5/SHA/SHA-256 with AES-128 or
  DES), which netsnmp-cffi itself does not offer yet: we fill the session's USM fields, discover
  the engine asynchronously and route security errors (see ``create_v3``). 5-10x cheaper per value
  (measured in bench/snmp_cost.py).
- ``NativeV2cTransport`` (``agent/drivers/snmp_v2c.py``): podagent's own v2c client, the default
  for v2c: none of net-snmp's event-loop glue per request.

Values: INTEGER and its application types (Counter32, Gauge32, TimeTicks, Counter64, Unsigned32)
become ``int``; noSuchObject / noSuchInstance / endOfMibView become a ``Special``; anything else (an
OCTET STRING, an OID) becomes its text. Both transports map the same answer to the same values,
so the driver's readings do not depend on the transport.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pyasn1.type import univ
from pysnmp.error import PySnmpError
from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    ContextData,
    ObjectIdentity,
    ObjectType,
    SnmpEngine,
    UdpTransportTarget,
    UsmUserData,
    bulk_cmd,
    set_cmd,
    usmAesCfb128Protocol,
    usmAesCfb256Protocol,
    usmDESPrivProtocol,
    usmHMAC192SHA256AuthProtocol,
    usmHMACMD5AuthProtocol,
    usmHMACSHAAuthProtocol,
)
from pysnmp.proto import errind
from pysnmp.proto.rfc1902 import Integer32
from pysnmp.proto.rfc1905 import EndOfMibView, NoSuchInstance, NoSuchObject

if TYPE_CHECKING:
    from netsnmpy.session import SNMPSession

Oid = tuple[int, ...]


class Special(enum.Enum):
    """The SNMPv2 exception values a varbind can carry instead of a value."""

    NO_SUCH_OBJECT = "noSuchObject"
    NO_SUCH_INSTANCE = "noSuchInstance"
    END_OF_MIB_VIEW = "endOfMibView"


Value = int | str | Special
VarBind = tuple[Oid, Value]

# RFC 3416 error-status names, by number (what a DeviceError message shows).
ERROR_STATUS = (
    "noError", "tooBig", "noSuchName", "badValue", "readOnly", "genErr", "noAccess", "wrongType",
    "wrongLength", "wrongEncoding", "wrongValue", "noCreation", "inconsistentValue",
    "resourceUnavailable", "commitFailed", "undoFailed", "authorizationError", "notWritable",
    "inconsistentName",
)  # fmt: skip


def error_status_name(status: int) -> str:
    return ERROR_STATUS[status] if 0 <= status < len(ERROR_STATUS) else f"error-status {status}"


class TransportTimeout(Exception):
    """No answer within the transport's own timeout and retries."""


class TransportAuthError(Exception):
    """The agent refused our credentials (SNMPv3): not fixed by retrying."""


class TransportError(Exception):
    """Anything else that left us without an answer (bad address, library error)."""


@dataclass(frozen=True, slots=True)
class Response:
    varbinds: list[VarBind]
    error_status: int = 0  # 0 = noError
    error_index: int = 0  # 1-based varbind the error is about, 0 = none
    # Set by the native v2c client only: an object that is the same (``is``) for every answer to
    # the same kept request whose bytes had the same layout (same OIDs, types and value lengths;
    # only the values differ), so a caller may replay what it worked out from the varbinds' names
    # last time. None: no such promise.
    layout: object | None = None


class Transport(Protocol):
    """One SNMP agent; requests are awaited one at a time per driver."""

    name: str

    async def bulk(self, oids: list[Oid], max_repetitions: int) -> Response: ...

    async def set_integer(self, oid: Oid, value: int) -> Response: ...

    def close(self) -> None: ...


def netsnmp_available() -> bool:
    """netsnmp-cffi imports (its wheel bundles libnetsnmp, so this is true wherever it installed)."""
    try:
        import netsnmpy.session  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# pysnmp

AUTH_PROTOCOLS = {
    "SHA": usmHMACSHAAuthProtocol,
    "SHA256": usmHMAC192SHA256AuthProtocol,
    "MD5": usmHMACMD5AuthProtocol,
}
PRIV_PROTOCOLS = {"AES": usmAesCfb128Protocol, "AES256": usmAesCfb256Protocol, "DES": usmDESPrivProtocol}
# Error indications that mean "your credentials are wrong" (never fixed by retrying quickly).
_AUTH_ERRORS = (
    errind.WrongDigest,
    errind.UnknownUserName,
    errind.DecryptionError,
    errind.AuthenticationFailure,
    errind.AuthenticationError,
    errind.UnknownSecurityName,
    errind.UnsupportedSecurityLevel,
)


def _pysnmp_value(value: Any) -> Value:
    # Integer32, Unsigned32, Counter32/64, Gauge32, TimeTicks all derive from univ.Integer.
    if isinstance(value, univ.Integer):
        return int(value)
    if isinstance(value, EndOfMibView):
        return Special.END_OF_MIB_VIEW
    if isinstance(value, NoSuchInstance):
        return Special.NO_SUCH_INSTANCE
    if isinstance(value, NoSuchObject):
        return Special.NO_SUCH_OBJECT
    return str(value.prettyPrint())


class PysnmpTransport:
    """pysnmp 7.1: own engine (own UDP socket and dispatcher) per device; MIB lookup off."""

    name = "pysnmp"

    def __init__(self, engine: SnmpEngine, auth: CommunityData | UsmUserData, target: UdpTransportTarget):
        self._engine = engine
        self._auth = auth
        self._target = target
        self._context = ContextData()
        self._requests: dict[tuple[Oid, ...], list[ObjectType]] = {}

    @classmethod
    async def create(
        cls, host: str, port: int, auth: CommunityData | UsmUserData, timeout_s: float, retries: int
    ) -> PysnmpTransport:
        try:
            target = await UdpTransportTarget.create((host, port), timeout=timeout_s, retries=retries)
        except (PySnmpError, OSError) as err:
            raise TransportError(f"cannot resolve {host}: {err}") from err
        return cls(SnmpEngine(), auth, target)

    def _response(self, result: tuple[Any, Any, Any, Any]) -> Response:
        err_ind, err_status, err_index, var_binds = result
        if err_ind:
            if isinstance(err_ind, errind.RequestTimedOut):
                raise TransportTimeout(str(err_ind))
            if isinstance(err_ind, _AUTH_ERRORS):
                raise TransportAuthError(str(err_ind))
            raise TransportError(str(err_ind))
        return Response(
            [(tuple(name), _pysnmp_value(value)) for name, value in var_binds],
            int(err_status or 0),
            int(err_index or 0),
        )

    async def bulk(self, oids: list[Oid], max_repetitions: int) -> Response:
        key = tuple(oids)
        req = self._requests.get(key)
        if req is None:
            # pysnmp resolves every ObjectType against its MIB view on each request, even with
            # lookupMib=False; a resolved one short-circuits. Keep them: a table's OIDs repeat.
            req = self._requests[key] = [ObjectType(ObjectIdentity(oid)) for oid in oids]
        try:
            result = await bulk_cmd(
                self._engine, self._auth, self._target, self._context, 0, max_repetitions, *req,
                lookupMib=False,
            )  # fmt: skip
        except PySnmpError as err:
            raise TransportError(str(err)) from err
        return self._response(result)

    async def set_integer(self, oid: Oid, value: int) -> Response:
        try:
            result = await set_cmd(
                self._engine, self._auth, self._target, self._context,
                ObjectType(ObjectIdentity(oid), Integer32(value)), lookupMib=False,
            )  # fmt: skip
        except PySnmpError as err:
            raise TransportError(str(err)) from err
        return self._response(result)

    def close(self) -> None:
        self._engine.close_dispatcher()


# ---------------------------------------------------------------------------------------------
# SNMPv3 (USM) pieces for the net-snmp transport: credentials, engine discovery, key derivation.


@dataclass(frozen=True, slots=True)
class UsmCredentials:
    user: str
    auth_key: str
    priv_key: str
    auth_protocol: str = "SHA"  # a key of NETSNMP_AUTH_OIDS
    priv_protocol: str = "AES"  # a key of NETSNMP_PRIV_OIDS


@dataclass(frozen=True, slots=True)
class EngineInfo:
    engine_id: bytes
    boots: int
    time: int


# USM protocol OIDs as libnetsnmp knows them (RFC 3414, RFC 7860, RFC 3826).
NETSNMP_AUTH_OIDS: dict[str, Oid] = {
    "MD5": (1, 3, 6, 1, 6, 3, 10, 1, 1, 2),
    "SHA": (1, 3, 6, 1, 6, 3, 10, 1, 1, 3),
    "SHA256": (1, 3, 6, 1, 6, 3, 10, 1, 1, 5),
}
# AES-256 is left to pysnmp: its OID and key extension differ between vendors (Blumenthal/Reeder).
NETSNMP_PRIV_OIDS: dict[str, Oid] = {
    "AES": (1, 3, 6, 1, 6, 3, 10, 1, 2, 4),
    "DES": (1, 3, 6, 1, 6, 3, 10, 1, 2, 2),
}
_HASHES = {"MD5": "md5", "SHA": "sha1", "SHA256": "sha256"}

# usmStats counters (RFC 3414 §5): what a Report PDU about our request means.
_USM_STATS = (1, 3, 6, 1, 6, 3, 15, 1, 1)
_USM_REPORTS = {
    1: "unsupportedSecLevels",
    2: "notInTimeWindows",
    3: "unknownUserNames",
    4: "unknownEngineIDs",
    5: "wrongDigests",
    6: "decryptionErrors",
}


def netsnmp_supports_v3(auth_protocol: str, priv_protocol: str) -> bool:
    return auth_protocol in NETSNMP_AUTH_OIDS and priv_protocol in NETSNMP_PRIV_OIDS


@functools.lru_cache(maxsize=64)
def password_to_ku(password: str, auth_protocol: str) -> bytes:
    """RFC 3414 A.2 password-to-key: the hash of 1 MiB of the password repeated (net-snmp's
    ``generate_Ku``). libnetsnmp localizes it to the engine ID itself."""
    secret = password.encode()
    if len(secret) < 8:
        raise TransportAuthError("SNMPv3 passphrases must be at least 8 characters (RFC 3414)")
    h = hashlib.new(_HASHES[auth_protocol])
    h.update((secret * (1_048_576 // len(secret) + 1))[:1_048_576])
    return h.digest()


def report_error(binds: list[VarBind]) -> Exception:
    for oid, _ in binds:
        if oid[: len(_USM_STATS)] == _USM_STATS and len(oid) > len(_USM_STATS):
            name = _USM_REPORTS.get(oid[len(_USM_STATS)], f"usmStats.{oid[len(_USM_STATS)]}")
            if name in ("unknownUserNames", "wrongDigests", "decryptionErrors", "unsupportedSecLevels"):
                return TransportAuthError(f"SNMPv3 report: {name}")
            return TransportError(f"SNMPv3 report: {name}")
    first = ".".join(map(str, binds[0][0])) if binds else "no varbinds"
    return TransportError(f"SNMPv3 report: {first}")


def _ber(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def _ber_int(value: int) -> bytes:
    return _ber(0x02, value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True))


def discovery_request(msg_id: int) -> bytes:
    """RFC 3414 §4 discovery: a noAuthNoPriv, reportable GET with an empty engine ID and user.
    The engine answers with a Report carrying its engine ID, boots and time."""
    usm = _ber(0x30, _ber(0x04, b"") + _ber_int(0) + _ber_int(0) + _ber(0x04, b"") * 3)
    header = _ber(0x30, _ber_int(msg_id) + _ber_int(65507) + _ber(0x04, b"\x04") + _ber_int(3))
    pdu = _ber(0xA0, _ber_int(msg_id) + _ber_int(0) + _ber_int(0) + _ber(0x30, b""))
    scoped = _ber(0x30, _ber(0x04, b"") + _ber(0x04, b"") + pdu)
    return _ber(0x30, _ber_int(3) + header + _ber(0x04, usm) + scoped)


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, value, next position) of the BER element at ``pos``."""
    tag = data[pos]
    n = data[pos + 1]
    pos += 2
    if n & 0x80:
        width = n & 0x7F
        n = int.from_bytes(data[pos : pos + width], "big")
        pos += width
    if pos + n > len(data):
        raise ValueError("truncated")
    return tag, data[pos : pos + n], pos + n


def parse_discovery_response(data: bytes, msg_id: int) -> EngineInfo:
    try:
        tag, message, _ = _tlv(data, 0)
        _, version, pos = _tlv(message, 0)
        _, header, pos = _tlv(message, pos)
        _, got_id, _ = _tlv(header, 0)
        _, usm_raw, pos = _tlv(message, pos)
        _, usm, _ = _tlv(usm_raw, 0)
        _, engine_id, p = _tlv(usm, 0)
        _, boots, p = _tlv(usm, p)
        _, clock, p = _tlv(usm, p)
    except (IndexError, ValueError) as err:
        raise TransportError(f"malformed SNMPv3 discovery answer: {err}") from None
    if tag != 0x30 or int.from_bytes(version, "big") != 3 or int.from_bytes(got_id, "big") != msg_id:
        raise TransportError("unexpected answer to SNMPv3 discovery")
    if not engine_id:
        raise TransportError("SNMPv3 discovery answer carries no engine ID")
    return EngineInfo(engine_id, int.from_bytes(boots, "big"), int.from_bytes(clock, "big"))


async def discover_engine(address: str, port: int, timeout_s: float, retries: int) -> EngineInfo:
    """The engine ID, boots and time of the SNMPv3 agent at address:port, without blocking."""
    loop = asyncio.get_running_loop()
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Receiver(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            answers.put_nowait(data)

    try:
        transport, _ = await loop.create_datagram_endpoint(Receiver, remote_addr=(address, port))
    except OSError as err:
        raise TransportError(f"cannot reach {address}:{port}: {err}") from err
    try:
        for _attempt in range(retries + 1):
            msg_id = random.randrange(1, 2**31 - 1)
            transport.sendto(discovery_request(msg_id))
            deadline = loop.time() + timeout_s
            while (left := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(left):
                        data = await answers.get()
                except TimeoutError:
                    break
                try:
                    return parse_discovery_response(data, msg_id)
                except TransportError:
                    continue  # a late answer to an earlier attempt, or noise: keep waiting
        raise TransportTimeout(f"no answer to SNMPv3 engine discovery from {address}:{port}")
    finally:
        transport.close()


@functools.cache
def _init_netsnmp_usm() -> None:
    """Registers net-snmp's USM security module (``init_snmp``), once per process, without its
    side effects: no snmp.conf or persistent-state files read or written (the TOML is the only
    configuration) and no MIB files parsed (we never look up names; it would print warnings)."""
    import os

    from netsnmpy import _netsnmp
    from netsnmpy.constants import (
        NETSNMP_DS_LIB_APPTYPE,
        NETSNMP_DS_LIB_DISABLE_PERSISTENT_LOAD,
        NETSNMP_DS_LIB_DISABLE_PERSISTENT_SAVE,
        NETSNMP_DS_LIB_DONT_READ_CONFIGS,
        NETSNMP_DS_LIBRARY_ID,
    )

    ffi, lib = _netsnmp.ffi, _netsnmp.lib
    c = _libnetsnmp()
    if c is not None:
        for flag in (
            NETSNMP_DS_LIB_DONT_READ_CONFIGS,
            NETSNMP_DS_LIB_DISABLE_PERSISTENT_LOAD,
            NETSNMP_DS_LIB_DISABLE_PERSISTENT_SAVE,
        ):
            c.netsnmp_ds_set_boolean(NETSNMP_DS_LIBRARY_ID, flag, 1)
    # The application type must be set before init_usm (netsnmp-cffi: it segfaults otherwise).
    lib.netsnmp_ds_set_string(NETSNMP_DS_LIBRARY_ID, NETSNMP_DS_LIB_APPTYPE, ffi.new("char[]", b"podagent"))
    saved = os.environ.get("MIBS")
    os.environ["MIBS"] = ""  # read by init_snmp's MIB loader only
    try:
        lib.init_snmp(ffi.new("char[]", b"podagent"))
    finally:
        if saved is None:
            del os.environ["MIBS"]
        else:
            os.environ["MIBS"] = saved


@functools.cache
def _libnetsnmp() -> Any:
    """ctypes view of the libnetsnmp netsnmp-cffi loaded (same handle, same globals), for the few
    functions its CFFI declarations leave out; None if it cannot be found."""
    import ctypes
    import glob
    import os

    from netsnmpy import _netsnmp

    libs = os.path.join(os.path.dirname(_netsnmp.__file__), os.pardir, "netsnmp_cffi.libs")
    for path in glob.glob(os.path.join(libs, "libnetsnmp*")) or ["libnetsnmp.so.40"]:
        try:
            c = ctypes.CDLL(path)
        except OSError:
            continue
        c.usm_get_user.restype = ctypes.c_void_p
        c.usm_get_user.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p)
        c.usm_remove_user.restype = ctypes.c_void_p
        c.usm_remove_user.argtypes = (ctypes.c_void_p,)
        c.usm_free_user.restype = ctypes.c_void_p
        c.usm_free_user.argtypes = (ctypes.c_void_p,)
        return c
    return None


# (engine ID, user) -> the credentials the last session to that engine was opened with.
_USM_INSTALLED: dict[tuple[bytes, str], UsmCredentials] = {}


def _forget_usm_user(engine_id: bytes, creds: UsmCredentials) -> None:
    """libnetsnmp keeps one USM user per (engine ID, name) for the life of the process and a new
    session's keys do not replace a known user's: a key corrected (or revoked) by a config reload
    would be shadowed by the first one seen. So a session with other credentials than the known
    user's drops that user first (the same credentials keep it: no churn under a live session)."""
    key = (engine_id, creds.user)
    if _USM_INSTALLED.get(key) == creds:
        return
    _USM_INSTALLED[key] = creds
    c = _libnetsnmp()
    if c is None:
        return
    found = c.usm_get_user(engine_id, len(engine_id), creds.user.encode())
    if found:
        c.usm_remove_user(found)
        c.usm_free_user(found)


def _c(keep: list[Any], cdata: Any) -> Any:
    keep.append(cdata)
    return cdata


# ---------------------------------------------------------------------------------------------
# netsnmp-cffi


class NetsnmpTransport:
    """netsnmp-cffi 0.2 over libnetsnmp, SNMPv2c and SNMPv3 (authPriv).

    Two gaps of netsnmp-cffi 0.2.1 are filled here: its response callback drops the PDU's
    error-status (so a refused SET would look like success), and its ``aset`` cannot encode an
    INTEGER (``snmp_add_var`` wants the value as text). The session subclass keeps the status; SETs
    build their PDU with net-snmp's own ``snmp_add_var``.
    """

    name = "netsnmp"

    def __init__(self, session: SNMPSession) -> None:
        self._session = session

    @classmethod
    def create(
        cls, address: str, port: int, community: str, timeout_s: float, retries: int
    ) -> NetsnmpTransport:
        """``address`` must be an IP address: net-snmp would resolve a name with blocking DNS."""
        session = _status_session_class()(
            address, port, community=community, version="2c", timeout=timeout_s, retries=retries
        )
        return cls._opened(session, address, port)

    @classmethod
    async def create_v3(
        cls, address: str, port: int, usm: UsmCredentials, timeout_s: float, retries: int
    ) -> NetsnmpTransport:
        """SNMPv3 authPriv over libnetsnmp. The engine ID is discovered here, asynchronously: left
        to itself, net-snmp would discover it inside ``snmp_open`` with a blocking exchange that
        stalls the whole event loop for timeout x retries when the PDU is down."""
        engine = await discover_engine(address, port, timeout_s, retries)
        session = _status_session_class()(
            address, port, community="", version="v3", timeout=timeout_s, retries=retries
        )
        session.usm = (usm, engine)
        return cls._opened(session, address, port)

    @classmethod
    def _opened(cls, session: SNMPSession, address: str, port: int) -> NetsnmpTransport:
        from netsnmpy.errors import SNMPError

        try:
            session.open()
        except (SNMPError, OSError) as err:
            raise TransportError(f"cannot open session to {address}:{port}: {err}") from err
        return cls(session)

    async def _send(self, pdu: Any, what: str) -> Response:
        from netsnmpy.errors import SNMPError

        try:
            result: Response = await self._session._send_async(pdu, what)
        except TimeoutError:
            raise TransportTimeout("timeout") from None
        except SNMPError as err:
            raise TransportError(str(err)) from err
        return result

    async def bulk(self, oids: list[Oid], max_repetitions: int) -> Response:
        from netsnmpy.constants import SNMP_MSG_GETBULK
        from netsnmpy.netsnmp import make_request_pdu

        pdu = make_request_pdu(SNMP_MSG_GETBULK, *oids)
        pdu.errstat = 0  # non-repeaters (GETBULK overloads the two error fields)
        pdu.errindex = max_repetitions
        return await self._send(pdu, "getbulk")

    async def set_integer(self, oid: Oid, value: int) -> Response:
        from netsnmpy import _netsnmp
        from netsnmpy.constants import SNMP_MSG_SET

        ffi, lib = _netsnmp.ffi, _netsnmp.lib
        pdu = lib.snmp_pdu_create(SNMP_MSG_SET)
        oid_c = ffi.new("oid[]", oid)
        if not lib.snmp_add_var(pdu, oid_c, len(oid), b"i", ffi.new("char[]", str(int(value)).encode())):
            return await self._send(pdu, "set")
        lib.snmp_free_pdu(pdu)
        raise TransportError(f"cannot encode INTEGER {value} for {'.'.join(map(str, oid))}")

    def close(self) -> None:
        self._session.close()


@functools.cache
def _status_session_class() -> type[SNMPSession]:
    """An SNMPSession whose futures resolve to a ``Response`` (varbinds + error-status/index)."""
    from netsnmpy import _netsnmp, netsnmp
    from netsnmpy.constants import (
        ASN_COUNTER,
        ASN_GAUGE,
        ASN_INTEGER,
        ASN_TIMETICKS,
        SNMP_ENDOFMIBVIEW,
        SNMP_MSG_REPORT,
        SNMP_NOSUCHINSTANCE,
        SNMP_NOSUCHOBJECT,
        SNMP_SEC_LEVEL_AUTHPRIV,
        SNMP_VERSION_3,
    )
    from netsnmpy.errors import SNMPError
    from netsnmpy.netsnmp import EndOfMibView as NsEnd
    from netsnmpy.netsnmp import NoSuchInstance as NsNoInstance
    from netsnmpy.netsnmp import NoSuchObject as NsNoObject
    from netsnmpy.netsnmp import decode_variable, get_session_error_message
    from netsnmpy.session import SNMPSession, update_event_loop

    # libnetsnmp logs to stderr by default; route it through Python logging instead (once).
    netsnmp.register_log_callback()

    def value(v: Any) -> Value:
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, int):
            return v
        if isinstance(v, NsEnd):
            return Special.END_OF_MIB_VIEW
        if isinstance(v, NsNoInstance):
            return Special.NO_SUCH_INSTANCE
        if isinstance(v, NsNoObject):
            return Special.NO_SUCH_OBJECT
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        if isinstance(v, tuple):  # an OID
            return ".".join(map(str, v))
        return str(v)

    ffi = _netsnmp.ffi
    unpack, cast = ffi.unpack, ffi.cast
    unsigned = {ASN_COUNTER, ASN_GAUGE, ASN_TIMETICKS}
    special = {
        SNMP_ENDOFMIBVIEW: Special.END_OF_MIB_VIEW,
        SNMP_NOSUCHINSTANCE: Special.NO_SUCH_INSTANCE,
        SNMP_NOSUCHOBJECT: Special.NO_SUCH_OBJECT,
    }

    def varbinds(p: Any) -> list[VarBind]:
        # The integer types (nearly every varbind a PDU answers) read straight from the C struct:
        # netsnmpy's decode_variable builds and validates an OID object and looks up a decoder per
        # varbind, a third of the driver's CPU per value.
        binds: list[VarBind] = []
        append = binds.append
        var = p.variables
        while var:
            t = var.type
            if t == ASN_INTEGER:
                append((tuple(unpack(var.name, var.name_length)), var.val.integer[0]))
            elif t in unsigned:
                append(
                    (tuple(unpack(var.name, var.name_length)), cast("unsigned long *", var.val.integer)[0])
                )
            elif t in special:
                append((tuple(unpack(var.name, var.name_length)), special[t]))
            else:
                oid, raw = decode_variable(var)
                append((tuple(oid), value(raw)))
            var = var.next_variable
        return binds

    class StatusSession(SNMPSession):  # type: ignore[misc]
        usm: tuple[UsmCredentials, EngineInfo] | None = None

        def open(self) -> None:
            if self.usm is None:
                super().open()
                return
            _init_netsnmp_usm()
            # SNMPSession.open() with the USM fields set before snmp_open (it copies the struct).
            ffi, lib = _netsnmp.ffi, _netsnmp.lib
            creds, engine = self.usm
            _forget_usm_user(engine.engine_id, creds)
            session = ffi.new("netsnmp_session*")
            lib.snmp_sess_init(session)
            session.version = SNMP_VERSION_3
            session.timeout = int(self.timeout * 1_000_000)
            session.retries = self.retries
            keep = [session]  # cdata the struct points at must outlive snmp_open
            session.peername = _c(keep, ffi.new("char[]", self.peer_name.encode()))
            session.securityName = _c(keep, ffi.new("char[]", creds.user.encode()))
            session.securityNameLen = len(creds.user.encode())
            session.securityLevel = SNMP_SEC_LEVEL_AUTHPRIV
            session.securityModel = 3  # USM
            session.securityEngineID = _c(keep, ffi.new("u_char[]", engine.engine_id))
            session.securityEngineIDLen = len(engine.engine_id)
            session.engineBoots = engine.boots
            session.engineTime = engine.time
            # RFC 3826 / net-snmp: the privacy key too is derived with the *authentication* hash.
            for which, proto_oid, password in (
                ("Auth", NETSNMP_AUTH_OIDS[creds.auth_protocol], creds.auth_key),
                ("Priv", NETSNMP_PRIV_OIDS[creds.priv_protocol], creds.priv_key),
            ):
                ku = password_to_ku(password, creds.auth_protocol)
                setattr(session, f"security{which}Proto", _c(keep, ffi.new("oid[]", proto_oid)))
                setattr(session, f"security{which}ProtoLen", len(proto_oid))
                ffi.memmove(getattr(session, f"security{which}Key"), ku, len(ku))
                setattr(session, f"security{which}KeyLen", len(ku))
            session.callback = lib._netsnmp_session_callback
            self._callback_data = ffi.new("struct _callback_data*")
            self._callback_data.session_id = id(self)
            session.callback_magic = self._callback_data
            session_copy = lib.snmp_open(session)
            if not session_copy:
                error = get_session_error_message(session)
                if session.s_errno > 0:
                    raise OSError(session.s_errno, error)
                raise SNMPError(f"snmp_open: {error}")
            self._original_session = session
            self._keep = keep
            self.session = session_copy
            self.session_map[id(self)] = self
            update_event_loop()

        def callback(self, reqid: int, pdu: Any) -> None:
            future = self._futures.pop(reqid, None)
            if future is None or future.done():  # cancelled by our asyncio.timeout guard
                return
            p = pdu[0]
            binds = varbinds(p)
            if p.command == SNMP_MSG_REPORT:
                # SNMPv3's answer to a request it refused (unknown user, wrong digest, ...).
                future.set_exception(report_error(binds))
                return
            future.set_result(Response(binds, int(p.errstat), int(p.errindex)))

        def handle_timeout(self, reqid: int) -> None:
            future = self._futures.pop(reqid, None)
            if future is not None and not future.done():
                future.set_exception(TimeoutError())

        def handle_failure(self, reqid: int, operation: int, pdu: Any) -> None:
            # net-snmp reports a security error with reqid 0 (the answer could not be matched to
            # a request it cannot authenticate); a driver has one request in flight at a time.
            futures = [self._futures.pop(reqid)] if reqid in self._futures else []
            if reqid == 0:
                futures += list(self._futures.values())
                self._futures.clear()
            futures = [f for f in futures if not f.done()]
            if not futures:
                return
            if operation == _OP_SEC_ERROR:
                # The USM check failed on the answer (a wrongDigests report, say): credentials.
                binds = varbinds(pdu[0]) if pdu != _netsnmp.ffi.NULL else []
                found = report_error(binds) if binds else TransportError("SNMPv3 security error")
                err: Exception = (
                    found if isinstance(found, TransportAuthError) else TransportAuthError(str(found))
                )
            else:
                err = TransportError(f"net-snmp request failed (callback op {operation})")
            for future in futures:
                future.set_exception(err)

    # netsnmp-cffi's one C callback knows "received" and "timed out" only; a security error
    # (op 7) or a send failure (op 3) would leave the request to our timeout guard, and a wrong
    # SNMPv3 key would look like a dead PDU. Wrap it (cffi lets an extern be re-attached).
    from netsnmpy import session as ns_session

    original = ns_session._netsnmp_session_callback

    @_netsnmp.ffi.def_extern(name="_netsnmp_session_callback")  # type: ignore[untyped-decorator]
    def _callback(operation: int, session: Any, reqid: int, pdu: Any, magic: Any) -> int:
        if operation in (_OP_SEC_ERROR, _OP_SEND_FAILED):
            data = _netsnmp.ffi.cast("_callback_data*", magic)
            target = SNMPSession.session_map.get(data.session_id)
            if isinstance(target, StatusSession):
                try:
                    target.handle_failure(reqid, operation, pdu)
                except Exception:  # never let an exception cross into C
                    return 1
                return 1
        return int(original(operation, session, reqid, pdu, magic))

    return StatusSession


_OP_SEND_FAILED = 3  # NETSNMP_CALLBACK_OP_SEND_FAILED
_OP_SEC_ERROR = 7  # NETSNMP_CALLBACK_OP_SEC_ERROR (net-snmp 5.8+)


async def resolve(host: str, port: int) -> str:
    """The first address of ``host`` (without blocking the loop)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=2)  # SOCK_DGRAM
    except OSError as err:
        raise TransportError(f"cannot resolve {host}: {err}") from err
    if not infos:
        raise TransportError(f"cannot resolve {host}")
    return str(infos[0][4][0])


__all__ = [
    "AUTH_PROTOCOLS",
    "PRIV_PROTOCOLS",
    "NetsnmpTransport",
    "PysnmpTransport",
    "Response",
    "Special",
    "Transport",
    "TransportAuthError",
    "TransportError",
    "TransportTimeout",
    "UsmCredentials",
    "Value",
    "error_status_name",
    "netsnmp_available",
    "netsnmp_supports_v3",
    "resolve",
]
