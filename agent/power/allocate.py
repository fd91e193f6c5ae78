"""Per-GPU power caps from a GPU power budget: a pure function (no I/O, no clock).

Fair share by water-filling: idle GPUs keep what they draw plus a margin (at least their NVML
minimum), and the rest of the budget is shared equally among the busy ones, each within its own
[min, default] constraint, so what one GPU cannot take (its default is lower, or it is idle) goes to
the others. When the budget covers every GPU's default limit nothing is capped. Hysteresis: a
re-plan that moves no GPU by more than ``hysteresis_w`` keeps the previous caps, unless the
previous caps no longer fit the budget (lowering is never delayed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GpuInput:
    min_w: float
    max_w: float
    default_w: float
    power_w: float | None = None  # measured draw (None: unknown; treated as busy)
    util_pct: float | None = None


@dataclass(frozen=True, slots=True)
class Allocation:
    caps: dict[str, float]  # GPU -> cap (W); empty when the budget is not binding
    binding: bool
    feasible: bool  # False: even every GPU at its minimum exceeds the budget
    budget_w: float
    busy: int
    idle: int


def _water_fill(budget: float, bounds: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Equal level L with sum(clamp(L, lo, hi)) == budget (bisection; bounds lo <= hi)."""
    if not bounds:
        return {}
    lo_sum = sum(lo for lo, _ in bounds.values())
    hi_sum = sum(hi for _, hi in bounds.values())
    if budget <= lo_sum:
        return {g: lo for g, (lo, _) in bounds.items()}
    if budget >= hi_sum:
        return {g: hi for g, (_, hi) in bounds.items()}
    a = min(lo for lo, _ in bounds.values())
    b = max(hi for _, hi in bounds.values())
    for _ in range(60):
        mid = (a + b) / 2
        if sum(min(max(mid, lo), hi) for lo, hi in bounds.values()) > budget:
            b = mid
        else:
            a = mid
    return {g: min(max(a, lo), hi) for g, (lo, hi) in bounds.items()}


def allocate(
    budget_w: float | None,
    gpus: Mapping[str, GpuInput],
    *,
    previous: Mapping[str, float] | None = None,
    hysteresis_w: float = 15.0,
    idle_util_pct: float = 10.0,
    idle_margin_w: float = 50.0,
) -> Allocation:
    """Caps for ``gpus`` so that their power limits add up to at most ``budget_w`` (GPU watts)."""
    previous = previous or {}
    ceiling = sum(g.default_w for g in gpus.values())
    # Once capping, release only with a margin: a budget hovering at the ceiling must not toggle.
    release_at = ceiling + (hysteresis_w * len(gpus) if previous else 0.0)
    if budget_w is None or budget_w >= release_at or not gpus:
        return Allocation({}, False, True, budget_w or 0.0, len(gpus), 0)
    idle = {
        name
        for name, g in gpus.items()
        if g.util_pct is not None and g.power_w is not None and g.util_pct < idle_util_pct
    }
    caps: dict[str, float] = {}
    for name in idle:
        g = gpus[name]
        assert g.power_w is not None
        caps[name] = min(g.default_w, max(g.min_w, g.power_w + idle_margin_w))
    busy = {n: (g.min_w, max(g.min_w, min(g.default_w, g.max_w))) for n, g in gpus.items() if n not in idle}
    rest = budget_w - sum(caps.values())
    if busy and rest >= sum(hi for _, hi in busy.values()):
        # The busy GPUs fit at their defaults: the idle ones share what is left above their margin.
        caps.update({n: hi for n, (_, hi) in busy.items()})
        spare = rest - sum(hi for _, hi in busy.values())
        idle_bounds = {n: (caps[n], gpus[n].default_w) for n in idle}
        caps.update(_water_fill(sum(caps[n] for n in idle) + spare, idle_bounds))
    elif busy:
        caps.update(_water_fill(max(rest, 0.0), busy))
    feasible = sum(g.min_w for g in gpus.values()) <= budget_w
    if not feasible:
        caps = {n: g.min_w for n, g in gpus.items()}
    if previous and set(previous) == set(caps):
        moved = max(abs(caps[n] - previous[n]) for n in caps)
        if moved <= hysteresis_w and sum(previous.values()) <= budget_w + 1e-6:
            caps = dict(previous)
    return Allocation(caps, True, feasible, budget_w, len(busy), len(idle))
