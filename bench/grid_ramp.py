"""Grid-friendly power on the demo pod: synchronized training with checkpoint pauses, five ways.

Runs hwsim's physics in-process on simulated time (40 Hz ticks, so the 0.1-20 Hz band is measured
up to 20 Hz) and the agent's power code every control period (0.2 s): ``control_step`` +
``allocate`` (the PowerService's code), ``soft_floor_step`` (the software fallback) and
``choose_smoothing`` (the GPU smoothing profile), reading the simulated devices as the agent would
(site meter, BMS, PDU sum, GPU power/util/limits) and acting as the agent would (BMS grid target;
GPU caps lowered at once and raised by the interlock engine's release ramp, +10% of the default
limit per 5 s; filler floors and smoothing profiles through the node, set directly here).
The grid import is measured against a grid contract with ``agent.power.contract`` (the code the
service runs live). Deterministic for a seed; no sockets.

    .venv/bin/python bench/grid_ramp.py [--seconds 600] [--rounds 3] [--json] [--series DIR]

Cases: no control (H100); battery only (H100, grid-target); GPU smoothing only (the Blackwell-class
model, same power figures as the demo's H100 so the cases compare); GPU smoothing + battery;
software fallback only (H100, no battery: filler floor); and today's no-battery trough capping.
Work: seconds of full-speed GPU progress (hwsim: slower while a GPU gets less than its phase
wants; floors and filler add none) relative to no control. Extra energy: site load energy (IT +
cooling) relative to no control. N rounds = seeds 1..N; the table gives the median (and range).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.power.allocate import GpuInput, allocate
from agent.power.config import GridContract, PowerConfig
from agent.power.contract import evaluate, ramp
from agent.power.control import (
    BatteryInput,
    Inputs,
    RampState,
    SoftFloorState,
    choose_smoothing,
    control_step,
    soft_floor_step,
)
from agent.power.curtail import CurtailOrder, curtail_limit_w
from agent.power.ridethrough import outage_pod_budget_w, stagger
from hwsim.physics import Physics
from hwsim.podspec import BatterySpec, PodSpec, SiteMeterSpec, load_pod_spec
from hwsim.state import BATTERY_MODE_GRID_TARGET

TICK_S = 0.025  # 40 Hz: Nyquist 20 Hz, the top of the band
CONTROL_S = 0.2
WARM_S = 30.0  # not counted: controller start, thermal settling
RELEASE_STEP = 0.10  # interlock engine defaults: +10% of the default limit ...
RELEASE_INTERVAL_S = 5.0  # ... every 5 s


@dataclass(frozen=True)
class Case:
    key: str
    name: str
    battery: bool
    smoothing: bool  # Blackwell-class GPUs with NVIDIA power smoothing (profile from the agent)
    power: PowerConfig | None  # None: no control
    filler: bool = False  # software fallback: the agent's filler floors applied
    outage: tuple[float, float] | None = None  # (start s, length s): grid outage, ride-through
    curtail: CurtailOrder | None = None  # start_wall/duration in simulated seconds
    stagger_s: float = 2.0  # re-energisation: one server released every this many seconds


STEP_S = [12.0]  # the training step (s); --step-s sets it


def pod_spec(battery: bool, smoothing: bool = False) -> PodSpec:
    spec = load_pod_spec("demo")
    data = spec.model_dump()
    data["tick_s"] = TICK_S
    data["workload"].update(
        profile="synchronized", checkpoint_every=10, checkpoint_s=20.0, period_s=STEP_S[0]
    )
    data["battery"] = BatterySpec(id="bms-1").model_dump() if battery else None
    data["site_meter"] = SiteMeterSpec(id="site-meter").model_dump()
    if smoothing:
        data["gpu"].update(name="NVIDIA GB200 (hwsim, demo power figures)", power_smoothing=True)
    return PodSpec.model_validate(data)


def simulate(case: Case, seconds: float, seed: int) -> dict[str, Any]:
    """One run: the grid series (40 Hz, after warm-up) and the totals."""
    phys = Physics(pod_spec(case.battery, case.smoothing), seed=seed)
    st = phys.state
    cfg = case.power
    ramp_state = RampState()
    floors_state = SoftFloorState()
    caps: dict[str, float] = {}
    applied: dict[int, float] = {g.index: g.default_limit_w for g in st.gpus}
    last_raise: dict[int, float] = dict.fromkeys(applied, -1e9)
    period_ticks = round(CONTROL_S / TICK_S)
    if st.battery is not None and cfg is not None:
        st.battery.mode = BATTERY_MODE_GRID_TARGET
        st.battery.grid_target_w = st.site_meter.power_w if st.site_meter else 0.0
    if case.smoothing and cfg is not None:
        profile = choose_smoothing(cfg, case.battery, [g.default_limit_w for g in st.gpus])
        for gpu in st.gpus:
            if profile is not None:
                phys.set_power_smoothing(
                    gpu.index,
                    enabled=True,
                    floor_pct=profile.floor_pct,
                    ramp_up_w_per_s=profile.ramp_up_w_per_s,
                    ramp_down_w_per_s=profile.ramp_down_w_per_s,
                    hysteresis_ms=profile.hysteresis_ms,
                )
    grid: list[float] = []
    warm = round(WARM_S / TICK_S)
    server_of = {f"gpu{g.index}": g.server for g in st.gpus}
    held: dict[str, float] = {}  # caps at the grid's return (stagger)
    import_at_curtail: float | None = None
    soc: list[float] = []
    site_j = gpu_j0 = work0 = 0.0
    for k in range(round(seconds / TICK_S)):
        t = k * TICK_S
        if k == warm:
            gpu_j0, work0 = sum(g.energy_j for g in st.gpus), phys.work_done_s()
        out_now = case.outage is not None and case.outage[0] <= t < case.outage[0] + case.outage[1]
        if out_now and not phys.grid_outage:
            phys.grid_outage = True
        elif phys.grid_outage and not out_now:
            phys.grid_outage = False
            held = dict(caps)
        if cfg is not None and k > 0 and k % period_ticks == 0:
            bat = st.battery
            pod_limits: dict[str, float] = {}
            grid_limit = cfg.grid_import_limit_w
            if phys.grid_outage and bat is not None:
                # The agent knows the grid is out (BMS/meter status); the battery must hold the
                # pod for the rest of the configured hold time (the outage's length here).
                assert case.outage is not None and bat.capacity_wh > 0
                above_wh = max(0.0, bat.soc_pct - cfg.soc_min_pct) / 100.0 * bat.capacity_wh
                aux = phys.aux_load_w()
                pod_limits["ride_through"] = outage_pod_budget_w(
                    bat.max_discharge_w, above_wh, case.outage[1], aux, margin_w=1000.0
                )
                grid_limit = 0.0
            if case.curtail is not None:
                if import_at_curtail is None and t >= case.curtail.start_wall:
                    import_at_curtail = st.site_meter.power_w if st.site_meter else None
                lim = curtail_limit_w(case.curtail, t, import_at_curtail, cfg.ramp_limit_w_per_s)
                if lim is not None:
                    grid_limit = lim if grid_limit is None else min(grid_limit, lim)
            inputs = Inputs(
                dt=CONTROL_S,
                pod_power_w=phys.pod_load_w(),
                gpu_power_w=sum(g.power_w for g in st.gpus),
                grid_w=st.site_meter.power_w if st.site_meter else None,
                battery=None
                if bat is None
                else BatteryInput(
                    bat.soc_pct, bat.power_w, bat.max_charge_w, bat.max_discharge_w, bat.faults
                ),
                pod_limits=pod_limits,
                grid_limit_w=grid_limit,
            )
            d = control_step(cfg, inputs, ramp_state)
            if bat is not None and d.grid_target_w is not None:
                bat.set_grid_target_w(d.grid_target_w)
            gpus = {
                f"gpu{g.index}": GpuInput(
                    g.min_limit_w, g.max_limit_w, g.default_limit_w, g.power_w, g.util_gpu_pct
                )
                for g in st.gpus
            }
            caps = allocate(d.gpu_budget_w, gpus, previous=caps, hysteresis_w=cfg.hysteresis_w).caps
            if held and case.outage is not None:
                since = t - (case.outage[0] + case.outage[1])
                caps = stagger(caps, held, server_of, since, case.stagger_s)
                if since > case.stagger_s * (len(set(server_of.values())) + 1):
                    held = {}
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
            if case.filler:
                floors = soft_floor_step(
                    cfg,
                    floors_state,
                    t,
                    CONTROL_S,
                    {f"gpu{g.index}": g.power_w for g in st.gpus},
                    {f"gpu{g.index}": g.enforced_limit_w for g in st.gpus},
                    cfg.ramp_limit_w_per_s or 1000.0,
                )
                for g in st.gpus:
                    phys.set_soft_floor(g.index, floors[f"gpu{g.index}"])
        phys.step(TICK_S)
        if k >= warm:
            assert st.site_meter is not None
            grid.append(st.site_meter.power_w)
            site_j += (phys.pod_load_w() + phys.aux_load_w()) * TICK_S
            if st.battery is not None:
                soc.append(st.battery.soc_pct)
    return {
        "unserved_j": phys.unserved_j,
        "grid": grid,
        "work_s": phys.work_done_s() - work0,
        "gpu_j": sum(g.energy_j for g in st.gpus) - gpu_j0,
        "site_j": site_j,
        "soc": (min(soc), max(soc)) if soc else None,
    }


def figures(case: Case, run: dict[str, Any], base: dict[str, Any], contract: GridContract) -> dict[str, Any]:
    rate = 1.0 / TICK_S
    rep = evaluate(contract, run["grid"], rate)
    terms = {t.name: t for t in rep.terms}
    r100 = next(r for r in rep.ramps if abs(r.horizon_s - 0.1) < 1e-9)
    r1 = next(r for r in rep.ramps if abs(r.horizon_s - 1.0) < 1e-9)
    return {
        "case": case.key,
        "name": case.name,
        "peak_w": rep.peak_w,
        "max_ramp_w_per_s_100ms": max(r100.up_w_per_s, r100.down_w_per_s),
        "max_ramp_w_per_s_1s": max(r1.up_w_per_s, r1.down_w_per_s),
        "band_share": rep.band_share,
        "band_hz": list(rep.band_hz),
        "dynamic_range_w": terms["dynamic_range"].measured if "dynamic_range" in terms else None,
        "outside_dynamic_range_s": terms["dynamic_range"].outside_s if "dynamic_range" in terms else None,
        "outside_any_term_s": rep.outside_s,
        "outside_s": {t.name: round(t.outside_s, 3) for t in rep.terms},
        "binding": rep.binding,
        "work_ratio": run["work_s"] / base["work_s"],
        "extra_energy_ratio": run["site_j"] / base["site_j"] - 1.0,
        "gpu_energy_ratio": run["gpu_j"] / base["gpu_j"],
        # Energy per unit of work vs no control: what floors and filler burn without adding work.
        "energy_per_work_ratio": (run["site_j"] / base["site_j"]) / (run["work_s"] / base["work_s"]) - 1.0,
        "soc_min_pct": run["soc"][0] if run["soc"] else None,
        "soc_max_pct": run["soc"][1] if run["soc"] else None,
    }


NUMERIC = (
    "peak_w",
    "max_ramp_w_per_s_100ms",
    "max_ramp_w_per_s_1s",
    "band_share",
    "dynamic_range_w",
    "outside_dynamic_range_s",
    "outside_any_term_s",
    "work_ratio",
    "extra_energy_ratio",
    "gpu_energy_ratio",
    "energy_per_work_ratio",
    "work_ratio_vs_limit_only",
)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median per figure, with the range over the rounds in ``<key>_range``."""
    out = dict(rounds[0])
    out["rounds"] = len(rounds)
    for key in NUMERIC:
        vals = [r[key] for r in rounds if r.get(key) is not None]
        if not vals:
            continue
        out[key] = statistics.median(vals)
        out[f"{key}_range"] = [min(vals), max(vals)]
    socs = [(r["soc_min_pct"], r["soc_max_pct"]) for r in rounds if r["soc_min_pct"] is not None]
    if socs:
        out["soc_min_pct"] = min(s[0] for s in socs)
        out["soc_max_pct"] = max(s[1] for s in socs)
    return out


def cases(limit_w: float, ramp_w_per_s: float, contract: GridContract) -> list[Case]:
    common: dict[str, Any] = {
        "enabled": True,
        "grid_import_limit_w": limit_w,
        "ramp_limit_w_per_s": ramp_w_per_s,
        "control_period_s": CONTROL_S,
        "grid_contract": contract,
    }
    soft = PowerConfig(**common, no_battery_fallback="soft_floor")
    limit_only = {k: v for k, v in common.items() if k != "ramp_limit_w_per_s"}
    return [
        Case("none", "no control", battery=False, smoothing=False, power=None),
        Case("battery", "battery only", battery=True, smoothing=False, power=PowerConfig(**common)),
        # The GPUs hold the ramps themselves: the agent sets the profile and caps nothing for the ramp.
        Case("gpu_smoothing", "GPU smoothing only (Blackwell)", battery=False, smoothing=True, power=soft),
        # The same with the site's import limit at or above the pod's peak: without a battery the
        # 66 kW limit (under the 72 kW unconstrained peak) costs work whatever the GPUs do (see
        # limit_only); here the GPUs' smoothing alone is measured. Figures against the same contract.
        Case(
            "gpu_smoothing_sized",
            "GPU smoothing only, import limit >= peak",
            battery=False,
            smoothing=True,
            power=PowerConfig(**{**common, "grid_import_limit_w": None}, no_battery_fallback="soft_floor"),
        ),
        Case(
            "gpu_smoothing_battery",
            "GPU smoothing + battery",
            battery=True,
            smoothing=True,
            power=PowerConfig(**common),
        ),
        Case("software", "software fallback (H100, filler floor)", False, False, soft, filler=True),
        Case("trough_caps", "no battery, trough caps (before)", False, False, PowerConfig(**common)),
        # Reference: what the import limit alone costs without storage (no ramp control at all).
        Case("limit_only", "no battery, import limit only", False, False, PowerConfig(**limit_only)),
    ]


def events(args: argparse.Namespace, contract: GridContract) -> list[dict[str, Any]]:
    """Ride-through (a 30 s grid outage at 90 s, battery carrying the pod) and curtailment to 50%
    of the import (at 90 s for 30 s), both on the battery case; figures at the site meter."""
    limit = args.grid_limit_kw * 1000.0
    cfg = PowerConfig(
        enabled=True,
        grid_import_limit_w=limit,
        ramp_limit_w_per_s=args.ramp_kw_per_s * 1000.0,
        control_period_s=CONTROL_S,
        grid_contract=contract,
    )
    start, length, seconds = 90.0, 30.0, 240.0
    out: list[dict[str, Any]] = []
    rt = Case("ride_through", "ride-through: 30 s outage", True, False, cfg, outage=(start, length))
    run = simulate(rt, seconds, 1)
    back = round((start + length - WARM_S) / TICK_S)
    after = run["grid"][back:]
    r100 = ramp(after, 1.0 / TICK_S, 0.1)
    r1 = ramp(after, 1.0 / TICK_S, 1.0)
    full = max(run["grid"][: round((start - WARM_S) / TICK_S)])
    reach = next((i * TICK_S for i, w in enumerate(after) if w >= 0.9 * full), None)
    out.append(
        {
            "case": rt.key,
            "outage_s": length,
            "unserved_kwh": run["unserved_j"] / 3.6e6,
            "max_rise_after_return_w_per_s_100ms": r100.up_w_per_s,
            "max_rise_after_return_w_per_s_1s": r1.up_w_per_s,
            "contract_ramp_w_per_s": contract.ramp_up_w_per_s,
            "s_to_90pct_of_peak_import": reach,
            "soc_min_pct": run["soc"][0] if run["soc"] else None,
        }
    )
    order = CurtailOrder("c-1", None, 0.5, start, length, 2.0)
    cu = Case("curtail", "curtail to 50%", True, False, cfg, curtail=order)
    run = simulate(cu, seconds, 1)
    i0 = round((start - WARM_S) / TICK_S)
    at_start = run["grid"][i0 - 1]
    target = 0.5 * at_start
    during = run["grid"][i0 : i0 + round(length / TICK_S)]
    reach = next((i * TICK_S for i, w in enumerate(during) if w <= target + 1.0), None)
    release = ramp(run["grid"][i0 + round(length / TICK_S) :], 1.0 / TICK_S, 1.0)
    out.append(
        {
            "case": cu.key,
            "import_at_start_w": at_start,
            "target_w": target,
            "s_to_reach": reach,
            "max_import_during_w": max(during[round(order.deadline_s / TICK_S) :]),
            "max_rise_after_release_w_per_s_1s": release.up_w_per_s,
        }
    )
    return out


def _fmt_range(r: dict[str, Any], key: str, scale: float, digits: int, unit: str = "") -> str:
    v = r.get(key)
    if v is None:
        return "-"
    rng = r.get(f"{key}_range")
    s = f"{v * scale:.{digits}f}"
    if rng and abs(rng[1] - rng[0]) * scale >= 10 ** (-digits):
        s += f"{unit} ({rng[0] * scale:.{digits}f}-{rng[1] * scale:.{digits}f})"
        return s
    return s + unit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--rounds", type=int, default=3, help="seeds 1..N; median and range")
    ap.add_argument("--grid-limit-kw", type=float, default=66.0)
    ap.add_argument(
        "--ramp-kw-per-s", type=float, default=1.0, help="the agent's ramp (under the contract's)"
    )
    ap.add_argument("--contract-ramp-kw-per-s", type=float, default=2.0)
    ap.add_argument("--dynamic-range-kw", type=float, default=20.0)
    ap.add_argument("--dynamic-range-window-s", type=float, default=60.0)
    ap.add_argument("--band-share-max", type=float, default=0.2)
    ap.add_argument("--only", action="append", help="case key (repeatable); 'none' always runs")
    ap.add_argument("--json", action="store_true", help="one JSON object per case")
    ap.add_argument("--events", action="store_true", help="only the ride-through and curtailment runs")
    ap.add_argument("--series", type=Path, help="write DIR/<case>.csv (t_s,grid_w at 40 Hz, seed 1)")
    ap.add_argument("--table", type=Path, help="print the table of a --json run's output FILE")
    ap.add_argument("--step-s", type=float, default=12.0, help="training step length (12 s: 0.083 Hz)")
    ap.add_argument(
        "--quick", action="store_true", help="CI smoke: one short round of 'none', figures meaningless"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds, args.only = WARM_S + 10.0, 1, ["none"]
    STEP_S[0] = args.step_s
    limit = args.grid_limit_kw * 1000.0
    contract = GridContract(
        import_limit_w=limit,
        ramp_up_w_per_s=args.contract_ramp_kw_per_s * 1000.0,
        ramp_down_w_per_s=args.contract_ramp_kw_per_s * 1000.0,
        dynamic_range_w=args.dynamic_range_kw * 1000.0,
        dynamic_range_window_s=args.dynamic_range_window_s,
        band_lo_hz=0.1,
        band_hi_hz=20.0,
        band_share_max=args.band_share_max,
    )
    if args.table is not None:  # re-render a --json run's rows (same other arguments) as the table
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        print_table(rows, args, None)
        return 0
    if args.events:
        for row in events(args, contract):
            print(json.dumps(row, sort_keys=True))
        return 0
    todo = [
        c
        for c in cases(limit, args.ramp_kw_per_s * 1000.0, contract)
        if not args.only or c.key in args.only or c.key == "none"
    ]
    per_case: dict[str, list[dict[str, Any]]] = {c.key: [] for c in todo}
    eval_cpu: list[float] = []
    for seed in range(1, args.rounds + 1):
        base_run = simulate(todo[0], args.seconds, seed)
        for c in todo:
            run = base_run if c.key == "none" else simulate(c, args.seconds, seed)
            t0 = time.process_time()
            per_case[c.key].append(figures(c, run, base_run, contract))
            eval_cpu.append(time.process_time() - t0)
            if args.series is not None and seed == 1:
                args.series.mkdir(parents=True, exist_ok=True)
                with (args.series / f"{c.key}.csv").open("w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["t_s", "grid_w"])
                    for i, v in enumerate(run["grid"]):
                        w.writerow([f"{WARM_S + (i + 1) * TICK_S:.3f}", f"{v:.1f}"])
    if "limit_only" in per_case:
        for c in todo:
            for mine, ref in zip(per_case[c.key], per_case["limit_only"], strict=True):
                mine["work_ratio_vs_limit_only"] = mine["work_ratio"] / ref["work_ratio"]
    rows = [summarize(per_case[c.key]) for c in todo]
    base = rows[0]
    for r in rows:
        r["ramp_cut_100ms_x"] = base["max_ramp_w_per_s_100ms"] / max(r["max_ramp_w_per_s_100ms"], 1e-9)
        r["ramp_cut_1s_x"] = base["max_ramp_w_per_s_1s"] / max(r["max_ramp_w_per_s_1s"], 1e-9)
    if args.json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
        return 0
    print_table(rows, args, eval_cpu)
    return 0


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace, eval_cpu: list[float] | None) -> None:
    print(
        f"demo pod, 64 GPUs, synchronized training ({args.step_s:g} s steps, checkpoint 20 s every "
        f"10 steps), "
        f"{args.seconds:.0f} s simulated at 40 Hz ({WARM_S:.0f} s warm-up not counted), {args.rounds} "
        f"round(s): median (range)\ncontract: import {args.grid_limit_kw:g} kW, ramp up/down "
        f"{args.contract_ramp_kw_per_s:g} kW/s on 0.1 s and 1 s means, dynamic range "
        f"{args.dynamic_range_kw:g} kW in {args.dynamic_range_window_s:g} s, <= "
        f"{100 * args.band_share_max:g}% of the swing in 0.1-20 Hz; the agent ramps at "
        f"{args.ramp_kw_per_s:g} kW/s\n"
    )
    print(
        "| case | peak kW | max ramp kW/s 0.1 s | cut | max ramp kW/s 1 s | cut | in-band share | "
        "s outside dyn. range | s outside any term (binding) | work vs none | work vs limit only "
        "| extra energy | per work | SoC % |"
    )
    print("|" + "---|" * 14)
    for r in rows:
        soc = "-" if r["soc_min_pct"] is None else f"{r['soc_min_pct']:.1f}-{r['soc_max_pct']:.1f}"
        print(
            f"| {r['name']} | {_fmt_range(r, 'peak_w', 1e-3, 1)} "
            f"| {_fmt_range(r, 'max_ramp_w_per_s_100ms', 1e-3, 1)} | {r['ramp_cut_100ms_x']:.0f}x "
            f"| {_fmt_range(r, 'max_ramp_w_per_s_1s', 1e-3, 2)} | {r['ramp_cut_1s_x']:.0f}x "
            f"| {_fmt_range(r, 'band_share', 100, 1, '%')} "
            f"| {_fmt_range(r, 'outside_dynamic_range_s', 1, 1)} "
            f"| {_fmt_range(r, 'outside_any_term_s', 1, 1)} ({r['binding']}) "
            f"| {_fmt_range(r, 'work_ratio', 100, 1, '%')} "
            f"| {_fmt_range(r, 'work_ratio_vs_limit_only', 100, 1, '%')} "
            f"| {_fmt_range(r, 'extra_energy_ratio', 100, 1, '%')} "
            f"| {_fmt_range(r, 'energy_per_work_ratio', 100, 1, '%')} "
            f"| {soc} |"
        )
    if eval_cpu:
        n = round((args.seconds - WARM_S) / TICK_S)
        print(
            f"\ncontract evaluation (all terms, FFT included) of one {n}-sample series: "
            f"{1000 * statistics.median(eval_cpu):.0f} ms CPU (median of {len(eval_cpu)})"
        )


if __name__ == "__main__":
    sys.exit(main())
