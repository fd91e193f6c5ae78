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
