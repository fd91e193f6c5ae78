"""SNMP transports for the SNMP driver: one small interface, two implementations.

The driver (``agent/drivers/snmp.py``) owns profiles, table walks, scaling, cadence and the mapping
of failures to DeviceUnavailable / DeviceError / AuthError. A transport only sends one request and
hands back varbinds with plain Python values, or raises one of the three ``Transport*`` errors
below. Library exceptions stop here.

- ``PysnmpTransport``: pysnmp 7.1, pure Python, v2c and v3 (authPriv). ~150-300 us of CPU per value.
- ``NetsnmpTransport``: netsnmp-cffi 0.2 (``import netsnmpy``: libnetsnmp through CFFI, asyncio
  native, the wheel bundles the C library). v2c only: netsnmp-cffi has no SNMPv3 yet. 10-20x
  cheaper per value (measured in bench/snmp_cost.py).

Values: INTEGER and its application types (Counter32, Gauge32, TimeTicks, Counter64, Unsigned32)
become ``int``; noSuchObject / noSuchInstance / endOfMibView become a ``Special``; anything else (an
OCTET STRING, an OID) becomes its text. Both transports map the same answer to the same values,
so the driver's readings do not depend on the transport.
"""

from __future__ import annotations

import asyncio
import enum
import functools
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
# netsnmp-cffi


class NetsnmpTransport:
    """netsnmp-cffi 0.2 over libnetsnmp, SNMPv2c only.

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
        from netsnmpy.errors import SNMPError

        session = _status_session_class()(
            address, port, community=community, version="2c", timeout=timeout_s, retries=retries
        )
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
    from netsnmpy import netsnmp
    from netsnmpy.netsnmp import EndOfMibView as NsEnd
    from netsnmpy.netsnmp import NoSuchInstance as NsNoInstance
    from netsnmpy.netsnmp import NoSuchObject as NsNoObject
    from netsnmpy.netsnmp import decode_variable
    from netsnmpy.session import SNMPSession

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

    class StatusSession(SNMPSession):  # type: ignore[misc]
        def callback(self, reqid: int, pdu: Any) -> None:
            future = self._futures.pop(reqid, None)
            if future is None or future.done():  # cancelled by our asyncio.timeout guard
                return
            p = pdu[0]
            binds: list[VarBind] = []
            var = p.variables
            while var:
                oid, raw = decode_variable(var)
                binds.append((tuple(oid), value(raw)))
                var = var.next_variable
            future.set_result(Response(binds, int(p.errstat), int(p.errindex)))

        def handle_timeout(self, reqid: int) -> None:
            future = self._futures.pop(reqid, None)
            if future is not None and not future.done():
                future.set_exception(TimeoutError())

    return StatusSession


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
    "Value",
    "error_status_name",
    "netsnmp_available",
    "resolve",
]
