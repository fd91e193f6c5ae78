"""The pure parts of the power feature: allocation and one control period (budgets, ramp, battery)."""

from __future__ import annotations

from agent.budget import ramped_budget_w
from agent.power.allocate import GpuInput, allocate
from agent.power.config import PowerConfig
from agent.power.control import BatteryInput, Inputs, RampState, control_step


def _h100(power: float = 650.0, util: float = 90.0, default: float = 700.0) -> GpuInput:
    return GpuInput(min_w=200.0, max_w=700.0, default_w=default, power_w=power, util_pct=util)


def test_no_caps_when_the_budget_covers_every_default() -> None:
    a = allocate(8 * 700.0, {f"gpu{i}": _h100() for i in range(8)})
    assert a.caps == {} and not a.binding


def test_fair_share_among_busy_and_idle_headroom_redistributed() -> None:
    gpus = {f"gpu{i}": _h100() for i in range(6)}
    gpus["gpu6"] = _h100(power=70.0, util=0.0)
    gpus["gpu7"] = _h100(power=70.0, util=0.0)
    a = allocate(3000.0, gpus)
    assert a.binding and a.busy == 6 and a.idle == 2
    assert a.caps["gpu6"] == a.caps["gpu7"] == 200.0  # draw + margin, but never below the NVML minimum
    busy = [a.caps[f"gpu{i}"] for i in range(6)]
    assert max(busy) - min(busy) < 1e-6  # equal share
    assert abs(sum(a.caps.values()) - 3000.0) < 1e-3


def test_caps_respect_each_gpus_constraints() -> None:
    gpus = {"a": _h100(), "b": _h100(default=400.0), "c": GpuInput(300.0, 700.0, 700.0, 650.0, 90.0)}
    a = allocate(1200.0, gpus)
    assert a.caps["b"] <= 400.0  # never above its default
    assert a.caps["c"] >= 300.0  # never below its minimum
    for name, g in gpus.items():
        assert g.min_w <= a.caps[name] <= g.default_w
    assert sum(a.caps.values()) <= 1200.0 + 1e-3
    # What b cannot take (default 400) went to a.
    assert a.caps["a"] > a.caps["b"]


def test_infeasible_budget_puts_everyone_at_minimum() -> None:
    a = allocate(500.0, {f"gpu{i}": _h100() for i in range(4)})
    assert not a.feasible and set(a.caps.values()) == {200.0}


def test_hysteresis_keeps_caps_for_small_changes_but_never_delays_lowering() -> None:
    gpus = {f"gpu{i}": _h100() for i in range(4)}
    first = allocate(2000.0, gpus).caps
    same = allocate(2030.0, gpus, previous=first, hysteresis_w=15.0).caps
    assert same == first  # +7.5 W per GPU: not worth a re-plan
    lower = allocate(1990.0, gpus, previous=first, hysteresis_w=15.0).caps
    assert sum(lower.values()) <= 1990.0 + 1e-3  # the old caps no longer fit: applied at once
    # Just above the ceiling after capping: still planned (all at default), no toggling off/on.
    near = allocate(4 * 700.0 + 10.0, gpus, previous=first, hysteresis_w=15.0)
    assert near.binding and set(near.caps.values()) == {700.0}


RAMP = PowerConfig(enabled=True, ramp_limit_w_per_s=1000.0, control_period_s=0.2)


def _bat(soc: float = 60.0, power: float = 0.0, rated: float = 40000.0) -> BatteryInput:
    return BatteryInput(soc_pct=soc, power_w=power, max_charge_w=rated, max_discharge_w=rated)


def _inputs(site: float, bat: BatteryInput | None, **kw: object) -> Inputs:
    grid = site - (bat.power_w if bat else 0.0)
    args: dict[str, object] = {
        "dt": 0.2,
        "pod_power_w": site - 5000.0,
        "gpu_power_w": site - 20000.0,
        "grid_w": grid,
        "battery": bat,
    }
    args.update(kw)
    return Inputs(**args)  # type: ignore[arg-type]


def test_budget_step_change_is_honoured_in_the_next_period() -> None:
    state = RampState()
    d = control_step(RAMP, _inputs(50000.0, None, pod_limits={"site_limit": 60000.0}), state)
    assert d.pod_budget_w is not None and d.pod_budget_w >= 45000.0
    d = control_step(
        RAMP, _inputs(50000.0, None, pod_limits={"site_limit": 60000.0, "fleet_budget": 30000.0}), state
    )
    assert d.pod_budget_w == 30000.0 and d.budget_source == "fleet_budget"
    # GPU budget = pod budget - measured non-GPU load (pod 45 kW - GPUs 30 kW).
    assert d.gpu_budget_w == 30000.0 - 15000.0


def test_battery_absorbs_a_load_jump_and_the_grid_moves_by_the_ramp() -> None:
    state = RampState()
    bat = _bat()
    d = control_step(RAMP, _inputs(40000.0, bat), state)
    d = control_step(RAMP, _inputs(65000.0, bat), state)  # +25 kW in one period
    assert d.grid_target_w is not None and d.grid_target_w - 40000.0 <= 1000.0 * 0.2 + 1e-6
    assert d.battery_setpoint_w is not None and d.battery_setpoint_w > 24000.0  # discharging
    assert d.gpu_budget_w is not None and d.gpu_budget_w > 64 * 700.0 - 30000.0  # no caps needed
    d = control_step(RAMP, _inputs(30000.0, bat), state)  # load drops: the battery charges
    assert d.battery_setpoint_w is not None and d.battery_setpoint_w < -9000.0
    assert abs(d.grid_target_w - 40000.0) <= 2 * 1000.0 * 0.2 + 1e-6  # type: ignore[operator]


def test_battery_absent_caps_the_jump_and_follows_a_drop() -> None:
    state = RampState()
    control_step(RAMP, _inputs(40000.0, None), state)
    d = control_step(RAMP, _inputs(65000.0, None), state)
    assert d.battery_setpoint_w is None
    assert d.budget_source == "grid_ramp"
    assert d.pod_budget_w is not None and d.pod_budget_w <= 40000.0 + 200.0 - 5000.0 + 1e-6
    d = control_step(RAMP, _inputs(20000.0, None), state)
    assert d.grid_target_w == 20000.0  # caps cannot hold a load up: the grid follows the drop


def test_full_battery_cannot_charge_and_empty_battery_cannot_discharge() -> None:
    full = _bat(soc=RAMP.soc_max_pct + 1.0)
    state = RampState()
    control_step(RAMP, _inputs(60000.0, full), state)
    d = control_step(RAMP, _inputs(30000.0, full), state)
    assert d.charge_avail_w == 0.0 and d.battery_setpoint_w is not None and d.battery_setpoint_w >= 0.0
    assert d.grid_target_w is not None and d.grid_target_w <= 30000.0 + 1e-6

    empty = _bat(soc=RAMP.soc_min_pct - 1.0)
    state = RampState()
    control_step(RAMP, _inputs(40000.0, empty), state)
    d = control_step(RAMP, _inputs(65000.0, empty), state)
    assert d.discharge_avail_w == 0.0 and d.battery_setpoint_w is not None and d.battery_setpoint_w <= 0.0
    assert d.budget_source == "grid_ramp" and d.pod_budget_w is not None
    assert d.pod_budget_w < 65000.0 - 5000.0  # the GPUs take the jump


def test_faulted_battery_is_treated_as_absent() -> None:
    bat = BatteryInput(soc_pct=60.0, power_w=0.0, max_charge_w=40000.0, max_discharge_w=40000.0, faults=4)
    state = RampState()
    control_step(RAMP, _inputs(40000.0, bat), state)
    d = control_step(RAMP, _inputs(65000.0, bat), state)
    assert d.discharge_avail_w == 0.0 and d.budget_source == "grid_ramp"


def test_grid_import_limit_beats_the_ramp() -> None:
    cfg = PowerConfig(enabled=True, ramp_limit_w_per_s=1000.0, grid_import_limit_w=50000.0)
    state = RampState()
    control_step(cfg, _inputs(60000.0, _bat(power=0.0)), state)
    d = control_step(cfg, _inputs(60000.0, _bat(power=0.0)), state)
    assert d.grid_target_w == 50000.0
    assert d.battery_setpoint_w == 10000.0


def test_ramped_budget_moves_at_the_rate_and_stops_at_the_target() -> None:
    assert ramped_budget_w(30000.0, None, 50000.0, 5.0) == 30000.0  # no ramp: at once
    assert ramped_budget_w(30000.0, 1000.0, None, 5.0) == 30000.0  # nothing to ramp from
    assert ramped_budget_w(30000.0, 1000.0, 50000.0, 5.0) == 45000.0  # down
    assert ramped_budget_w(30000.0, 1000.0, 50000.0, 60.0) == 30000.0  # never past it
    assert ramped_budget_w(60000.0, 500.0, 50000.0, 4.0) == 52000.0  # up
    assert ramped_budget_w(60000.0, 500.0, 50000.0, -1.0) == 50000.0  # clock before the start
