"""Grid-friendly power on the demo pod: synchronized training with checkpoint pauses, feature off / on.

Runs hwsim's physics in-process on simulated time (0.1 s ticks) and the agent's power controller
(``agent.power.control.control_step`` + ``agent.power.allocate.allocate``, the same code the agent's
PowerService runs) every control period, reading the simulated devices as the agent would (site
meter, BMS, PDU sum, GPU power/util/limits) and acting as the agent would (BMS grid target or
setpoint; GPU caps lowered at once and raised by the interlock engine's release ramp, +10% of the
default limit per 5 s). Deterministic for a seed; no sockets, so it finishes in seconds.

    .venv/bin/python bench/grid_ramp.py [--seconds 600] [--seed 1] [--json]

Figures: peak grid import, max grid ramp (W/s, tick-to-tick and on 1 s means), time over the grid
import limit, and GPU energy relative to the unconstrained run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from agent.power.allocate import GpuInput, allocate
from agent.power.config import PowerConfig
from agent.power.control import BatteryInput, Inputs, RampState, control_step
from bench import harness
from hwsim.physics import Physics
from hwsim.podspec import BatterySpec, PodSpec, SiteMeterSpec, load_pod_spec
from hwsim.state import BATTERY_MODE_GRID_TARGET, BATTERY_MODE_SETPOINT

TICK_S = 0.1
RELEASE_STEP = 0.10  # interlock engine defaults: +10% of the default limit ...
RELEASE_INTERVAL_S = 5.0  # ... every 5 s


@dataclass
class Case:
    name: str
    battery: bool
    power: PowerConfig | None  # None: feature off


def pod_spec(battery: bool) -> PodSpec:
    spec = load_pod_spec("demo")
    data = spec.model_dump()
    data["workload"].update(profile="synchronized", checkpoint_every=10, checkpoint_s=20.0)
    data["battery"] = BatterySpec(id="bms-1").model_dump() if battery else None
    data["site_meter"] = SiteMeterSpec(id="site-meter").model_dump()
    return PodSpec.model_validate(data)


def run(case: Case, seconds: float, seed: int, grid_limit_w: float) -> dict[str, Any]:
    phys = Physics(pod_spec(case.battery), seed=seed)
    st = phys.state
    cfg = case.power
    ramp = RampState()
    caps: dict[str, float] = {}
    applied: dict[int, float] = {g.index: g.default_limit_w for g in st.gpus}
    last_raise: dict[int, float] = dict.fromkeys(applied, -1e9)
    period_ticks = max(1, round((cfg.control_period_s if cfg else 0.2) / TICK_S))
    grid: list[float] = []
    ticks = round(seconds / TICK_S)
    if st.battery is not None and cfg is not None:
        st.battery.mode = (
            BATTERY_MODE_GRID_TARGET if cfg.battery_mode == "grid_target" else BATTERY_MODE_SETPOINT
        )
        st.battery.grid_target_w = st.site_meter.power_w if st.site_meter else 0.0
    soc_min = soc_max = st.battery.soc_pct if st.battery else None
    for k in range(ticks):
        t = k * TICK_S
        if cfg is not None and k > 0 and k % period_ticks == 0:
            bat = st.battery
            gpu_sum = sum(g.power_w for g in st.gpus)
            inputs = Inputs(
                dt=period_ticks * TICK_S,
                pod_power_w=phys.pod_load_w(),
                gpu_power_w=gpu_sum,
                grid_w=st.site_meter.power_w if st.site_meter else None,
                battery=None
                if bat is None
                else BatteryInput(
                    bat.soc_pct, bat.power_w, bat.max_charge_w, bat.max_discharge_w, bat.faults
                ),
                pod_limits={},
                grid_limit_w=cfg.grid_import_limit_w,
            )
            d = control_step(cfg, inputs, ramp)
            if bat is not None:
                if cfg.battery_mode == "grid_target" and d.grid_target_w is not None:
                    bat.set_grid_target_w(d.grid_target_w)
                elif d.battery_setpoint_w is not None:
                    bat.set_power_setpoint_w(d.battery_setpoint_w)
            gpus = {
                f"gpu{g.index}": GpuInput(
                    g.min_limit_w, g.max_limit_w, g.default_limit_w, g.power_w, g.util_gpu_pct
                )
                for g in st.gpus
            }
            alloc = allocate(d.gpu_budget_w, gpus, previous=caps, hysteresis_w=cfg.hysteresis_w)
            caps = alloc.caps
            for g in st.gpus:  # the interlock engine's combine: lower at once, raise by the ramp
                want = caps.get(f"gpu{g.index}", g.default_limit_w)
                cur = applied[g.index]
                if want < cur:
                    applied[g.index] = want
                    last_raise[g.index] = t
                elif want > cur and t - last_raise[g.index] >= RELEASE_INTERVAL_S:
                    applied[g.index] = min(want, cur + RELEASE_STEP * g.default_limit_w)
                    last_raise[g.index] = t
                if abs(g.power_limit_w - applied[g.index]) > 0.5:
                    phys.set_power_limit(g.index, applied[g.index])
        phys.step(TICK_S)
        assert st.site_meter is not None
        grid.append(st.site_meter.power_w)
        if st.battery is not None:
            soc_min = min(soc_min or 100.0, st.battery.soc_pct)
            soc_max = max(soc_max or 0.0, st.battery.soc_pct)
    warm = round(30.0 / TICK_S)  # skip the first 30 s (controller start, thermal settling)
    g = grid[warm:]
    ramp_tick = max(abs(b - a) for a, b in itertools.pairwise(g)) / TICK_S
    per_s = round(1.0 / TICK_S)
    means = [sum(g[i : i + per_s]) / per_s for i in range(0, len(g) - per_s + 1, per_s)]
    ramp_1s = max(abs(b - a) for a, b in itertools.pairwise(means))
    over = sum(1 for w in g if w > grid_limit_w) * TICK_S
    return {
        "case": case.name,
        "peak_grid_kw": max(g) / 1000.0,
        "mean_grid_kw": sum(g) / len(g) / 1000.0,
        "max_ramp_kw_per_s": ramp_tick / 1000.0,
        "max_ramp_1s_kw_per_s": ramp_1s / 1000.0,
        "time_over_limit_s": over,
        "gpu_energy_kwh": sum(gp.energy_j for gp in st.gpus) / 3.6e6,
        "soc_range_pct": None if soc_min is None else (round(soc_min, 1), round(soc_max or 0.0, 1)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--grid-limit-kw", type=float, default=66.0)
    ap.add_argument("--ramp-kw-per-s", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    harness.add_args(ap, rounds=1)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = 120.0
    limit = args.grid_limit_kw * 1000.0
    common = {
        "enabled": True,
        "grid_import_limit_w": limit,
        "ramp_limit_w_per_s": args.ramp_kw_per_s * 1000.0,
        "control_period_s": 0.2,
    }
    cases = [
        Case("off (no control)", battery=True, power=None),
        Case("on: battery grid-target", battery=True, power=PowerConfig(**common)),
        Case(
            "on: battery setpoint 0.2 s", battery=True, power=PowerConfig(**common, battery_mode="setpoint")
        ),
        Case("on: no battery (GPU caps)", battery=False, power=PowerConfig(**common)),
    ]
    cpu: list[float] = []
    for _ in range(harness.rounds_of(args)):  # deterministic: rounds only re-time the simulation
        c0 = time.process_time()
        rows = [run(c, args.seconds, args.seed, limit) for c in cases]
        cpu.append(time.process_time() - c0)
    base = rows[0]
    for r in rows:
        r["gpu_energy_rel"] = r["gpu_energy_kwh"] / base["gpu_energy_kwh"]
        r["ramp_cut_x"] = base["max_ramp_kw_per_s"] / max(r["max_ramp_kw_per_s"], 1e-9)
        r["ramp_1s_cut_x"] = base["max_ramp_1s_kw_per_s"] / max(r["max_ramp_1s_kw_per_s"], 1e-9)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"demo pod, 64 GPUs, synchronized training (12 s steps, checkpoint 20 s every 10 steps), "
        f"{args.seconds:.0f} s simulated, grid import limit {args.grid_limit_kw:g} kW, "
        f"ramp limit {args.ramp_kw_per_s:g} kW/s\n"
    )
    head = (
        "| case | peak grid kW | max ramp kW/s (0.1 s) | cut | max ramp kW/s (1 s means) | cut "
        "| time over limit s | GPU energy vs off | battery SoC % |"
    )
    print(head)
    print("|" + "---|" * 9)

    for r in rows:
        soc = "-" if r["soc_range_pct"] is None else f"{r['soc_range_pct'][0]}-{r['soc_range_pct'][1]}"
        print(
            f"| {r['case']} | {r['peak_grid_kw']:.1f} | {r['max_ramp_kw_per_s']:.1f} "
            f"| {r['ramp_cut_x']:.0f}x "
            f"| {r['max_ramp_1s_kw_per_s']:.2f} | {r['ramp_1s_cut_x']:.0f}x | {r['time_over_limit_s']:.1f} "
            f"| {100 * r['gpu_energy_rel']:.2f}% | {soc} |"
        )
    print(f"\nsimulation CPU time, s (this process, {len(cpu)} round(s)): {harness.fmt(cpu, 2)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
