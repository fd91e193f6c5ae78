"""The agent's real power control loop against hwsim over Modbus, beside the in-process copy.

``bench/grid_ramp.py`` runs the agent's power code in-process on simulated time. This bench runs the
real thing: hwsim in its own process (tiny pod + battery + site meter, synchronized training), the
agent in this process with its Modbus/SNMP/NVML drivers, the InterlockService (which applies the
caps) and the PowerService's control loop (0.2 s, battery in grid-target mode over Modbus), on
wall-clock time. The grid import is what the agent stored from the site meter (polled every 0.2 s,
so 5 Hz: ramps on 1 s means, the band clipped at 2.5 Hz). The same pod and settings then run through
``grid_ramp.simulate`` (40 Hz physics); its series is also sampled at 5 Hz so the rows compare.

    .venv/bin/python bench/grid_ramp_live.py [--seconds 120] [--rounds 1] [--json]

CPU: the agent's process (this one) and hwsim's, per second of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: `tests`, `hwsim` and `bench` from the checkout

import bench.grid_ramp as gr  # noqa: E402
from agent.config import load_config  # noqa: E402
from agent.interlocks.service import InterlockService  # noqa: E402
from agent.model import Reading  # noqa: E402
from agent.power.config import GridContract, PowerConfig  # noqa: E402
from agent.power.contract import evaluate  # noqa: E402
from agent.power.service import PowerService  # noqa: E402
from hwsim.podspec import POD_DIR, PodSpec, load_pod_spec  # noqa: E402
from tests.agent_helpers import running_agent, until  # noqa: E402
from tests.conftest import start_pod, stop_pod  # noqa: E402

PERIOD_S = 0.2
WARM_S = 20.0
RAMP_W_PER_S = 125.0  # the demo's 1 kW/s for 64 GPUs, scaled to the tiny pod's 8
CONTRACT_RAMP_W_PER_S = 250.0

POD_EXTRA = """
[workload]
profile = "synchronized"
period_s = {step_s}
spike_per_s = 0.0

[battery]
id = "bms-1"
capacity_kwh = 2.0
max_charge_kw = 5.0
max_discharge_kw = 5.0
soc_pct = 60.0

[site_meter]
id = "site-meter"
"""

POWER = f"""
[power]
enabled = true
control_period_s = {PERIOD_S}
battery = "bms-1"
site_meter = "site-meter"
ramp_limit_w_per_s = {RAMP_W_PER_S}
"""


def pod_text(step_s: float) -> str:
    text = (POD_DIR / "tiny.toml").read_text().replace('[workload]\nprofile = "training"\n', "")
    return text + POD_EXTRA.format(step_s=step_s)


def contract() -> GridContract:
    return GridContract(
        ramp_up_w_per_s=CONTRACT_RAMP_W_PER_S,
        ramp_down_w_per_s=CONTRACT_RAMP_W_PER_S,
        ramp_horizons_s=(1.0,),
        band_share_max=0.2,
    )


def resample(points: Sequence[tuple[float, float]], t0: float, seconds: float) -> list[float]:
    """The meter series on a uniform 5 Hz grid from ``t0`` (the last reading at each point)."""
    out: list[float] = []
    k, last = 0, points[0][1]
    for n in range(round(seconds / PERIOD_S)):
        t = t0 + n * PERIOD_S
        while k < len(points) and points[k][0] <= t:
            last = points[k][1]
            k += 1
        out.append(last)
    return out


def figures(series: list[float], rate: float) -> dict[str, Any]:
    rep = evaluate(contract(), series, rate)
    r1 = next(r for r in rep.ramps if abs(r.horizon_s - 1.0) < 1e-9)
    return {
        "peak_w": rep.peak_w,
        "swing_w": max(series) - min(series),
        "max_ramp_w_per_s_1s": max(r1.up_w_per_s, r1.down_w_per_s),
        "band_share": rep.band_share,
        "band_hz": list(rep.band_hz),
        "outside_any_term_s": rep.outside_s,
        "binding": rep.binding,
    }


def cpu_of(pid: int) -> float:
    """utime + stime of a process in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def live(seconds: float, step_s: float, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="grid-live-") as tmp:
        root = Path(tmp)
        pod_file = root / "tiny-grid.toml"
        pod_file.write_text(pod_text(step_s))
        sim = start_pod(root / "pod", str(pod_file), seed=seed)
        try:
            path = root / "podagent.toml"
            path.write_text(sim.agent_config(root / "state", extra=POWER, poll_interval_s=PERIOD_S))
            config = load_config(path)
            power = PowerService(config.power)
            meter: list[tuple[float, float]] = []
            soc: list[float] = []

            def record(batch: Sequence[Reading]) -> None:
                for r in batch:
                    if r.value is None:
                        continue
                    if r.device == "site-meter" and r.metric == "power_w":
                        meter.append((r.ts_mono, r.value))
                    elif r.device == "bms-1" and r.metric == "soc_pct":
                        soc.append(r.value)

            async with running_agent(path, services=[InterlockService(config.interlocks), power]) as agent:
                agent.store.subscribe(record)
                await until(agent, lambda: power.steps > 5, what="the power service running")
                await asyncio.sleep(WARM_S)
                t0 = time.monotonic()
                cpu0, sim_cpu0 = time.process_time(), cpu_of(sim.proc.pid)
                steps0 = power.steps
                await asyncio.sleep(seconds)
                cpu = time.process_time() - cpu0
                sim_cpu = cpu_of(sim.proc.pid) - sim_cpu0
                steps = power.steps - steps0
            series = resample([p for p in meter if p[0] >= t0 - 1.0], t0, seconds)
            out = figures(series, 1.0 / PERIOD_S)
            out.update(
                case="battery, live (agent over Modbus)",
                samples=len(series),
                control_periods=steps,
                agent_cpu_per_s=cpu / seconds,
                hwsim_cpu_per_s=sim_cpu / seconds,
                soc_min_pct=min(soc) if soc else None,
                soc_max_pct=max(soc) if soc else None,
            )
            return out
        finally:
            stop_pod(sim)


def in_process(seconds: float, step_s: float, seed: int, battery: bool) -> dict[str, Any]:
    data = load_pod_spec(str(_tmp_pod(step_s))).model_dump()
    data["tick_s"] = gr.TICK_S
    spec = PodSpec.model_validate(data)
    if not battery:
        data["battery"] = None
        spec = PodSpec.model_validate(data)
    gr.pod_spec = lambda _battery, _smoothing=False: spec  # the same pod as the live run
    cfg = PowerConfig.model_validate(
        {
            "enabled": True,
            "control_period_s": PERIOD_S,
            "battery": "bms-1" if battery else None,
            "site_meter": "site-meter",
            "ramp_limit_w_per_s": RAMP_W_PER_S,
        }
    )
    case = gr.Case("battery" if battery else "none", "", battery, False, cfg if battery else None)
    t_start = time.process_time()
    run = gr.simulate(case, seconds + gr.WARM_S, seed)
    cpu = time.process_time() - t_start
    grid40 = run["grid"]
    every = round(PERIOD_S / gr.TICK_S)
    out = figures(grid40[::every], 1.0 / PERIOD_S)
    full = figures(grid40, 1.0 / gr.TICK_S)
    out.update(
        case=("battery" if battery else "no control") + ", in-process (5 Hz samples)",
        samples=len(grid40[::every]),
        max_ramp_w_per_s_1s_40hz=full["max_ramp_w_per_s_1s"],
        band_share_40hz=full["band_share"],
        sim_cpu_s=cpu,
        soc_min_pct=run["soc"][0] if run["soc"] else None,
        soc_max_pct=run["soc"][1] if run["soc"] else None,
    )
    return out


_POD_FILE: list[Path] = []


def _tmp_pod(step_s: float) -> Path:
    if not _POD_FILE:
        path = Path(tempfile.mkdtemp(prefix="grid-pod-")) / "tiny-grid.toml"
        path.write_text(pod_text(step_s))
        _POD_FILE.append(path)
    return _POD_FILE[0]


def median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rounds[0])
    for k, v in rounds[0].items():
        if isinstance(v, int | float) and not isinstance(v, bool) and len(rounds) > 1:
            vals = [r[k] for r in rounds if isinstance(r.get(k), int | float)]
            out[k] = statistics.median(vals)
            out[k + "_range"] = [min(vals), max(vals)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="measured, after a 20 s warm-up")
    ap.add_argument("--rounds", type=int, default=1, help="seeds 1..N (each live round takes --seconds)")
    ap.add_argument("--step-s", type=float, default=4.0, help="training step (s)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="CI smoke: a few seconds, figures meaningless")
    args = ap.parse_args(argv)
    if args.quick:
        global WARM_S  # the smoke shortens the live warm-up too
        WARM_S, args.seconds, args.rounds = 2.0, 4.0, 1
    rows: list[dict[str, Any]] = []
    seeds = range(1, args.rounds + 1)
    for battery in (False, True):
        rows.append(median([in_process(args.seconds, args.step_s, s, battery) for s in seeds]))
    rows.append(median([asyncio.run(live(args.seconds, args.step_s, s)) for s in seeds]))
    if not args.json:
        print(f"{args.rounds} round(s) of {args.seconds:g} s (seeds 1..{args.rounds}; median of the rounds):")
    for row in rows:
        if args.json:
            print(json.dumps(row))
            continue
        lo, hi = row["band_hz"]
        soc = row.get("soc_min_pct"), row.get("soc_max_pct")
        soc_text = "-" if soc[0] is None else f"{soc[0]:.1f}-{soc[1]:.1f}%"
        print(
            f"{row['case']:44} peak {row['peak_w'] / 1000:6.2f} kW  swing {row['swing_w'] / 1000:5.2f} kW  "
            f"max ramp 1 s {row['max_ramp_w_per_s_1s']:7.1f} W/s  "
            f"band share {100 * row['band_share']:5.1f}% ({lo:g}-{hi:g} Hz)  SoC {soc_text}"
        )
        tails = ("cpu_per_s", "cpu_s", "40hz", "control_periods")
        extra = {k: v for k, v in row.items() if k.endswith(tails)}
        if extra:
            print("    " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
