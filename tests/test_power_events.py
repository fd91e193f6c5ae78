"""Ride-through helpers and curtail orders (agent/power/ridethrough.py, curtail.py): pure code."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.power.curtail import CurtailRefused, curtail_limit_w, validate_curtail
from agent.power.ridethrough import outage_pod_budget_w, stagger

NOW = 1_800_000_000.0


def test_outage_budget_is_the_lower_of_power_and_energy_for_the_hold() -> None:
    # 40 kW inverter, 1 kWh above the floor, 60 s to hold: energy allows 60 kW, power 40 kW.
    assert outage_pod_budget_w(40_000.0, 1000.0, 60.0, 5000.0) == 35_000.0
    # 0.1 kWh for 60 s: 6 kW, minus 5 kW of cooling and 500 W margin.
    assert outage_pod_budget_w(40_000.0, 100.0, 60.0, 5000.0, margin_w=500.0) == pytest.approx(500.0)
    assert outage_pod_budget_w(0.0, 1000.0, 60.0, 5000.0) == 0.0


def test_stagger_releases_one_server_at_a_time() -> None:
    server_of = {"a0": 0, "a1": 0, "b0": 1, "c0": 2}
    held = dict.fromkeys(server_of, 200.0)
    planned = {"a0": 500.0, "a1": 500.0, "b0": 500.0, "c0": 100.0}
    now = stagger(planned, held, server_of, 0.0, 2.0)
    assert now == {"a0": 500.0, "a1": 500.0, "b0": 200.0, "c0": 100.0}  # lower planned caps at once
    later = stagger({"b0": 500.0}, held, server_of, 2.5, 2.0)
    assert later == {"b0": 500.0, "c0": 200.0}  # a0/a1 uncapped; c0 waits for its turn
    assert stagger({}, held, server_of, 10.0, 2.0) == {}


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["g0", "g1", "g2", "g3"]), st.floats(100.0, 700.0)),
    st.dictionaries(st.sampled_from(["g0", "g1", "g2", "g3"]), st.floats(100.0, 700.0)),
    st.floats(0.0, 20.0),
)
def test_stagger_never_exceeds_the_plan(
    planned: dict[str, float], held: dict[str, float], since: float
) -> None:
    server_of = {"g0": 0, "g1": 1, "g2": 2, "g3": 3}
    out = stagger(planned, held, server_of, since, 2.0)
    for gpu, cap in planned.items():
        assert out[gpu] <= cap
    for gpu, cap in out.items():
        assert cap in (planned.get(gpu), held.get(gpu))


def test_curtail_validation_refuses_with_a_reason() -> None:
    ok = validate_curtail("c1", {"fraction": 0.5, "duration_s": 600}, NOW)
    assert ok.start_wall == NOW and ok.deadline_s == 2.0 and ok.fraction == 0.5
    cases = {
        "exactly one": {"duration_s": 60},
        "exactly one of": {"fraction": 0.5, "target_w": 1000.0, "duration_s": 60},
        "fraction must": {"fraction": 1.5, "duration_s": 60},
        "duration_s must": {"fraction": 0.5, "duration_s": 0},
        "finite number": {"target_w": float("nan"), "duration_s": 60},
        "unknown keys": {"fraction": 0.5, "duration_s": 60, "speed": 3},
        "in the past": {"fraction": 0.5, "duration_s": 60, "start_at": (NOW - 120) * 1000},
        "deadline_s": {"fraction": 0.5, "duration_s": 60, "deadline_s": 120},
        "under what the site": {"target_w": 1000.0, "duration_s": 60},
    }
    for reason, body in cases.items():
        with pytest.raises(CurtailRefused, match=reason):
            validate_curtail("c2", body, NOW, min_site_w=5000.0)
    with pytest.raises(CurtailRefused, match="finite number"):
        validate_curtail("c3", {"target_w": True, "duration_s": 60}, NOW)


def test_curtail_limit_in_force_then_released_at_the_ramp() -> None:
    order = validate_curtail("c1", {"fraction": 0.5, "duration_s": 30, "start_at": (NOW + 10) * 1000}, NOW)
    assert curtail_limit_w(order, NOW, 60_000.0, 1000.0) is None  # not started
    assert curtail_limit_w(order, NOW + 10, None, 1000.0) is None  # start import unknown yet
    assert curtail_limit_w(order, NOW + 10, 60_000.0, 1000.0) == 30_000.0
    assert curtail_limit_w(order, NOW + 45, 60_000.0, 1000.0) == pytest.approx(35_000.0)
    assert curtail_limit_w(order, NOW + 45, 60_000.0, None) is None
    fixed = validate_curtail("c2", {"target_w": 20_000, "duration_s": 5}, NOW)
    assert curtail_limit_w(fixed, NOW + 1, None, 1000.0) == 20_000.0


def test_physics_grid_outage_battery_carries_and_the_rest_is_unserved() -> None:
    from hwsim.physics import Physics
    from hwsim.podspec import BatterySpec, PodSpec, SiteMeterSpec, load_pod_spec

    data = load_pod_spec("tiny").model_dump()
    data["battery"] = BatterySpec(id="bms-1", max_discharge_kw=4.0).model_dump()
    data["site_meter"] = SiteMeterSpec(id="site-meter").model_dump()
    phys = Physics(PodSpec.model_validate(data))
    st_ = phys.state
    assert st_.battery is not None and st_.site_meter is not None
    phys.step(1.0)
    load = phys.pod_load_w() + phys.aux_load_w()
    assert load > 4000.0 and st_.site_meter.power_w == pytest.approx(load)
    phys.grid_outage = True
    phys.step(1.0)
    assert st_.site_meter.power_w == 0.0
    assert st_.battery.power_w == pytest.approx(4000.0)  # the inverter's limit, whatever its mode
    assert phys.unserved_w == pytest.approx(phys.pod_load_w() + phys.aux_load_w() - 4000.0)
    assert phys.unserved_j > 0.0
    phys.grid_outage = False
    phys.step(0.1)
    assert phys.unserved_w == 0.0 and st_.site_meter.power_w > 0.0
