"""The interlock engine's data: its inputs (topology, overrides), its memory (instances) and its
outputs (decisions, actions). No logic beyond trivial properties."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.events import Event
from agent.model import Reading

Snapshot = Mapping[tuple[str, str], Reading]


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class GpuLimits:
    min_w: float
    max_w: float
    default_w: float


@dataclass(frozen=True)
class Topology:
    """What protects what: built from the agent config (and the GPUs' NVML constraints)."""

    gpus: tuple[str, ...]
    loops: Mapping[str, tuple[str, ...]]  # CDU id -> GPUs it cools
    pdus: Mapping[str, tuple[str, ...]]  # PDU id -> GPUs it feeds
    pdu_rating_a: Mapping[str, float]
    min_flow_lpm: Mapping[str, float]  # CDU id -> threshold (when its device config sets one)
    stale_after_s: Mapping[str, float]  # input device (or GPU) -> staleness limit
    outlet_gpus: Mapping[str, Mapping[int, tuple[str, ...]]] = field(default_factory=dict)  # for shed
    # Cooling devices (CDUs, chillers) -> their trip/fault/alarm metrics (raised as events at once)
    # and the GPUs whose cooling depends on them.
    alarm_metrics: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cooled_gpus: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Override:
    id: str
    interlock: str
    device: str
    reason: str
    by: str
    created_wall: float
    expires_wall: float
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "interlock": self.interlock,
            "device": self.device,
            "reason": self.reason,
            "by": self.by,
            "created_wall": self.created_wall,
            "expires_wall": self.expires_wall,
            "forced": self.forced,
        }


@dataclass(frozen=True)
class Action:
    """A discrete action for the actuators besides power caps."""

    kind: str  # "outlet_off", "cdu_setpoint"
    device: str
    value: float | int
    reason: str
    event_id: str


@dataclass
class Decision:
    caps: dict[str, float]  # GPU -> the power limit it should have now (ramped), W
    events: list[Event]
    actions: list[Action]
    inputs_changed: bool = True
    # The GPUs this step re-evaluated (all of them on a full step) and their caps: a subset of caps.
    evaluated: dict[str, float] | None = None


# ---------------------------------------------------------------------------------- memory
@dataclass
class Instance:
    """One interlock on one device: its condition timers and, while tripped, its caps."""

    interlock: str
    device: str
    gpus: tuple[str, ...]
    cond_since: float | None = None  # when the trip condition began (for sustain)
    tripped_since: float | None = None
    clear_since: float | None = None  # when the clear condition began (for hold)
    caps: dict[str, float] = field(default_factory=dict)  # per-GPU cap while tripped
    trip_event: str | None = None
    last_tighten: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
    shed_done: bool = False
    setpoint_lowered: bool = False
    stage: int = 0  # coolant_escalation: the rung of the ladder in force (0: none)
    stage_since: float | None = None

    @property
    def tripped(self) -> bool:
        return self.tripped_since is not None


@dataclass
class GpuMemory:
    temps: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=32))  # (ts, C)
    applied_w: float | None = None  # the cap the engine last asked for (ramped)
    last_raise: float = -math.inf
