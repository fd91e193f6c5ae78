"""The control socket's wire protocol (v1), its access policy, and a small blocking client.

One JSON object per line each way. A request is ``{"v": 1, "op": "<name>", ...arguments}``; the
answer is ``{"v": 1, "ok": true, ...}`` or ``{"v": 1, "ok": false, "error": "<one line>"}``.
``follow`` answers once (``{"ok": true, "follow": true}``) and then streams ``{"v": 1, "event": {...}}``
lines until the client hangs up. Several requests may share one connection, one at a time.

Who may do what is decided by ``authorize`` alone (a pure function of the op and the caller's
SO_PEERCRED credentials): reads for anyone who can open the socket (its file mode and group gate
that), changes for root and members of the admin group.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

PROTOCOL_VERSION = 1
DeviceRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1]


class Ping(_Req):
    op: Literal["ping"]


class Status(_Req):
    op: Literal["status"]


class Devices(_Req):
    op: Literal["devices"]


class DeviceDetail(_Req):
    op: Literal["device"]
    id: DeviceRef


class Interlocks(_Req):
    op: Literal["interlocks"]


class Events(_Req):
    op: Literal["events"]
    since_wall: float | None = Field(None, ge=0)
    limit: int = Field(200, ge=1, le=2000)
    unacked: bool = False


class Follow(_Req):
    op: Literal["follow"]
    since_wall: float | None = Field(None, ge=0)


class Ack(_Req):
    op: Literal["ack"]
    id: Name


class Override(_Req):
    op: Literal["override"]
    interlock: Name
    device: DeviceRef
    duration_s: float = Field(gt=0, le=7 * 86400)
    reason: str = Field(min_length=1, max_length=500)
    force: bool = False


class OverrideClear(_Req):
    op: Literal["override_clear"]
    id: Name


class Poll(_Req):
    op: Literal["poll"]
    device: DeviceRef
    raw: bool = True


class Reload(_Req):
    op: Literal["reload"]


Request = Annotated[
    Ping
    | Status
    | Devices
    | DeviceDetail
    | Interlocks
    | Events
    | Follow
    | Ack
    | Override
    | OverrideClear
    | Poll
    | Reload,
    Field(discriminator="op"),
]
_request_adapter: TypeAdapter[Request] = TypeAdapter(Request)

READ_OPS = frozenset({"ping", "status", "devices", "device", "interlocks", "events", "follow"})
WRITE_OPS = frozenset({"ack", "override", "override_clear", "poll", "reload"})
ALL_OPS = READ_OPS | WRITE_OPS


class ProtocolError(Exception):
    """A request that cannot be served as sent (not JSON, unknown op, bad arguments, too large)."""


@dataclass(frozen=True)
class PeerCred:
    """Who is on the other end of the socket (SO_PEERCRED, plus supplementary groups)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = field(default_factory=frozenset)


def authorize(op: str, peer: PeerCred, admin_gids: frozenset[int] | set[int]) -> bool:
    """May ``peer`` run ``op``? Reads: yes (the socket's mode decides who connects). Changes: root,
    or a member (primary or supplementary) of an admin group. Unknown ops: never."""
    if op in READ_OPS:
        return True
    if op not in WRITE_OPS:
        return False
    if peer.uid == 0:
        return True
    return bool(({peer.gid} | set(peer.groups)) & set(admin_gids))


def json_depth(value: Any, limit: int) -> int:
    """How deep containers nest in ``value`` (stops counting past ``limit``)."""
    if limit <= 0 or not isinstance(value, dict | list):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((json_depth(v, limit - 1) for v in items), default=0)


def parse_request(line: bytes, *, max_bytes: int, max_depth: int = 16) -> Request:
    """Validate one request line; ProtocolError with a one-line reason when it is not acceptable."""
    if len(line) > max_bytes:
        raise ProtocolError(f"request too large ({len(line)} bytes; the limit is {max_bytes})")
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"not JSON: {err}") from None
    except RecursionError:
        raise ProtocolError(f"JSON nested too deep (the limit is {max_depth})") from None
    if json_depth(obj, max_depth + 1) > max_depth:
        raise ProtocolError(f"JSON nested too deep (the limit is {max_depth})")
    if not isinstance(obj, dict):
        raise ProtocolError("a request is a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {obj.get('v')!r} (this daemon speaks v1)")
    op = obj.get("op")
    if op not in ALL_OPS:
        raise ProtocolError(f"unknown op {op!r} (known: {', '.join(sorted(ALL_OPS))})")
    try:
        return _request_adapter.validate_python(obj)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in err.errors()
        )
        # One line whatever the client sent as key names (a "\n" key would split the answer).
        problems = problems.encode("unicode_escape").decode("ascii")[:1000]
        raise ProtocolError(f"bad arguments for {op}: {problems}") from None


def encode(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()


def ok(**payload: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": True, **payload}


def error(message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": message}


# ---------------------------------------------------------------------- client (podctl)


class DaemonNotRunning(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class SocketPermissionDenied(Exception):
    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path


class Client:
    """A blocking connection to the daemon's socket (podctl is a short-lived, one-thread program)."""

    def __init__(self, path: Path, *, timeout_s: float = 10.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(str(path))
        except FileNotFoundError:
            self._sock.close()
            raise DaemonNotRunning(path, "no socket") from None
        except ConnectionRefusedError:
            self._sock.close()
            raise DaemonNotRunning(path, "nothing listening on the socket") from None
        except PermissionError:
            self._sock.close()
            raise SocketPermissionDenied(path) from None
        self._file = self._sock.makefile("rb")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, op: str, **args: Any) -> None:
        self._sock.sendall(encode({"v": PROTOCOL_VERSION, "op": op, **args}))

    def receive(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("the daemon closed the connection")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        self.send(op, **args)
        return self.receive()

    def stream(self) -> Iterator[dict[str, Any]]:
        """Lines after a ``follow`` request's first answer; no read timeout (events may be rare)."""
        self._sock.settimeout(None)
        while True:
            line = self._file.readline()
            if not line:
                return
            yield json.loads(line)
