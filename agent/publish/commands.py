"""Inbound fleet commands (``{root}/cmd/{name}``): validate, authenticate, execute, reply.

``CommandHandler.handle(name, payload)`` never raises, whatever the bytes: every outcome is a
reply ``{id, ok, error?}`` and an audit event (kind ``command``) on the bus.

Signing (when ``command_hmac_key_file`` is configured, a signature is required): the command's
JSON object has a field ``sig`` = lowercase hex HMAC-SHA256, keyed with the pod's key (the file's
bytes, stripped of surrounding whitespace), of the canonical form of the object *without* ``sig``:
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` encoded as UTF-8.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.budget import FleetBudget
from agent.events import Severity
from agent.power.curtail import MAX_DURATION_S, CurtailRefused, validate_curtail
from agent.statefile import read_json, write_atomic

log = structlog.get_logger(__name__)

MAX_ID_LEN = 128
MAX_REMEMBERED = 100_000  # replay memory bound (ids are also forgotten when they expire)


# JSON numbers only where numbers belong: strict (no bools, no strings), finite.
Millis = Annotated[int, Field(strict=True, ge=0, le=2**53)]  # ms since epoch, UTC
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_LEN)]
    issued_at: Millis
    expires_at: Millis
    sig: Annotated[str, Field(strict=True)] | None = None


class SetPowerBudget(_Cmd):
    # The pod's total power budget; null clears it. Its bounds (a floor, the site limit) are the
    # agent's config: checked by the handler.
    watts: Annotated[Finite, Field(gt=0)] | None
    ramp_w_per_s: Annotated[Finite, Field(gt=0)] | None = None
    # ms since epoch: the budget lapses then (None: until replaced).
    valid_until: Millis | None = None


class Ack(_Cmd):
    event_id: Annotated[str, Field(strict=True, min_length=1, max_length=256)]


class Rebirth(_Cmd):
    pass


class PollNow(_Cmd):
    device: Annotated[str, Field(strict=True, min_length=1, max_length=128)]


class Curtail(_Cmd):
    # Hold the site meter's grid import at target_w, or at fraction x the import at start_at, for
    # duration_s, reached within deadline_s of the start; then released at the contract's ramp.
    # Physical bounds here; what this pod can deliver is the power service's (agent/power/curtail.py).
    target_w: Annotated[Finite, Field(ge=0, le=1e9)] | None = None
    fraction: Annotated[Finite, Field(ge=0, lt=1)] | None = None
    start_at: Millis | None = None  # ms since epoch, UTC; absent: now
    duration_s: Annotated[Finite, Field(gt=0, le=MAX_DURATION_S)]
    deadline_s: Annotated[Finite, Field(gt=0, le=3600)] | None = None


COMMANDS: dict[str, type[_Cmd]] = {
    "set_power_budget": SetPowerBudget,
    "ack": Ack,
    "rebirth": Rebirth,
    "poll_now": PollNow,
    "curtail": Curtail,
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
    "refused",
    "internal",
]


class CommandError(Exception):
    def __init__(self, code: ErrorCode, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def parse_json(payload: bytes) -> Any:
    """Strict JSON: UTF-8 only (no BOM, no UTF-16/32, which json.loads would guess), finite
    numbers only (no NaN, Infinity, or 1e400). CommandError("not_json") otherwise."""
    if payload.startswith(b"\xef\xbb\xbf"):
        raise CommandError("not_json", "a byte order mark: commands are UTF-8 without a BOM")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CommandError("not_json", f"not UTF-8: {err}"[:200]) from None
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise CommandError("not_json", str(err)[:200]) from None


def _budget_from(saved: dict[str, Any]) -> FleetBudget | None:
    """A saved budget back, if it is one (a hand-edited or corrupt file is ignored)."""
    watts = saved.get("watts")
    ramp = saved.get("ramp_w_per_s")
    expires = saved.get("expires_at_wall")
    ident = saved.get("id", "")

    def number(v: Any) -> bool:
        return type(v) in (int, float) and math.isfinite(v) and v > 0

    if not number(watts) or not (ramp is None or number(ramp)) or not (expires is None or number(expires)):
        return None
    if not isinstance(ident, str):
        return None
    assert isinstance(watts, int | float)
    return FleetBudget(
        watts=float(watts),
        id=ident,
        ramp_w_per_s=None if ramp is None else float(ramp),
        expires_at_wall=None if expires is None else float(expires),
    )


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
        budget_min_w: float = 0.0,
        budget_max_w: float = 1e8,
        state_path: Path | None = None,
    ) -> None:
        self.agent = agent
        self.hmac_key = hmac_key
        self.max_bytes = max_bytes
        self.max_ttl_ms = int(max_ttl_s * 1000)
        self.rebirth = rebirth
        self.clock = clock
        self.budget_min_w = budget_min_w  # a budget below this would starve the pod: a typo, refused
        self.budget_max_w = budget_max_w  # the site limit: a budget above it means nothing
        self._seen: dict[str, int] = {}  # id -> expires_at (ms), insertion ordered
        self.accepted = 0
        self.refused = 0
        # Durable: seen ids (until they expire) and the fleet budget in force survive a restart.
        self.state_path = state_path
        self._budget: dict[str, Any] | None = None  # the last set_power_budget in force, as saved
        self.state_fault: str | None = None
        self._save_later: asyncio.TimerHandle | None = None
        if state_path is not None:
            self._load()

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
        obj = parse_json(bytes(payload))
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
            self._check_bounds(cmd)
            self._check_fresh(cmd)
            self._execute(cmd)
            if isinstance(cmd, SetPowerBudget):
                self._save(now=True)  # the budget in force, durable before the reply says ok
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
        # Bytes, not str: compare_digest refuses non-ASCII text (a TypeError, not a verdict).
        if not hmac.compare_digest(expected.encode(), sig.lower().encode("utf-8", "replace")):
            raise CommandError("bad_signature")

    def _check_bounds(self, cmd: _Cmd) -> None:
        if (
            isinstance(cmd, SetPowerBudget)
            and cmd.watts is not None
            and not self.budget_min_w <= cmd.watts <= self.budget_max_w
        ):
            raise CommandError(
                "schema",
                f"watts: {cmd.watts:g} is outside [{self.budget_min_w:g}, {self.budget_max_w:g}] W "
                "(the configured floor and the site limit)",
            )

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
        self._save(now=isinstance(cmd, SetPowerBudget))

    def _forget_expired(self, now_ms: int) -> None:
        if not self._seen:
            return
        stale = [k for k, exp in self._seen.items() if exp <= now_ms]
        for k in stale:
            del self._seen[k]

    # ------------------------------------------------------------------ durable state
    def _load(self) -> None:
        assert self.state_path is not None
        data = read_json(self.state_path)
        if not isinstance(data, dict) or data.get("version") != 1:
            return
        now_ms = int(self.clock() * 1000)
        seen = data.get("seen")
        if isinstance(seen, dict):
            for k, exp in seen.items():
                if (
                    isinstance(k, str)
                    and type(exp) is int
                    and exp > now_ms
                    and len(self._seen) < MAX_REMEMBERED
                ):
                    self._seen[k] = exp
        budget = data.get("budget")
        if isinstance(budget, dict):
            restored = _budget_from(budget)
            if restored is not None and restored.active(now_ms / 1000.0):
                self._budget = budget
                try:
                    self.agent.set_fleet_budget(
                        restored, by=f"fleet:{restored.id} (restored after a restart)"
                    )
                except Exception:  # the agent refusing it must not stop the link
                    log.exception("restoring the fleet budget failed")
        log.info(
            "command state restored",
            path=str(self.state_path),
            seen_ids=len(self._seen),
            budget=None if self._budget is None else self._budget.get("watts"),
        )

    def _save(self, *, now: bool) -> None:
        """Write the state file: at once for what must survive a crash (a budget, a seen budget id),
        else at most once a second (a flood of commands is not a flood of fsyncs)."""
        if self.state_path is None:
            return
        if not now:
            if self._save_later is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    now = True
                else:
                    self._save_later = loop.call_later(1.0, self._save_pending)
            if not now:
                return
        self._write_state()

    def _save_pending(self) -> None:
        self._save_later = None
        self._write_state()

    def _write_state(self) -> None:
        assert self.state_path is not None
        self._forget_expired(int(self.clock() * 1000))
        body = {"version": 1, "seen": self._seen, "budget": self._budget}
        try:
            write_atomic(self.state_path, json.dumps(body, separators=(",", ":")).encode())
        except OSError as err:
            why = f"{type(err).__name__}: {err}"
            if self.state_fault is None:
                log.error("command state not saved; kept in memory, retried on the next change", error=why)
                self._storage_event("storage_fault", Severity.WARNING, why)
            self.state_fault = why
            return
        if self.state_fault is not None:
            self.state_fault = None
            log.warning("command state saved again", path=str(self.state_path))
            self._storage_event("storage_recovered", Severity.INFO, None)

    def _storage_event(self, kind: str, severity: Severity, error: str | None) -> None:
        text = "fleet command state: " + (
            f"the disk refuses writes ({error})" if error else "the disk takes writes again"
        )
        detail: dict[str, Any] = {"store": "commands", "path": str(self.state_path)}
        if error:
            detail["error"] = error
        with contextlib.suppress(Exception):
            self.agent.events.emit(kind, severity, text, detail=detail)

    def close(self) -> None:
        if self._save_later is not None:
            self._save_later.cancel()
            self._save_later = None
            self._write_state()

    def _execute(self, cmd: _Cmd) -> None:
        by = f"fleet:{cmd.id}"
        if isinstance(cmd, SetPowerBudget):
            if cmd.watts is None:
                self.agent.set_fleet_budget(None, by=by)
                self._budget = None
            else:
                budget = FleetBudget(
                    watts=cmd.watts,
                    id=cmd.id,
                    ramp_w_per_s=cmd.ramp_w_per_s,
                    expires_at_wall=None if cmd.valid_until is None else cmd.valid_until / 1000.0,
                )
                self.agent.set_fleet_budget(budget, by=by)
                self._budget = budget.to_dict()
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
        elif isinstance(cmd, Curtail):
            self._curtail(cmd)

    def _curtail(self, cmd: Curtail) -> None:
        body = cmd.model_dump(include={"target_w", "fraction", "start_at", "duration_s", "deadline_s"})
        try:
            order = validate_curtail(cmd.id, {k: v for k, v in body.items() if v is not None}, self.clock())
        except CurtailRefused as err:
            raise CommandError("schema", str(err)) from None
        sink = getattr(self.agent, "curtail_sink", None)
        if sink is None:
            raise CommandError("refused", "no power service ([power] enabled = false) to deliver it")
        try:
            sink(order)
        except CurtailRefused as err:
            raise CommandError("refused", str(err)) from None

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
