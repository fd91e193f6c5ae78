"""Ride-through and re-energisation end to end: hwsim's ``grid-outage`` / ``grid-sag`` faults (the
site meter and the BMS say so over Modbus), the agent's power service holding the GPUs to what the
battery can carry, and on return the grid import climbing at the contract's ramp, never a step
(computed from the site meter readings the agent stored)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path

from agent.config import load_config
from agent.interlocks.service import InterlockService
from agent.model import Reading
from agent.power.service import PowerService
from hwsim.faults import apply_fault
from hwsim.physics import Physics
from hwsim.podspec import POD_DIR, load_pod_spec
from hwsim.state import GRID_NORMAL, GRID_OUTAGE, GRID_SAG
from tests.agent_helpers import running_agent, until
from tests.conftest import start_pod, stop_pod

POD_EXTRA = """
[workload]
profile = "steady"
level = 0.9
spike_per_s = 0.0

[battery]
id = "bms-1"
capacity_kwh = 2.0
max_charge_kw = 8.0
max_discharge_kw = 8.0  # under the site's ~9.7 kW: the GPUs must step down
soc_pct = 60.0

[site_meter]
id = "site-meter"
"""

RAMP_W_PER_S = 1000.0
PERIOD_S = 0.2
OUTAGE_PERIODS = 15  # a short outage: 15 control periods (~3 s); the bench runs 30 s

POWER = f"""
[interlocks]
release_interval_s = 0.5
release_step_pct = 50.0

[power]
enabled = true
control_period_s = {PERIOD_S}
battery = "bms-1"
site_meter = "site-meter"
ramp_limit_w_per_s = {RAMP_W_PER_S}
ride_through_s = 60.0
restore_stagger_s = 1.0

[power.grid_contract]
ramp_up_w_per_s = {RAMP_W_PER_S}
"""


def _pod_file(tmp_path: Path) -> Path:
    text = (POD_DIR / "tiny.toml").read_text().replace('[workload]\nprofile = "training"\n', "")
    path = tmp_path / "tiny-ride.toml"
    path.write_text(text + POD_EXTRA)
    return path


def test_grid_faults_set_the_meter_and_bms_status_and_the_inverter_carries_the_site(tmp_path: Path) -> None:
    phys = Physics(load_pod_spec(str(_pod_file(tmp_path))), seed=1)
    bat, meter = phys.state.battery, phys.state.site_meter
    assert bat is not None and meter is not None
    phys.step(1.0)
    assert meter.grid_status == bat.grid_status == GRID_NORMAL and meter.grid_voltage_pct == 100.0
    apply_fault(phys, "grid-sag", None, clear=False)
    phys.step(0.5)
    load = phys.pod_load_w() + phys.aux_load_w()
    assert meter.grid_status == bat.grid_status == GRID_SAG and meter.grid_voltage_pct == 70.0
    assert abs(bat.power_w - min(load, bat.max_discharge_w)) < 1e-6  # it rides through
    apply_fault(phys, "grid-sag", None, clear=True)
    apply_fault(phys, "grid-outage", "site-meter", clear=False)
    phys.step(0.5)
    assert meter.grid_status == GRID_OUTAGE and meter.power_w == 0.0 and meter.grid_voltage_pct == 0.0
    apply_fault(phys, "grid-outage", None, clear=True)
    phys.step(0.5)
    assert meter.grid_status == GRID_NORMAL and meter.power_w > 0.0


async def test_outage_rides_through_on_the_battery_and_the_load_returns_at_the_ramp(tmp_path: Path) -> None:
    sim = start_pod(tmp_path / "pod", str(_pod_file(tmp_path)))
    try:
        path = tmp_path / "podagent.toml"
        path.write_text(sim.agent_config(tmp_path / "state", extra=POWER, poll_interval_s=PERIOD_S))
        config = load_config(path)
        power = PowerService(config.power)
        meter: list[tuple[float, float]] = []  # (poll time, W): every site meter reading stored

        def record(batch: Sequence[Reading]) -> None:
            for r in batch:
                if r.device == "site-meter" and r.metric == "power_w" and r.value is not None:
                    meter.append((r.ts_mono, r.value))

        async with running_agent(path, services=[InterlockService(config.interlocks), power]) as agent:
            agent.store.subscribe(record)
            await until(
                agent,
                lambda: (
                    power.decision is not None
                    and power.decision.discharge_avail_w > 0
                    and agent.summary()["power"]["grid"]["aux_before_w"] is not None
                    and (agent.store.value("site-meter", "power_w") or 0.0) > 3000.0
                ),
                what="the power service on the meter and the battery",
            )
            before_w = agent.store.value("site-meter", "power_w")
            pod_before = agent.store.value("pod", "power_w")
            assert before_w is not None

            await asyncio.to_thread(sim.fault, "grid-outage", "site-meter")
            await until(agent, lambda: power.grid_event == "outage", what="the outage seen")
            await until(
                agent,
                lambda: (
                    power.ride_through_budget_w is not None
                    and power.decision is not None
                    and power.decision.pod_budget_w is not None
                    and power.decision.pod_budget_w <= power.ride_through_budget_w + 1.0
                ),
                what="the pod held to the battery's ride-through budget",
            )
            budget = power.ride_through_budget_w
            assert budget is not None and 0.0 < budget <= 8000.0
            assert pod_before is not None and budget < pod_before
            await until(
                agent,
                lambda: (agent.store.value("pod", "power_w") or 1e9) <= budget + 150.0,
                what="the pod's IT load down to what the battery can carry",
            )
            assert power.caps
            steps0 = power.steps
            await until(agent, lambda: power.steps >= steps0 + OUTAGE_PERIODS, what="the outage lasting")
            status = agent.summary()["power"]["grid"]
            assert status["event"] == "outage" and status["ride_through_budget_w"] == round(budget, 1)

            await asyncio.to_thread(sim.fault, "grid-outage", "site-meter", clear=True)
            await until(agent, lambda: power.grid_event is None, what="the grid back")
            returned_at = next(t for t, w in reversed(meter) if w <= 1.0)  # the last outage reading
            await until(
                agent,
                lambda: not agent.summary()["power"]["grid"]["restoring"],
                timeout=40.0,
                what="the load back on the grid at the ramp",
            )
            reenergised_at = meter[-1][0]
            kinds = [e.kind for e in agent.events.recent(since_wall=0)]
            assert {"grid_outage", "grid_restored", "grid_reenergised"} <= set(kinds)
            # A sag is ridden through the same way (the BMS and the meter say "sag").
            await asyncio.to_thread(sim.fault, "grid-sag", "site-meter")
            await until(agent, lambda: power.grid_event == "sag", what="the sag seen")
            assert power.ride_through_budget_w is not None
            await asyncio.to_thread(sim.fault, "grid-sag", "site-meter", clear=True)
            await until(agent, lambda: power.grid_event is None, what="the sag over")

        after = [(t, w) for t, w in meter if returned_at <= t <= reenergised_at]
        assert after[-1][1] > 0.5 * before_w, (after[-1], before_w)  # the load did come back
        # Never a step: between any two readings at least 1 s apart the import rose at most the
        # contract's ramp (plus one control period of slack each end: target writes and meter
        # polls are not in phase).
        worst = 0.0
        for i, (t0, w0) in enumerate(after):
            j = next((k for k in range(i + 1, len(after)) if after[k][0] - t0 >= 1.0), None)
            if j is None:
                break
            t1, w1 = after[j]
            rise = w1 - w0
            allowed = RAMP_W_PER_S * ((t1 - t0) + 2 * PERIOD_S) + 100.0
            assert rise <= allowed, (t0 - returned_at, rise, allowed)
            worst = max(worst, rise / (t1 - t0))
        # ... and no single reading-to-reading jump of more than a few periods' worth.
        for (t0, w0), (t1, w1) in itertools.pairwise(after):
            assert w1 - w0 <= RAMP_W_PER_S * ((t1 - t0) + 2 * PERIOD_S) + 100.0
        print(f"ride-through: before {before_w:.0f} W, budget {budget:.0f} W, worst 1 s rise {worst:.0f} W/s")
    finally:
        stop_pod(sim)
