"""The coolant escalation ladder, as pure functions over one loop's escalation instance.

Rungs (docs/interlocks.md): 0 none; 1 every GPU of the loop to ``deep_cap_pct``; 2 every GPU to
its minimum limit; the rung after 2 is ``shed`` (the engine's shed rule, if enabled). A rung is
climbed while the loop's coolant caps are in force, at least ``stage_hold_s`` after the caps (or
the previous rung) took effect, when the supply temperature still rises (by ``rise_c`` over
``rise_window_s``) or is at or above ``critical_c``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from agent.interlocks.config import CoolantEscalation
from agent.interlocks.types import GpuLimits, Instance

TOP_RUNG = 2


def rise_over(history: deque[tuple[float, float]], window_s: float) -> float | None:
    """How much the supply temperature rose over the last ``window_s`` (C); None with too little
    history (less than 60% of the window)."""
    if len(history) < 2:
        return None
    t_last, v_last = history[-1]
    for t, v in history:
        if t_last - t <= window_s + 1e-6:
            if t_last - t < 0.6 * window_s:
                return None
            return v_last - v
    return None


def rung_caps(
    rung: int, cfg: CoolantEscalation, gpus: Sequence[str], limits: Mapping[str, GpuLimits | None]
) -> dict[str, float]:
    caps: dict[str, float] = {}
    for g in gpus:
        lim = limits.get(g)
        if lim is None:
            continue
        if rung >= TOP_RUNG:
            caps[g] = lim.min_w
        elif rung == 1:
            caps[g] = max(lim.min_w, min(lim.max_w, lim.default_w * cfg.deep_cap_pct / 100.0))
    return caps


def step_ladder(
    inst: Instance,
    cfg: CoolantEscalation,
    *,
    now: float,
    supply_c: float | None,
    rise_c: float | None,
    caps_since: float | None,
    gpus: Sequence[str],
    limits: Mapping[str, GpuLimits | None],
) -> str | None:
    """Advance one loop's ladder. Returns "climb" (inst.stage went up one rung, caps set),
    "clear" (the coolant caps are gone: the ladder is down) or None. Explained by ``detail``."""
    if caps_since is None:
        if inst.stage == 0:
            return None
        inst.stage, inst.stage_since = 0, None
        inst.tripped_since, inst.caps = None, {}
        return "clear"
    if inst.stage >= TOP_RUNG:
        inst.caps.update(rung_caps(inst.stage, cfg, gpus, limits))  # GPUs whose limits came late
        return None
    since = inst.stage_since if inst.stage_since is not None else caps_since
    if supply_c is None or now - since < cfg.stage_hold_s:
        return None
    rising = rise_c is not None and rise_c >= cfg.rise_c
    critical = supply_c >= cfg.critical_c
    if not (rising or critical):
        return None
    inst.stage += 1
    inst.stage_since = now
    inst.tripped_since = inst.tripped_since if inst.tripped_since is not None else now
    caps = rung_caps(inst.stage, cfg, gpus, limits)
    inst.caps = {g: min(w, inst.caps.get(g, w)) for g, w in caps.items()}
    inst.detail = ladder_detail(cfg, inst.stage, supply_c, rise_c, now - caps_since, critical, rising)
    return "climb"


def ladder_detail(
    cfg: CoolantEscalation,
    stage: int,
    supply_c: float,
    rise_c: float | None,
    caps_for_s: float,
    critical: bool,
    rising: bool,
) -> dict[str, Any]:
    return {
        "stage": stage,
        "action": "minimum caps" if stage >= TOP_RUNG else f"caps to {cfg.deep_cap_pct:g}%",
        "why": ("critical" if critical else "")
        + (" and " if critical and rising else "")
        + ("still rising" if rising else ""),
        "inputs": {
            "supply_temp_c": round(supply_c, 2),
            "rise_c": None if rise_c is None else round(rise_c, 2),
            "caps_in_force_s": round(caps_for_s, 1),
        },
        "thresholds": {
            "rise_c": cfg.rise_c,
            "rise_window_s": cfg.rise_window_s,
            "stage_hold_s": cfg.stage_hold_s,
            "critical_c": cfg.critical_c,
            "deep_cap_pct": cfg.deep_cap_pct,
        },
    }
