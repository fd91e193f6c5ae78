"""The pod physics obeys its basic laws, deterministically."""

from __future__ import annotations

import pytest

from hwsim.faults import FaultError, apply_fault
from hwsim.physics import Physics
from hwsim.podspec import PodSpecError, load_pod_spec


def run(ph: Physics, seconds: float, dt: float = 0.1) -> None:
    for _ in range(round(seconds / dt)):
        ph.step(dt)


def steady(profile: str = "steady", level: float = 0.9, pod: str = "tiny") -> Physics:
    ph = Physics(load_pod_spec(pod), seed=3)
    ph.workload = ph.workload.model_copy(update={"profile": profile, "level": level, "spike_per_s": 0.0})
    return ph


def test_same_seed_same_trajectory() -> None:
    a, b = Physics(load_pod_spec("tiny"), seed=7), Physics(load_pod_spec("tiny"), seed=7)
    run(a, 20)
    run(b, 20)
    assert [g.temp_c for g in a.state.gpus] == [g.temp_c for g in b.state.gpus]
    assert a.state.pdus[0].energy_wh == b.state.pdus[0].energy_wh
    c = Physics(load_pod_spec("tiny"), seed=8)
    run(c, 20)
    assert [g.power_w for g in c.state.gpus] != [g.power_w for g in a.state.gpus]


def test_more_power_is_hotter() -> None:
    low, high = steady(level=0.3), steady(level=0.95)
    run(low, 60)
    run(high, 60)
    assert sum(g.power_w for g in high.state.gpus) > sum(g.power_w for g in low.state.gpus)
    assert min(g.temp_c for g in high.state.gpus) > max(g.temp_c for g in low.state.gpus) + 10


def test_lower_power_limit_means_less_power_within_a_few_ticks() -> None:
    ph = steady(level=0.95)
    run(ph, 60)  # thermal steady state first
    before = ph.state.gpus[2].power_w
    ph.set_power_limit(2, 300.0)
    run(ph, 0.3)
    assert ph.state.gpus[2].power_w <= 300.0 < before
    assert ph.state.gpus[2].clocks_event_reasons & 0x4  # SW power cap reason set
    # ... and the GPU cools down, the others do not.
    t_capped, t_other = ph.state.gpus[2].temp_c, ph.state.gpus[3].temp_c
    run(ph, 30)
    assert ph.state.gpus[2].temp_c < t_capped - 5
    assert ph.state.gpus[3].temp_c == pytest.approx(t_other, abs=1.0)


def test_power_limit_is_clamped_to_constraints() -> None:
    ph = steady()
    ph.set_power_limit(0, 10.0)
    assert ph.state.gpus[0].power_limit_w == ph.state.gpus[0].min_limit_w
    ph.set_power_limit(0, 10_000.0)
    assert ph.state.gpus[0].power_limit_w == ph.state.gpus[0].max_limit_w


def test_chiller_trip_warms_the_coolant_past_40c_in_about_a_minute() -> None:
    ph = Physics(load_pod_spec("demo"), seed=1)
    run(ph, 20)
    assert ph.state.cdus[0].supply_temp_c == pytest.approx(30.0, abs=0.5)
    apply_fault(ph, "chiller-trip", None, clear=False)
    crossed = None
    for i in range(1200):
        ph.step(0.1)
        if ph.state.cdus[0].supply_temp_c >= 40.0:
            crossed = (i + 1) * 0.1
            break
    assert crossed is not None and 30.0 <= crossed <= 120.0
    assert ph.state.chillers[0].alarms & 0x1
    # Clearing the trip brings the water back to setpoint.
    apply_fault(ph, "chiller-trip", None, clear=True)
    run(ph, 240)
    assert ph.state.cdus[0].supply_temp_c < 32.0


def test_pump_failure_stops_flow_and_heats_gpus() -> None:
    ph = steady()
    run(ph, 30)
    t0 = max(g.temp_c for g in ph.state.gpus)
    apply_fault(ph, "pump-fail", "cdu-1", clear=False)
    run(ph, 15)
    cdu = ph.state.cdus[0]
    assert cdu.flow_lpm < 0.05 * cdu.nominal_flow_lpm
    assert cdu.alarms & 0x1 and cdu.alarms & 0x8
    assert max(g.temp_c for g in ph.state.gpus) > t0 + 10


def test_pdu_phase_currents_are_the_sum_of_their_outlets_and_failover_doubles_load() -> None:
    ph = steady()
    run(ph, 5)
    a, b = ph.state.pdu("pdu-a"), ph.state.pdu("pdu-b")
    for pdu in (a, b):
        for phase in pdu.phases:
            outlets = [o for o in pdu.outlets if o.phase == phase.index]
            assert phase.power_w == pytest.approx(sum(o.power_w for o in outlets))
        assert pdu.power_w == pytest.approx(sum(p.power_w for p in pdu.phases))
    # Current follows power with the power factor: I = P / (V * pf).
    ph_a = a.phases[0]
    assert ph_a.current_a == pytest.approx(ph_a.power_w / (ph_a.voltage_v * a.power_factor))
    before = a.power_w
    apply_fault(ph, "pdu-overload", "pdu-a", clear=False)
    run(ph, 0.2)
    assert a.power_w == pytest.approx(2 * before, rel=0.05)
    assert b.power_w == 0.0
    # A meter measuring both feeds sees the total either way.
    assert ph.state.pdu("meter-1").power_w == pytest.approx(a.power_w + b.power_w)


def test_switching_off_both_feeds_powers_the_server_down() -> None:
    ph = steady()
    run(ph, 2)
    for pdu in ph.state.pdus[:2]:
        for o in pdu.outlets:
            pdu.set_outlet(o.index, False)
    run(ph, 1)
    assert all(g.power_w == 0.0 for g in ph.state.gpus)
    with pytest.raises(ValueError):
        ph.state.pdus[0].set_outlet(99, True)


def test_energy_counters_integrate_power() -> None:
    ph = steady(level=0.5)
    run(ph, 1)
    e0 = ph.state.gpus[0].energy_j
    run(ph, 10)
    assert ph.state.gpus[0].energy_j - e0 == pytest.approx(ph.state.gpus[0].power_w * 10, rel=0.02)


def test_runaway_heats_one_gpu_faster_than_3c_per_s() -> None:
    ph = steady(level=0.92)
    run(ph, 60)
    temps = []
    apply_fault(ph, "gpu-runaway", "gpu3", clear=False)
    for _ in range(30):
        run(ph, 0.1)
        temps.append(ph.state.gpus[3].temp_c)
    assert (temps[-1] - temps[0]) / 2.9 >= 3.0
    assert ph.state.gpus[4].temp_c < 70


def test_training_profile_is_a_square_wave() -> None:
    ph = Physics(load_pod_spec("tiny"), seed=1)
    ph.workload = ph.workload.model_copy(update={"profile": "synchronized", "spike_per_s": 0.0})
    powers = []
    for _ in range(240):
        ph.step(0.1)
        powers.append(ph.state.gpus[0].power_w)
    hi, lo = max(powers), min(powers)
    assert hi > 0.85 * 700 and lo < 0.45 * 700
    # All GPUs step together in the synchronized profile.
    assert len({round(g.power_w) for g in ph.state.gpus}) == 1


def test_faults_validate_their_device() -> None:
    ph = steady()
    with pytest.raises(FaultError, match="not a GPU"):
        apply_fault(ph, "gpu-lost", "pdu-a", clear=False)
    with pytest.raises(FaultError, match="unknown fault"):
        apply_fault(ph, "meteor", None, clear=False)
    assert apply_fault(ph, "gpu-lost", "gpu1", clear=False).active
    assert ph.state.gpus[1].lost


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name = 'x'\n[servers]\ncount = 0\n", "servers.count"),
        ("name = 'x'\nbogus = 1\n[servers]\ncount = 1\n", "bogus"),
        ("name = 'x'\n[servers]\ncount = 1\n[[pdu]]\nid='p'\nvendor='apc'\nrating_a=16\n", "snmp endpoint"),
        ("name = 'x'\n[servers\n", "not valid TOML"),
    ],
)
def test_bad_pod_files_name_the_problem(tmp_path, text: str, needle: str) -> None:
    path = tmp_path / "pod.toml"
    path.write_text(text)
    with pytest.raises(PodSpecError, match=needle) as err:
        load_pod_spec(str(path))
    assert str(path) in str(err.value)


def test_unknown_pod_name() -> None:
    with pytest.raises(PodSpecError, match="unknown pod 'huge'"):
        load_pod_spec("huge")


def test_nvml_power_usage_is_a_one_second_average_of_the_instantaneous_draw() -> None:
    """NVML on Ampere+: nvmlDeviceGetPowerUsage averages the last second; a step in the draw
    shows at once in power_w (NVML_FI_DEV_POWER_INSTANT) and over one second in power_avg_w."""
    from hwsim.physics import Physics
    from hwsim.podspec import load_pod_spec

    phys = Physics(load_pod_spec("tiny"), seed=1)
    gpu = phys.state.gpus[0]
    window, joules, span = phys._power_window[0], 0.0, 0.0
    for k in range(40):
        phys.step(0.1)
        joules = sum(d * w for d, w in window)
        span = sum(d for d, _ in window)
        assert abs(gpu.power_avg_w - joules / span) < 1e-6
        assert span <= 1.0 + 1e-9 and (k < 10 or span >= 1.0 - 1e-9)
    # A step in the draw: the instantaneous value moves at once, the average over one second.
    before = gpu.power_avg_w
    gpu.enforced_limit_w = gpu.power_limit_w = 300.0
    phys.step(0.1)
    assert gpu.power_w <= 300.0 + 1e-6 and gpu.power_avg_w > gpu.power_w + 0.5 * (before - 300.0)
