"""Power end to end: hwsim's battery/site meter physics, and the agent's PowerService against a pod
with a battery over Modbus (fleet budget step, expiry back to the static limit, battery commands)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

from agent.budget import FleetBudget
from agent.config import load_config
from agent.interlocks.service import InterlockService
from agent.power.service import PowerService
from hwsim.faults import apply_fault
from hwsim.physics import Physics
from hwsim.podspec import POD_DIR, PodSpec, load_pod_spec
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
max_charge_kw = 5.0
max_discharge_kw = 5.0
soc_pct = 60.0

[site_meter]
id = "site-meter"
"""


def _pod_file(tmp_path: Path) -> Path:
    text = (POD_DIR / "tiny.toml").read_text().replace('[workload]\nprofile = "training"\n', "")
    path = tmp_path / "tiny-power.toml"
    path.write_text(text + POD_EXTRA)
    return path


def test_battery_physics_setpoint_limits_and_grid_balance(tmp_path: Path) -> None:
    spec: PodSpec = load_pod_spec(str(_pod_file(tmp_path)))
    phys = Physics(spec, seed=1)
    bat, meter = phys.state.battery, phys.state.site_meter
    assert bat is not None and meter is not None
    phys.step(1.0)
    load = phys.pod_load_w() + phys.aux_load_w()
    assert abs(meter.power_w - load) < 1e-6  # idle battery: the grid carries everything
    bat.set_power_setpoint_w(3000.0)
    phys.step(36.0)  # 3 kW for 36 s = 30 Wh out of the site, 30/0.95 Wh out of the cells
    assert abs(bat.power_w - 3000.0) < 1e-6
    assert abs(meter.power_w - (phys.pod_load_w() + phys.aux_load_w() - 3000.0)) < 1e-6
    assert abs(bat.soc_pct - (60.0 - 100.0 * 30.0 / 0.95 / 2000.0)) < 0.05
    # Empty: the BMS stops at its bound and reports no discharge power left.
    bat.soc_pct = bat.soc_min_pct + 0.01
    phys.step(5.0)
    assert bat.power_w == 0.0 and bat.max_discharge_w == 0.0 and bat.soc_pct >= bat.soc_min_pct
    # Full: no charging.
    bat.soc_pct = bat.soc_max_pct
    bat.set_power_setpoint_w(-4000.0)
    phys.step(1.0)
    assert bat.power_w == 0.0 and bat.max_charge_w == 0.0
    # Grid-target mode: the inverter holds the meter at the target from its own measurement.
    bat.soc_pct = 50.0
    bat.set_mode(1)
    bat.set_grid_target_w(phys.pod_load_w() + phys.aux_load_w() - 2000.0)
    phys.step(0.5)
    assert abs(bat.power_w - 2000.0) < 50.0  # the load moved a little within the step
    bat.faults = 4
    phys.step(0.1)
    assert bat.power_w == 0.0  # a fault opens the contactor
    bat.faults = 0
    # The injectable fault: the BMS reports over-temperature, no charge or discharge allowed.
    result = apply_fault(phys, "battery-fault", None, clear=False)
    assert result.device == "bms-1" and bat.faults == 1
    phys.step(0.1)
    assert bat.power_w == 0.0 and bat.max_discharge_w == 0.0 and bat.max_charge_w == 0.0
    apply_fault(phys, "battery-fault", "bms-1", clear=True)
    phys.step(0.1)
    assert bat.faults == 0 and bat.max_discharge_w > 0.0 and abs(bat.power_w - 2000.0) < 100.0


POWER = """
[interlocks]
release_interval_s = 0.5
release_step_pct = 50.0

[power]
enabled = true
control_period_s = 0.2
battery = "bms-1"
site_meter = "site-meter"
site_limit_w = 20000.0
ramp_limit_w_per_s = 2000.0
"""


async def test_fleet_budget_step_is_honoured_and_expires_back_to_the_site_limit(tmp_path: Path) -> None:
    sim = start_pod(tmp_path / "pod", str(_pod_file(tmp_path)))
    try:
        path = tmp_path / "podagent.toml"
        path.write_text(sim.agent_config(tmp_path / "state", extra=POWER, poll_interval_s=0.5))
        config = load_config(path)
        interlocks = InterlockService(config.interlocks)
        power = PowerService(config.power)
        async with running_agent(path, services=[interlocks, power]) as agent:
            await until(agent, lambda: power.steps > 2 and power.decision is not None, what="power steps")
            assert power.decision is not None and power.decision.budget_source in ("site_limit", "grid_ramp")
            # The battery is commanded over Modbus: grid-target mode with a target near the load.
            state = await asyncio.to_thread(sim.state)
            for _ in range(50):
                if state["battery"]["mode"] == 1:
                    break
                await until(agent, lambda: True)
                state = await asyncio.to_thread(sim.state)
            assert state["battery"]["mode"] == 1 and state["battery"]["grid_target_w"] > 1000.0

            pod_w = agent.store.value("pod", "power_w")
            assert pod_w is not None and pod_w > 6000.0
            budget = 5000.0
            agent.set_fleet_budget(FleetBudget(watts=budget, expires_at_wall=time.time() + 5.0), by="test")
            steps0 = power.steps
            await until(agent, lambda: power.steps >= steps0 + 1, what="one control period")
            d = power.decision
            assert d is not None and d.budget_source == "fleet_budget" and d.pod_budget_w == budget
            # One period later the GPU caps fit the budget (pod - measured non-GPU load).
            assert power.caps and d.gpu_budget_w is not None
            assert sum(power.caps.values()) <= d.gpu_budget_w + 1.0
            for cap in power.caps.values():
                assert 200.0 <= cap <= 700.0
            # ... and the pod's truth follows once NVML has the limits.
            await until(
                agent,
                lambda: (agent.store.value("pod", "power_w") or 1e9) <= budget + 100.0,
                timeout=8.0,
                what="pod power under the fleet budget",
            )
            status = agent.summary()["power"]
            assert status["allocation"]["binding"] and status["budget"]["source"] == "fleet_budget"
            # Expiry: back to the static site limit, caps released.
            await until(
                agent,
                lambda: power.decision is not None and power.decision.budget_source != "fleet_budget",
                timeout=8.0,
                what="fleet budget expiry",
            )
            assert not power.caps
            assert power.decision is not None and power.decision.pod_budget_w is not None
            assert power.decision.pod_budget_w > budget
            names = {m[0] for m in power.metrics()}
            assert "podagent_pod_power_budget_watts" in names and "podagent_pod_grid_target_watts" in names

            # A budget with a ramp: the budget in force walks from the pod's draw to the target at
            # the rate asked, never past it.
            # The released caps ramp up on the interlocks' full steps (once a second): the draw
            # climbs back over a few seconds.
            await until(
                agent,
                lambda: (agent.store.value("pod", "power_w") or 0.0) > 4000.0,
                timeout=20.0,
                what="the pod's draw back over 4 kW after the expiry",
            )
            draw = agent.store.value("pod", "power_w")
            assert draw is not None and draw > 4000.0
            target = draw - 3000.0
            rate = 500.0
            agent.set_fleet_budget(FleetBudget(watts=target, id="c-ramp", ramp_w_per_s=rate), by="test")
            seen: list[tuple[float, float]] = []
            draws = [draw]
            for _ in range(4):
                await until(agent, lambda n=power.steps: power.steps >= n + 1, what="one control period")
                assert power.fleet_budget_w is not None
                seen.append((time.monotonic(), power.fleet_budget_w))
                draws.append(agent.store.value("pod", "power_w") or draw)
            # It starts from the draw the service read at its step, a newer meter reading than
            # ours (the pod's draw still rises while the last budget's caps are released): not
            # from the site limit (9.7 kW). The workload's draw swings by kilowatts: where it dips
            # to the target, the walk is there at once and stays (never below the target).
            assert all(target <= w < max(draws) * 1.05 for _, w in seen), (draws, seen)
            assert all(b[1] <= a[1] for a, b in itertools.pairwise(seen)), seen  # never rising
            assert seen[0][1] > target or min(draws[1:]) < target + rate * config.power.control_period_s, (
                draws,
                seen,
            )
            (t0, w0), (t1, w1) = seen[0], seen[-1]
            assert (w0 - w1) <= rate * (t1 - t0) + rate * config.power.control_period_s + 1.0
            assert agent.summary()["power"]["budget"]["fleet_target_w"] == round(target, 1)
    finally:
        stop_pod(sim)


async def test_a_battery_fault_is_an_event_and_the_ramp_falls_back_on_gpu_caps(tmp_path: Path) -> None:
    sim = start_pod(tmp_path / "pod", str(_pod_file(tmp_path)))
    try:
        path = tmp_path / "podagent.toml"
        path.write_text(sim.agent_config(tmp_path / "state", extra=POWER, poll_interval_s=0.5))
        config = load_config(path)
        power = PowerService(config.power)
        async with running_agent(path, services=[InterlockService(config.interlocks), power]) as agent:
            await until(
                agent,
                lambda: power.decision is not None and power.decision.discharge_avail_w > 0,
                what="the battery available to the ramp",
            )
            sim.fault("battery-fault", "bms-1")
            await until(
                agent,
                lambda: power.decision is not None and power.decision.discharge_avail_w == 0.0,
                timeout=10.0,
                what="the faulted battery out of the plan",
            )
            (event,) = [e for e in agent.events.recent() if e.kind == "battery_fault"]
            assert event.device == "bms-1" and event.detail["names"] == ["over-temperature"]
            assert agent.summary()["power"]["battery"]["faults"] == 1
            sim.fault("battery-fault", "bms-1", clear=True)
            await until(
                agent,
                lambda: any(e.kind == "battery_ok" for e in agent.events.recent()),
                timeout=10.0,
                what="the fault cleared",
            )
            await until(
                agent,
                lambda: power.decision is not None and power.decision.discharge_avail_w > 0,
                timeout=10.0,
                what="the battery back in the plan",
            )
    finally:
        stop_pod(sim)
