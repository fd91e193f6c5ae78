"""``curtail``: a fleet order to hold the site's grid import down (Texas SB6-style curtailment).

Pure validation and plan; the MQTT command (agent/publish/commands.py) parses the envelope
(id, issued_at, expires_at) as for every command and hands the body here. Body:
``{"target_w": W}`` or ``{"fraction": 0..1}`` (of the grid import when the order starts),
``"start_at"`` (ms since epoch, UTC; absent: now), ``"duration_s"`` (> 0), ``"deadline_s"``
(how long after start the target must be reached; default 2 s). A refusal says why.

In force, the order's limit is one more grid import limit (the lowest wins, budgets beat the ramp,
so the target applies at once); after ``start + duration`` it is released at the contract's ramp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

MAX_DURATION_S = 24 * 3600.0


class CurtailRefused(ValueError):
    """The order is refused; the message says why (it goes into the command reply)."""


@dataclass(frozen=True, slots=True)
class CurtailOrder:
    id: str
    target_w: float | None
    fraction: float | None
    start_wall: float  # s since epoch
    duration_s: float
    deadline_s: float


def _number(body: Mapping[str, object], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise CurtailRefused(f"{key}: expected a finite number, got {v!r}")
    return float(v)


def validate_curtail(
    order_id: str, body: Mapping[str, object], now_wall: float, *, min_site_w: float = 0.0
) -> CurtailOrder:
    """A valid order, or ``CurtailRefused`` with the reason. ``min_site_w``: the site's floor
    (cooling plus every GPU at its minimum); a target under it cannot be delivered."""
    unknown = set(body) - {"target_w", "fraction", "start_at", "duration_s", "deadline_s"}
    if unknown:
        raise CurtailRefused(f"unknown keys: {', '.join(sorted(unknown))}")
    target, fraction = _number(body, "target_w"), _number(body, "fraction")
    if (target is None) == (fraction is None):
        raise CurtailRefused("give exactly one of target_w or fraction")
    if target is not None and target < 0:
        raise CurtailRefused("target_w must be >= 0")
    if target is not None and target < min_site_w:
        raise CurtailRefused(
            f"target_w {target:.0f} W is under what the site can go down to ({min_site_w:.0f} W)"
        )
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise CurtailRefused("fraction must be in [0, 1)")
    duration = _number(body, "duration_s")
    if duration is None or not 0.0 < duration <= MAX_DURATION_S:
        raise CurtailRefused(f"duration_s must be in (0, {MAX_DURATION_S:.0f}]")
    start_ms = _number(body, "start_at")
    start = now_wall if start_ms is None else start_ms / 1000.0
    if start + duration <= now_wall:
        raise CurtailRefused("the order ends in the past")
    deadline = _number(body, "deadline_s")
    deadline = 2.0 if deadline is None else deadline
    if not 0.0 < deadline <= duration:
        raise CurtailRefused("deadline_s must be in (0, duration_s]")
    return CurtailOrder(order_id, target, fraction, start, duration, deadline)


def curtail_limit_w(
    order: CurtailOrder, now_wall: float, import_at_start_w: float | None, ramp_w_per_s: float | None
) -> float | None:
    """The grid import limit the order sets now (None: not in force). A fraction applies to the
    import measured when the order started (``import_at_start_w``; None: not known yet, no limit).
    After the end the limit rises at ``ramp_w_per_s`` (None: released at once) until it no longer
    binds (the caller drops the order once the limit is above the import)."""
    if now_wall < order.start_wall:
        return None
    if order.target_w is not None:
        target = order.target_w
    elif import_at_start_w is not None and order.fraction is not None:
        target = order.fraction * import_at_start_w
    else:
        return None
    end = order.start_wall + order.duration_s
    if now_wall < end:
        return target
    if ramp_w_per_s is None:
        return None
    return target + ramp_w_per_s * (now_wall - end)


# Reached: the site meter's import at or under the target plus this share of it (a meter's own
# accuracy class and the inverter's regulation band; 1% or 100 W, whichever is more).
REACHED_TOLERANCE = 0.01
REACHED_TOLERANCE_MIN_W = 100.0


@dataclass
class CurtailRun:
    """One accepted order as the power service carries it out, measured at the site meter.

    ``phase``: ``scheduled`` (before its start), ``active`` (the target in force), ``releasing``
    (after the end, the limit climbing at the ramp), ``done``. ``reached_after_s`` is the meter
    reading's own time minus the start; ``missed`` says the deadline passed first."""

    order: CurtailOrder
    accepted_wall: float
    phase: str = "scheduled"
    import_at_start_w: float | None = None
    target_w: float | None = None
    limit_w: float | None = None
    reached_after_s: float | None = None
    missed: bool = False
    grid_w: float | None = None
    max_after_reached_w: float | None = None
    _sum_w: float = 0.0
    _n: int = 0

    def limit(
        self, now_wall: float, grid_w: float | None, ramp_w_per_s: float | None, release_at_w: float | None
    ) -> float | None:
        """The grid import limit the order sets now; moves the phase on. ``release_at_w``: once the
        released limit is above this (the import limit otherwise in force, or the load) it is done."""
        o = self.order
        if now_wall < o.start_wall or self.phase == "done":
            return None
        if self.import_at_start_w is None and grid_w is not None:
            self.import_at_start_w = grid_w
        lim = curtail_limit_w(o, now_wall, self.import_at_start_w, ramp_w_per_s)
        if self.target_w is None and lim is not None:
            self.target_w = lim
        end = o.start_wall + o.duration_s
        if now_wall < end:
            self.phase = "active"
        elif lim is None or (release_at_w is not None and lim >= release_at_w):
            self.phase, lim = "done", None
        else:
            self.phase = "releasing"
        self.limit_w = lim
        return lim

    def measure(self, grid_w: float | None, grid_wall: float | None) -> str | None:
        """One site meter reading (W, its wall time). Returns ``"reached"`` or ``"missed"`` the
        first time either happens (for the event), else None."""
        self.grid_w = grid_w
        if self.phase != "active" or self.target_w is None or grid_w is None or grid_wall is None:
            return None
        o = self.order
        if self.reached_after_s is not None:
            self._sum_w += grid_w
            self._n += 1
            self.max_after_reached_w = max(self.max_after_reached_w or grid_w, grid_w)
            return None
        tol = max(REACHED_TOLERANCE * self.target_w, REACHED_TOLERANCE_MIN_W)
        if grid_w <= self.target_w + tol and grid_wall >= o.start_wall:
            self.reached_after_s = grid_wall - o.start_wall
            self.max_after_reached_w = grid_w
            self._sum_w, self._n = grid_w, 1
            return "reached"
        if not self.missed and grid_wall > o.start_wall + o.deadline_s:
            self.missed = True
            return "missed"
        return None

    @property
    def mean_after_reached_w(self) -> float | None:
        return self._sum_w / self._n if self._n else None

    # -- kept across a restart (state_dir/curtail.json) -----------------------------------
    def to_json(self) -> dict[str, object]:
        o = self.order
        return {
            "id": o.id,
            "target_w": o.target_w,
            "fraction": o.fraction,
            "start_wall": o.start_wall,
            "duration_s": o.duration_s,
            "deadline_s": o.deadline_s,
            "accepted_wall": self.accepted_wall,
            "import_at_start_w": self.import_at_start_w,
            "reached_after_s": self.reached_after_s,
            "missed": self.missed,
        }

    @classmethod
    def from_json(cls, raw: object) -> CurtailRun | None:
        """The order kept by ``to_json``, or None when the file is not one (it is then dropped)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str):
            return None

        def num(key: str, *, required: bool = False) -> float | None:
            v = raw.get(key)
            if v is None and not required:
                return None
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(key)
            return float(v)

        try:
            order = CurtailOrder(
                raw["id"],
                num("target_w"),
                num("fraction"),
                num("start_wall", required=True) or 0.0,
                num("duration_s", required=True) or 0.0,
                num("deadline_s", required=True) or 0.0,
            )
            run = cls(order, accepted_wall=num("accepted_wall", required=True) or 0.0)
            run.import_at_start_w = num("import_at_start_w")
            run.reached_after_s = num("reached_after_s")
        except ValueError:
            return None
        if (order.target_w is None) == (order.fraction is None) or order.duration_s <= 0:
            return None
        run.missed = raw.get("missed") is True
        return run

    def status(self) -> dict[str, object]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 1)

        o = self.order
        mean = self.mean_after_reached_w
        delivered = None if self.import_at_start_w is None or mean is None else self.import_at_start_w - mean
        return {
            "id": o.id,
            "phase": self.phase,
            "start_at": int(o.start_wall * 1000),
            "duration_s": o.duration_s,
            "deadline_s": o.deadline_s,
            "fraction": o.fraction,
            "target_w": r(self.target_w),
            "limit_w": r(self.limit_w),
            "import_at_start_w": r(self.import_at_start_w),
            "grid_w": r(self.grid_w),
            # What the order delivered: the import at the start minus the mean import since reached.
            "delivered_w": r(delivered),
            "mean_import_w": r(mean),
            "max_import_after_reached_w": r(self.max_after_reached_w),
            "reached_after_s": None if self.reached_after_s is None else round(self.reached_after_s, 3),
            "reached_before_deadline": None
            if self.reached_after_s is None and not self.missed
            else (self.reached_after_s is not None and self.reached_after_s <= o.deadline_s),
            "missed_deadline": self.missed,
        }
