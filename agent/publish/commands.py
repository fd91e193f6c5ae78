"""Inbound fleet commands (``{root}/cmd/{name}``): validate, authenticate, execute, reply.

``CommandHandler.handle(name, payload)`` never raises, whatever the bytes: every outcome is a
reply ``{id, ok, error?}`` and an audit event (kind ``command``) on the bus.

Signing (when ``command_hmac_key_file`` is configured, a signature is required): the command's
JSON object has a field ``sig`` = lowercase hex HMAC-SHA256, keyed with the pod's key (the file's
bytes, stripped of surrounding whitespace), of the canonical form of the object *without* ``sig``:
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` encoded as UTF-8.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.budget import FleetBudget
from agent.events import Severity

log = structlog.get_logger(__name__)

MAX_ID_LEN = 128
MAX_REMEMBERED = 100_000  # replay memory bound (ids are also forgotten when they expire)


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Annotated[str, Field(min_length=1, max_length=MAX_ID_LEN)]
    issued_at: Annotated[int, Field(ge=0)]  # ms since epoch, UTC
    expires_at: Annotated[int, Field(ge=0)]  # ms since epoch, UTC
    sig: str | None = None


class SetPowerBudget(_Cmd):
    # The pod's total power budget; null clears it.
    watts: Annotated[float, Field(gt=0, le=1e8)] | None
    ramp_w_per_s: Annotated[float, Field(gt=0)] | None = None
    # ms since epoch: the budget lapses then (None: until replaced).
    valid_until: Annotated[int, Field(ge=0)] | None = None


class Ack(_Cmd):
    event_id: Annotated[str, Field(min_length=1, max_length=256)]


class Rebirth(_Cmd):
    pass


class PollNow(_Cmd):
    device: Annotated[str, Field(min_length=1, max_length=128)]


COMMANDS: dict[str, type[_Cmd]] = {
    "set_power_budget": SetPowerBudget,
    "ack": Ack,
    "rebirth": Rebirth,
    "poll_now": PollNow,
}

ErrorCode = Literal[
    "too_large",
    "not_json",
    "not_object",
    "missing_signature",
    "bad_signature",
    "unknown_command",
    "schema",
    "expired",
    "not_yet_valid",
    "replayed",
    "unknown_event",
    "unknown_device",
    "internal",
]


class CommandError(Exception):
    def __init__(self, code: ErrorCode, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


def canonical(obj: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the object without ``sig``, sorted keys, compact, ASCII."""
    body = {k: v for k, v in obj.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(obj: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()


class CommandHandler:
    """Turns command bytes into an action on the agent and a reply. Holds the replay memory."""

    def __init__(
        self,
        agent: Any,
        *,
        hmac_key: bytes | None,
        max_bytes: int,
        max_ttl_s: float,
        rebirth: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.agent = agent
        self.hmac_key = hmac_key
        self.max_bytes = max_bytes
        self.max_ttl_ms = int(max_ttl_s * 1000)
        self.rebirth = rebirth
        self.clock = clock
        self._seen: dict[str, int] = {}  # id -> expires_at (ms), insertion ordered
        self.accepted = 0
        self.refused = 0

    def handle(self, name: str, payload: bytes | bytearray | str | Any) -> dict[str, Any]:
        """Validate and run one command; the reply ``{id, command, ok, error?}``. Never raises."""
        cmd_id: str | None = None
        try:
            cmd_id, reply = self._handle(name, payload)
        except CommandError as err:
            reply = {"id": cmd_id, "ok": False, "error": err.code}
            if err.detail:
                reply["detail"] = err.detail[:500]
        except Exception as err:  # a bug here must not kill the link; the sender still gets a reply
            log.exception("command handler failed", command=name)
            reply = {"id": cmd_id, "ok": False, "error": "internal", "detail": type(err).__name__}
        if reply.get("id") is None:
            reply["id"] = self._salvage_id(payload)
        reply["command"] = name if len(name) <= 64 else name[:64]
        self._audit(reply)
        return reply

    # ------------------------------------------------------------------ internals
    def _salvage_id(self, payload: Any) -> str | None:
        """The id of a refused command, when one can be read, so the sender can match the reply."""
        try:
            if isinstance(payload, bytes | bytearray) and len(payload) <= self.max_bytes:
                obj = json.loads(payload)
                raw = obj.get("id") if isinstance(obj, dict) else None
                if isinstance(raw, str):
                    return raw[:MAX_ID_LEN]
        except Exception:  # garbage has no id
            return None
        return None

    def _handle(self, name: str, payload: Any) -> tuple[str | None, dict[str, Any]]:
        if isinstance(payload, str):
            payload = payload.encode("utf-8", "replace")
        if not isinstance(payload, bytes | bytearray):
            raise CommandError("not_json", "empty payload")
        if len(payload) > self.max_bytes:
            raise CommandError("too_large", f"{len(payload)} > {self.max_bytes} bytes")
        try:
            obj = json.loads(payload)
        except (ValueError, RecursionError) as err:
            raise CommandError("not_json", str(err)[:200]) from None
        if not isinstance(obj, dict):
            raise CommandError("not_object")
        raw_id = obj.get("id")
        cmd_id = raw_id[:MAX_ID_LEN] if isinstance(raw_id, str) else None
        try:
            self._check_signature(obj)
            model = COMMANDS.get(name)
            if model is None:
                raise CommandError("unknown_command", name[:64])
            try:
                cmd = model.model_validate(obj)
            except ValidationError as err:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or '-'}: {e['msg']}" for e in err.errors()[:5]
                )
                raise CommandError("schema", problems) from None
            self._check_fresh(cmd)
            self._execute(cmd)
        except CommandError as err:
            reply: dict[str, Any] = {"id": cmd_id, "ok": False, "error": err.code}
            if err.detail:
                reply["detail"] = err.detail[:500]
            return cmd_id, reply
        return cmd_id, {"id": cmd_id, "ok": True}

    def _check_signature(self, obj: dict[str, Any]) -> None:
        if self.hmac_key is None:
            return
        sig = obj.get("sig")
        if not isinstance(sig, str) or not sig:
            raise CommandError("missing_signature")
        expected = sign(obj, self.hmac_key)
        if not hmac.compare_digest(expected, sig.lower()):
            raise CommandError("bad_signature")

    def _check_fresh(self, cmd: _Cmd) -> None:
        now_ms = int(self.clock() * 1000)
        self._forget_expired(now_ms)
        if cmd.expires_at <= now_ms:
            raise CommandError("expired", f"expires_at {cmd.expires_at} <= now {now_ms}")
        if cmd.expires_at - now_ms > self.max_ttl_ms:
            raise CommandError("schema", f"expires_at more than {self.max_ttl_ms} ms ahead")
        if cmd.issued_at > now_ms + 60_000:  # a minute of clock skew allowed
            raise CommandError("not_yet_valid", "issued_at is in the future")
        if cmd.id in self._seen:
            raise CommandError("replayed", cmd.id)
        if len(self._seen) >= MAX_REMEMBERED:
            self._seen.pop(next(iter(self._seen)))
        self._seen[cmd.id] = cmd.expires_at

    def _forget_expired(self, now_ms: int) -> None:
        if not self._seen:
            return
        stale = [k for k, exp in self._seen.items() if exp <= now_ms]
        for k in stale:
            del self._seen[k]

    def _execute(self, cmd: _Cmd) -> None:
        by = f"fleet:{cmd.id}"
        if isinstance(cmd, SetPowerBudget):
            if cmd.watts is None:
                self.agent.set_fleet_budget(None, by=by)
            else:
                budget = FleetBudget(
                    watts=cmd.watts,
                    id=cmd.id,
                    ramp_w_per_s=cmd.ramp_w_per_s,
                    expires_at_wall=None if cmd.valid_until is None else cmd.valid_until / 1000.0,
                )
                self.agent.set_fleet_budget(budget, by=by)
        elif isinstance(cmd, Ack):
            if self.agent.events.ack(cmd.event_id, by=by) is None:
                raise CommandError("unknown_event", cmd.event_id)
        elif isinstance(cmd, Rebirth):
            self.rebirth()
        elif isinstance(cmd, PollNow):
            poller = self.agent.pollers.get(cmd.device)
            if poller is None:
                poller = self.agent.pollers.get(self.agent.store.parent_of(cmd.device))
            if poller is None:
                raise CommandError("unknown_device", cmd.device)
            poller.poll_now()

    def _audit(self, reply: dict[str, Any]) -> None:
        ok = bool(reply.get("ok"))
        if ok:
            self.accepted += 1
        else:
            self.refused += 1
        detail = {k: reply[k] for k in ("id", "command", "ok", "error") if k in reply}
        text = f"fleet command {reply.get('command')} id={reply.get('id')}: " + (
            "ok" if ok else f"refused ({reply.get('error')})"
        )
        try:
            self.agent.events.emit("command", Severity.INFO if ok else Severity.WARNING, text, detail=detail)
        except Exception:  # auditing must not turn a reply into a crash
            log.exception("command audit event failed")
