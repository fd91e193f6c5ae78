"""Power budgets from outside the pod (the fleet's ``set_power_budget``), with expiry."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FleetBudget:
    watts: float  # the pod's total power budget
    id: str = ""  # the command id that set it
    ramp_w_per_s: float | None = None  # how fast to move to it (None: at once)
    expires_at_wall: float | None = None  # seconds since epoch; None: until replaced

    def active(self, now_wall: float | None = None) -> bool:
        now = time.time() if now_wall is None else now_wall
        return self.expires_at_wall is None or now < self.expires_at_wall

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ramped_budget_w(
    target_w: float, ramp_w_per_s: float | None, start_w: float | None, elapsed_s: float
) -> float:
    """Where a budget moving from ``start_w`` to ``target_w`` at ``ramp_w_per_s`` stands after
    ``elapsed_s``: the fleet spreads a change over time (demand response, a feeder's ramp limit)
    instead of stepping the whole pod at once. No ramp or no start: the target at once."""
    if ramp_w_per_s is None or start_w is None:
        return target_w
    moved = ramp_w_per_s * max(0.0, elapsed_s)
    if target_w >= start_w:
        return min(target_w, start_w + moved)
    return max(target_w, start_w - moved)
