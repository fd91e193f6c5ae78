"""One control period of the pod's power: budgets -> grid import target -> battery -> GPU budget.

Pure apart from the small ``RampState`` it carries between periods (passed in, updated in place),
so the agent's service and ``bench/grid_ramp.py`` run exactly the same code.

Order of means (docs/power.md): the battery absorbs load swings first (it discharges when the load
jumps, charges when it drops) so that the grid import moves at most ``ramp_limit_w_per_s``; with a
battery the grid follows the load's moving average (plus a slow SoC correction), not the load.
Only when the battery is absent, faulted or at a SoC bound does the load itself have to follow the
grid target: the GPU budget is lowered (caps, at once) and rises with the ramp. A load drop that
the battery cannot absorb cannot be held up by caps: the grid target follows it down.
Budgets (static site limit, fleet budget, grid import limit) beat the ramp: a lower limit applies
at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agent.drivers.smoothing import SmoothingSettings
from agent.power.config import Fallback, PowerConfig


@dataclass(frozen=True, slots=True)
class BatteryInput:
    soc_pct: float
    power_w: float  # + discharge, - charge
    max_charge_w: float
    max_discharge_w: float
    faults: int = 0


@dataclass(frozen=True, slots=True)
class Inputs:
    dt: float  # seconds since the previous period
    pod_power_w: float | None  # IT load: the PDUs' sum
    gpu_power_w: float | None  # sum of the GPUs' measured power
    grid_w: float | None  # site meter import
    battery: BatteryInput | None
    pod_limits: dict[str, float] = field(default_factory=dict)  # source -> limit on pod IT power
    grid_limit_w: float | None = None  # None: the config's grid_import_limit_w


@dataclass
class RampState:
    grid_cmd_w: float | None = None  # the ramped grid import target
    load_avg_w: float | None = None  # the site load's moving average
    capping: bool = False  # the last period had to hold the load down with GPU caps


@dataclass(frozen=True, slots=True)
class Decision:
    site_load_w: float | None  # grid + battery discharge: what the site draws
    aux_w: float | None  # site load minus the pod's IT load (cooling)
    grid_target_w: float | None
    battery_setpoint_w: float | None  # None: no battery to command
    pod_budget_w: float | None  # the pod's IT power the GPUs are allocated against
    budget_source: str | None  # which limit set pod_budget_w
    gpu_budget_w: float | None  # pod_budget_w minus the measured non-GPU load
    discharge_avail_w: float
    charge_avail_w: float


def _available(cfg: PowerConfig, bat: BatteryInput | None) -> tuple[float, float]:
    """(discharge, charge) the agent may use now: the BMS's limits inside our own SoC bounds."""
    if bat is None or bat.faults:
        return 0.0, 0.0
    dis = bat.max_discharge_w if bat.soc_pct > cfg.soc_min_pct else 0.0
    chg = bat.max_charge_w if bat.soc_pct < cfg.soc_max_pct else 0.0
    return max(0.0, dis), max(0.0, chg)


def control_step(
    cfg: PowerConfig, inp: Inputs, state: RampState, *, fallback: Fallback | None = None
) -> Decision:
    """One control period. ``fallback`` overrides ``cfg.no_battery_fallback`` (the power service
    falls back on trough caps where the configured soft floor cannot run: no filler backend)."""
    bat = inp.battery
    bat_w = bat.power_w if bat is not None else 0.0
    if inp.grid_w is not None:
        site = inp.grid_w + bat_w
    elif inp.pod_power_w is not None:
        site = inp.pod_power_w  # no meter: the cooling load is unknown, take the IT load
    else:
        site = None
    aux = max(0.0, site - inp.pod_power_w) if site is not None and inp.pod_power_w is not None else None
    dis, chg = _available(cfg, bat)
    has_battery = dis > 0.0 or chg > 0.0

    # The pod limits (site, fleet): the lowest wins.
    pod_budget: float | None = None
    source: str | None = None
    for name, watts in sorted(inp.pod_limits.items()):
        if pod_budget is None or watts < pod_budget:
            pod_budget, source = watts, name
    grid_limit_w = inp.grid_limit_w if inp.grid_limit_w is not None else cfg.grid_import_limit_w
    grid_limit = grid_limit_w - cfg.margin_w if grid_limit_w is not None else None

    grid_target: float | None = None
    setpoint: float | None = None
    if site is not None and cfg.ramp_limit_w_per_s is not None:
        dt = max(inp.dt, 0.0)
        if state.grid_cmd_w is None or state.load_avg_w is None:
            state.grid_cmd_w = inp.grid_w if inp.grid_w is not None else site
            state.load_avg_w = site
        state.load_avg_w += (site - state.load_avg_w) * (1.0 - math.exp(-dt / cfg.smoothing_s))
        if has_battery and bat is not None:
            desired = state.load_avg_w - cfg.soc_gain_w_per_pct * (bat.soc_pct - cfg.soc_target_pct)
        else:
            desired = site
        soft = not has_battery and (fallback or cfg.no_battery_fallback) == "soft_floor"
        if soft:
            state.capping = False  # the filler floor smooths the load; caps would cost work
        step = cfg.ramp_limit_w_per_s * dt
        upper, lower = state.grid_cmd_w + step, state.grid_cmd_w - step
        if state.capping:
            desired = max(desired, upper)  # the load is held down: its real demand is higher
        g = min(max(desired, lower), upper)
        g = min(g, site + chg)  # the load fell further than the battery can absorb: follow it
        if grid_limit is not None:
            g = min(g, grid_limit)  # a budget beats the ramp
        g = max(g, 0.0)
        state.grid_cmd_w = g
        grid_target = g
        if bat is not None:
            setpoint = min(max(site - g, -chg), dis)
        if soft:
            # The target only reports; budgets (the import limit among them) still cap at once.
            g = min(site, grid_limit) if grid_limit is not None else site
            state.grid_cmd_w = grid_target = g
            if grid_limit is not None:
                grid_pod = grid_limit - (aux or 0.0)
                if pod_budget is None or grid_pod < pod_budget:
                    pod_budget, source = grid_pod, "grid_import_limit"
        else:
            ramp_pod = g + dis - (aux or 0.0)
            state.capping = site - dis >= g - 0.01 * max(g, 1.0)
            if pod_budget is None or ramp_pod < pod_budget:
                pod_budget, source = ramp_pod, "grid_ramp"
    elif grid_limit is not None and site is not None:
        # No ramp limiting: only the grid import limit; the battery shaves what is over it.
        grid_target = grid_limit
        if bat is not None:
            setpoint = min(max(site - grid_limit, 0.0), dis)
        grid_pod = grid_limit + dis - (aux or 0.0)
        if pod_budget is None or grid_pod < pod_budget:
            pod_budget, source = grid_pod, "grid_import_limit"

    gpu_budget: float | None = None
    if pod_budget is not None and inp.pod_power_w is not None and inp.gpu_power_w is not None:
        non_gpu = max(0.0, inp.pod_power_w - inp.gpu_power_w)
        gpu_budget = pod_budget - cfg.margin_w - non_gpu
    return Decision(
        site_load_w=site,
        aux_w=aux,
        grid_target_w=grid_target,
        battery_setpoint_w=setpoint,
        pod_budget_w=pod_budget,
        budget_source=source,
        gpu_budget_w=gpu_budget,
        discharge_avail_w=dis,
        charge_avail_w=chg,
    )


# ---------------------------------------------------------------------- software fallback
@dataclass
class SoftFloorState:
    envelope_w: dict[str, float] = field(default_factory=dict)  # per GPU: its recent peak draw
    hold_until: dict[str, float] = field(default_factory=dict)


def soft_floor_step(
    cfg: PowerConfig,
    state: SoftFloorState,
    now: float,
    dt: float,
    draws: Mapping[str, float | None],
    caps: Mapping[str, float],
    ramp_down_w_per_s: float,
) -> dict[str, float]:
    """Per-GPU filler floors (W) for the software fallback without battery or GPU smoothing.

    Why a floor and not a rise limit: on synchronized training the rise from a trough is the whole
    swing (23 kW on the demo pod) and a compute phase is 9 s: holding it to 1 kW/s with caps
    starves every compute phase (today 42% of the work). Filling the troughs costs energy, not
    work: each GPU's draw is held at ``soft_floor_frac`` of its recent peak (held
    ``soft_floor_hold_s``, longer than a communication trough), and the peak then decays at the
    pod's ramp-down rate shared over the GPUs, so the job's end or a long pause reaches the grid
    as a ramp. The rise above the floor is left alone (1 - frac of the peak can still step).
    A GPU with no reading keeps no floor; no floor is above the GPU's cap."""
    n = max(1, len(draws))
    down = ramp_down_w_per_s / n
    floors: dict[str, float] = {}
    for gpu, draw in draws.items():
        if draw is None or not math.isfinite(draw):
            state.envelope_w.pop(gpu, None)
            state.hold_until.pop(gpu, None)
            continue
        env = state.envelope_w.get(gpu)
        if env is None or draw >= env:
            env = draw
            state.hold_until[gpu] = now + cfg.soft_floor_hold_s
        elif now >= state.hold_until.get(gpu, now):
            env = max(draw, env - down * max(dt, 0.0))
        state.envelope_w[gpu] = env
        floor = cfg.soft_floor_frac * env
        cap = caps.get(gpu)
        floors[gpu] = min(floor, cap) if cap is not None else floor
    for gone in set(state.envelope_w) - set(draws):
        del state.envelope_w[gone]
        state.hold_until.pop(gone, None)
    return floors


# ---------------------------------------------------------------------- GPU power smoothing
@dataclass(frozen=True, slots=True)
class SmoothingProfile:
    """What the agent asks of NVIDIA power smoothing on a GPU (nvmlPowerSmoothingProfile_v1 params:
    PERCENT_TMP_FLOOR, RAMP_UP_RATE, RAMP_DOWN_RATE in W/s, RAMP_DOWN_HYSTERESIS in ms)."""

    name: str
    floor_pct: float
    ramp_up_w_per_s: float
    ramp_down_w_per_s: float
    hysteresis_ms: float

    @property
    def settings(self) -> SmoothingSettings:
        return SmoothingSettings(
            self.floor_pct, self.ramp_up_w_per_s, self.ramp_down_w_per_s, self.hysteresis_ms
        )


# With a battery carrying the slow swing: a low floor (the checkpoint pauses cost little), fast
# rates (the rise costs ~0.1 s of a step) and a short hysteresis (every held fall is burnt energy:
# 500 ms cost 11% on 4 s steps); the GPUs only take the edges off.
SMOOTHING_WITH_BATTERY = SmoothingProfile("with_battery", 20.0, 2000.0, 2000.0, 100.0)
# Alone, without a contract to size it from (only [power] ramp_limit_w_per_s): a high floor.
ALONE_FLOOR_PCT = 80.0
ALONE_HYSTERESIS_MS = 2000.0
FLOOR_PCT_RANGE = (20.0, 90.0)
MAX_HYSTERESIS_MS = 60_000.0  # NVML's RAMP_DOWN_HYSTERESIS range
MIN_RATE_W_PER_S = 1.0  # NVML's RAMP_UP/DOWN_RATE range starts here


def smoothing_alone(cfg: PowerConfig, tmp_w: Sequence[float]) -> SmoothingProfile:
    """Smoothing without a battery, sized from the contract for the GPUs that smooth (``tmp_w``:
    each one's TMP, its default power limit):

    - ramp rates: the contract's pod ramp (``ramp_up_w_per_s`` / ``ramp_down_w_per_s``, else
      ``ramp_limit_w_per_s``) shared out over the GPUs: together they move the import no faster
      than the contract allows, even when every GPU moves at once (synchronized training);
    - hysteresis: half the period of the band's lowest frequency (0.1 Hz: 5 s): a fall shorter
      than that (a communication phase) is held, so the swing the band would see never starts;
    - floor: what the contract's dynamic range leaves, ``1 - dynamic_range_w / sum(TMP)``
      (clamped to 20-90%): a checkpoint pause or the job's end falls at most that far.
    What it costs is energy (held falls and the floor burn power without work), not work: only a
    rise is slowed, and it starts from the held level. The import limit is not the GPUs' to keep:
    without a battery, a pod whose peak is over it loses work to caps whatever the smoothing."""
    gc = cfg.grid_contract
    total = sum(w for w in tmp_w if w > 0) or 1.0
    n = max(1, len(tmp_w))

    def rate(contract: float | None) -> float:
        pod = contract if contract is not None else cfg.ramp_limit_w_per_s
        return max(MIN_RATE_W_PER_S, (pod or 0.0) / n)

    up = rate(gc.ramp_up_w_per_s if gc is not None else None)
    down = rate(gc.ramp_down_w_per_s if gc is not None else None)
    hysteresis = ALONE_HYSTERESIS_MS
    floor = ALONE_FLOOR_PCT
    if gc is not None:
        if gc.band_lo_hz > 0:
            hysteresis = min(MAX_HYSTERESIS_MS, 1000.0 / (2.0 * gc.band_lo_hz))
        if gc.dynamic_range_w is not None:
            lo, hi = FLOOR_PCT_RANGE
            floor = min(hi, max(lo, 100.0 * (1.0 - gc.dynamic_range_w / total)))
    return SmoothingProfile("alone", round(floor, 1), round(up, 2), round(down, 2), round(hysteresis))


def choose_smoothing(cfg: PowerConfig, battery_ok: bool, tmp_w: Sequence[float]) -> SmoothingProfile | None:
    """The profile for the GPUs that have smoothing (``tmp_w``: each one's TMP), from the
    contract and the battery's state; None: release it (no ramp to keep, nothing to smooth for)."""
    if cfg.ramp_limit_w_per_s is None and cfg.grid_contract is None:
        return None
    return SMOOTHING_WITH_BATTERY if battery_ok else smoothing_alone(cfg, tmp_w)
