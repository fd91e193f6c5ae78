"""Events: interlock trips and clears, actions, failures, overrides, device up/down, commands.

One bus: the audit log, MQTT (``.../event``) and the control socket (``podctl events``) subscribe.
``publish`` is synchronous and cheap, so the interlock loop never waits on a subscriber.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


_counter = itertools.count(1)
_boot = os.urandom(3).hex()


def new_event_id() -> str:
    """Short, unique per agent lifetime, and sortable within it: ``ev-<boot>-<n>``."""
    return f"ev-{_boot}-{next(_counter)}"


@dataclass(frozen=True)
class Event:
    kind: str  # interlock_trip, interlock_clear, cap_applied, actuation_failed, override_set, ...
    severity: Severity
    message: str
    device: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    needs_ack: bool = False
    id: str = field(default_factory=new_event_id)
    ts_wall: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["severity"] = str(self.severity)
        d["ts"] = int(self.ts_wall * 1000)
        return d


EventSubscriber = Callable[[Event], None]

# What the audit log keeps for its full retention time, whatever else happens (agent/audit.py).
SAFETY_KINDS = frozenset(
    {
        "interlock_trip",
        "interlock_clear",
        "cap_applied",
        "action",
        "actuation_failed",
        "actuation_recovered",
        "reconciled",
        "override_set",
        "override_cleared",
        "override_expired",
        "ack",
        "budget_set",
        "budget_cleared",
        "shed",
    }
)
MAX_UNACKED = 10_000  # events awaiting an ack, kept apart from the recent ring


def is_safety(event: Event) -> bool:
    return event.kind in SAFETY_KINDS or event.needs_ack or event.severity is Severity.CRITICAL


@dataclass
class AckRecord:
    event_id: str
    by: str
    ts_wall: float


class EventBus:
    def __init__(self, keep: int = 2000) -> None:
        self._recent: deque[Event] = deque(maxlen=keep)
        self._subscribers: list[EventSubscriber] = []
        self.acks: dict[str, AckRecord] = {}
        # Events needing an ack stay ackable however many events come after them (oldest first).
        self._awaiting: dict[str, Event] = {}

    def subscribe(self, callback: EventSubscriber) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def publish(self, event: Event) -> Event:
        self._recent.append(event)
        if event.needs_ack:
            self._awaiting[event.id] = event
            if len(self._awaiting) > MAX_UNACKED:
                oldest = next(iter(self._awaiting))
                log.warning("too many events awaiting an ack; the oldest is no longer tracked", event=oldest)
                del self._awaiting[oldest]
        for sub in tuple(self._subscribers):
            try:
                sub(event)
            except Exception:  # one subscriber's bug must not stop the others or the caller
                log.exception("event subscriber failed")
        return event

    def emit(self, kind: str, severity: Severity, message: str, **kw: Any) -> Event:
        return self.publish(Event(kind=kind, severity=severity, message=message, **kw))

    def recent(self, *, since_wall: float | None = None, limit: int = 200) -> list[Event]:
        items = [e for e in self._recent if since_wall is None or e.ts_wall >= since_wall]
        return items[-limit:]

    def find(self, event_id: str) -> Event | None:
        waiting = self._awaiting.get(event_id)
        if waiting is not None:
            return waiting
        for e in reversed(self._recent):
            if e.id == event_id:
                return e
        return None

    def unacked(self) -> list[Event]:
        return [e for e in self._awaiting.values() if e.id not in self.acks]

    def ack(self, event_id: str, *, by: str) -> Event | None:
        """Acknowledge an event; returns the ack event (None: unknown id)."""
        target = self.find(event_id)
        if target is None:
            return None
        self.acks[event_id] = AckRecord(event_id=event_id, by=by, ts_wall=time.time())
        self._awaiting.pop(event_id, None)
        return self.emit(
            "ack",
            Severity.INFO,
            f"{event_id} acknowledged by {by}",
            device=target.device,
            detail={"event_id": event_id, "event_kind": target.kind, "by": by},
        )
