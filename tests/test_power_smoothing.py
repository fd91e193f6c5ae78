"""GPU-side smoothing in hwsim's physics (Blackwell-class vs H100), work done, and the agent's
software fallback (control.soft_floor_step) and smoothing profile choice."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hwsim.nvml as nv
from agent.power.config import GridContract, PowerConfig
from agent.power.control import (
    SMOOTHING_WITH_BATTERY,
    Inputs,
    RampState,
    SoftFloorState,
    choose_smoothing,
    control_step,
    smoothing_alone,
    soft_floor_step,
)
from hwsim.nvml.shm import NvmlShmWriter
from hwsim.physics import Physics
from hwsim.podspec import PodSpec, load_pod_spec

TICK = 0.025


def spec(*, smoothing: bool, profile: str = "synchronized") -> PodSpec:
    data = load_pod_spec("tiny").model_dump()
    data["tick_s"] = TICK
    data["workload"].update(profile=profile, spike_per_s=0.0)
    data["gpu"]["power_smoothing"] = smoothing
    return PodSpec.model_validate(data)


def run(phys: Physics, seconds: float) -> list[float]:
    """GPU 0's draw every tick."""
    out = []
    for _ in range(round(seconds / TICK)):
        phys.step(TICK)
        out.append(phys.state.gpus[0].power_w)
    return out


def test_h100_has_no_power_smoothing() -> None:
    phys = Physics(spec(smoothing=False))
    assert not phys.smoothing[0].supported
    with pytest.raises(ValueError, match="not supported"):
        phys.set_power_smoothing(0, enabled=True, floor_pct=50.0)


def test_smoothing_values_are_validated() -> None:
    phys = Physics(spec(smoothing=True))
    for bad in ({"floor_pct": 120.0}, {"ramp_up_w_per_s": 0.0}, {"hysteresis_ms": -1.0}):
        with pytest.raises(ValueError):
            phys.set_power_smoothing(0, **bad)  # type: ignore[arg-type]
    assert not phys.smoothing[0].enabled  # nothing applied


def test_floor_burns_power_in_the_troughs_but_adds_no_work() -> None:
    plain, smooth = Physics(spec(smoothing=True)), Physics(spec(smoothing=True))
    for i in range(len(smooth.state.gpus)):
        smooth.set_power_smoothing(i, enabled=True, floor_pct=80.0)
    a, b = run(plain, 60.0), run(smooth, 60.0)
    tdp = smooth.state.gpus[0].default_limit_w
    assert min(a[400:]) < 0.5 * tdp  # the trough is there without smoothing ...
    assert min(b[400:]) >= 0.8 * tdp - 1e-6  # ... and filled with it
    assert smooth.state.gpus[0].energy_j > 1.1 * plain.state.gpus[0].energy_j
    # Infinite ramp rates: the job gets what it wants; the floor adds nothing.
    assert smooth.work_done_s() == pytest.approx(plain.work_done_s(), rel=1e-9)


def test_ramp_limits_and_hysteresis() -> None:
    phys = Physics(spec(smoothing=True))
    up, down, hyst_ms = 400.0, 100.0, 1000.0
    phys.set_power_smoothing(
        0, enabled=True, floor_pct=0.0, ramp_up_w_per_s=up, ramp_down_w_per_s=down, hysteresis_ms=hyst_ms
    )
    draws = run(phys, 40.0)
    steps = [b - a for a, b in itertools.pairwise(draws)]
    assert max(steps) <= up * TICK + 1e-6
    assert -min(steps) <= down * TICK + 1e-6

    def at(t: float) -> float:  # draws[i] is the draw after step i + 1 (the sim starts at 1 ms)
        return draws[round((t - 0.001) / TICK) - 1]

    # Synchronized steps of 12 s: the phase wants less from t = 9 s on. The draw holds for the
    # hysteresis, then falls at the ramp-down rate.
    top = at(8.9)
    assert at(9.0 + hyst_ms / 1000.0 - 0.1) == pytest.approx(top)
    assert at(9.0 + hyst_ms / 1000.0 + 0.5) < top - 0.4 * down * 0.5
    # The rise is slower than the phase wants: the job loses work, and only then.
    plain = Physics(spec(smoothing=True))
    run(plain, 40.0)
    assert phys.smoothing[0].work_s < plain.smoothing[0].work_s
    assert phys.smoothing[1].work_s == pytest.approx(plain.smoothing[1].work_s)


def test_a_cap_beats_the_floor_and_slows_the_work() -> None:
    capped, free = Physics(spec(smoothing=True)), Physics(spec(smoothing=True))
    g = capped.state.gpus[0]
    capped.set_power_smoothing(0, enabled=True, floor_pct=90.0)
    capped.set_power_limit(0, g.min_limit_w)
    draws = run(capped, 30.0)
    run(free, 30.0)
    assert max(draws[10:]) <= g.min_limit_w + 1e-6
    assert capped.smoothing[0].work_s < 0.8 * free.smoothing[0].work_s


def test_soft_floor_in_physics_any_gpu() -> None:
    phys, plain = Physics(spec(smoothing=False)), Physics(spec(smoothing=False))
    phys.set_soft_floor(0, 500.0)
    with pytest.raises(ValueError):
        phys.set_soft_floor(0, float("nan"))
    a, b = run(phys, 30.0), run(plain, 30.0)
    assert min(a[10:]) >= 500.0 - 1e-6
    assert min(b[10:]) < 500.0
    assert phys.smoothing[0].work_s == pytest.approx(plain.smoothing[0].work_s)


CFG = PowerConfig(enabled=True, ramp_limit_w_per_s=1000.0, soft_floor_frac=0.8, soft_floor_hold_s=5.0)


def test_soft_floor_step_holds_then_decays_at_the_shared_ramp() -> None:
    s = SoftFloorState()
    caps = {"a": 700.0, "b": 300.0}
    f = soft_floor_step(CFG, s, 0.0, 0.2, {"a": 600.0, "b": 600.0}, caps, 1000.0)
    assert f == {"a": pytest.approx(480.0), "b": 300.0}  # never above the cap
    f = soft_floor_step(CFG, s, 4.0, 0.2, {"a": 480.0, "b": 480.0}, caps, 1000.0)
    assert f["a"] == pytest.approx(480.0)  # held: a trough is shorter than the hold
    f = soft_floor_step(CFG, s, 6.0, 0.1, {"a": 480.0, "b": 480.0}, caps, 1000.0)
    # 1000 W/s shared by 2 GPUs: each peak decays 500 W/s (50 W in 0.1 s), never below the draw.
    assert s.envelope_w["a"] == pytest.approx(550.0)
    assert f["a"] == pytest.approx(440.0)
    soft_floor_step(CFG, s, 7.0, 1.0, {"a": 480.0, "b": 480.0}, caps, 1000.0)
    assert s.envelope_w["a"] == pytest.approx(480.0)
    f = soft_floor_step(CFG, s, 6.2, 0.2, {"a": None}, caps, 1000.0)
    assert f == {}
    assert s.envelope_w == {}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1000.0), min_size=5, max_size=60), st.floats(100.0, 1000.0))
def test_soft_floor_never_falls_faster_than_the_ramp_nor_exceeds_the_cap(
    draws: list[float], cap: float
) -> None:
    s = SoftFloorState()
    prev: float | None = None
    for k, d in enumerate(draws):
        f = soft_floor_step(CFG, s, k * 0.2, 0.2, {"g": d}, {"g": cap}, 1000.0)["g"]
        assert f <= cap + 1e-9
        env_floor = CFG.soft_floor_frac * s.envelope_w["g"]
        if prev is not None and f < min(prev, cap):
            assert prev - f <= CFG.soft_floor_frac * 1000.0 * 0.2 + 1e-6
        prev = min(env_floor, cap)


def test_control_step_soft_floor_fallback_caps_nothing_for_the_ramp() -> None:
    soft = CFG.model_copy(update={"no_battery_fallback": "soft_floor", "grid_import_limit_w": 66_000.0})
    caps = CFG.model_copy(update={"grid_import_limit_w": 66_000.0})
    for cfg, source in ((soft, "grid_import_limit"), (caps, "grid_ramp")):
        state = RampState()
        inp = Inputs(dt=0.2, pod_power_w=30_000.0, gpu_power_w=20_000.0, grid_w=32_000.0, battery=None)
        control_step(cfg, inp, state)
        jump = Inputs(dt=0.2, pod_power_w=55_000.0, gpu_power_w=45_000.0, grid_w=57_000.0, battery=None)
        d = control_step(cfg, jump, state)
        assert d.budget_source == source
        if source == "grid_import_limit":
            assert d.pod_budget_w == pytest.approx(66_000.0 - 2_000.0)
            assert not state.capping
        else:
            assert d.pod_budget_w is not None and d.pod_budget_w < 40_000.0


def test_choose_smoothing_from_the_contract_and_battery() -> None:
    tmp = [700.0] * 64
    assert choose_smoothing(PowerConfig(enabled=True), True, tmp) is None
    with_contract = PowerConfig(enabled=True, grid_contract=GridContract(band_share_max=0.2))
    assert choose_smoothing(with_contract, True, tmp) is SMOOTHING_WITH_BATTERY
    contract = GridContract(
        ramp_up_w_per_s=2000.0, ramp_down_w_per_s=1000.0, dynamic_range_w=20_000.0, band_lo_hz=0.1
    )
    alone = choose_smoothing(PowerConfig(enabled=True, grid_contract=contract), False, tmp)
    assert alone is not None and alone.name == "alone"
    # The contract's pod ramps shared out: 64 GPUs moving together move the import at its ramp.
    assert alone.ramp_up_w_per_s * 64 == pytest.approx(2000.0, abs=1.0)
    assert alone.ramp_down_w_per_s * 64 == pytest.approx(1000.0, abs=1.0)
    assert alone.hysteresis_ms == 5000.0  # half a period of the band's 0.1 Hz edge
    assert alone.floor_pct == pytest.approx(100.0 * (1.0 - 20_000.0 / 44_800.0), abs=0.1)
    assert alone.floor_pct > SMOOTHING_WITH_BATTERY.floor_pct
    # Half the GPUs smoothing (the rest NOT_SUPPORTED): each takes twice the share.
    half = choose_smoothing(PowerConfig(enabled=True, grid_contract=contract), False, tmp[:32])
    assert half is not None and half.ramp_up_w_per_s == pytest.approx(2 * alone.ramp_up_w_per_s, rel=0.01)
    assert 20.0 <= half.floor_pct <= 90.0  # clamped: 20 kW is more than 32 GPUs' whole TMP
    # Only a ramp limit: rates from it, a high default floor; every profile is one NVML takes.
    ramp_only = smoothing_alone(PowerConfig(enabled=True, ramp_limit_w_per_s=640.0), tmp)
    assert ramp_only.ramp_up_w_per_s == pytest.approx(10.0) and ramp_only.floor_pct == 80.0
    for p in (alone, half, ramp_only, SMOOTHING_WITH_BATTERY):
        assert p.settings.valid()


def test_nvml_fake_answers_not_supported_for_h100_smoothing_and_profiles(tmp_path: Path) -> None:
    phys = Physics(spec(smoothing=False))
    writer = NvmlShmWriter(tmp_path / "nvml.shm", len(phys.state.gpus))
    writer.publish(phys.state)
    nv.set_state_path(writer.path)
    try:
        with pytest.raises(pynvml.NVMLError_Uninitialized):
            nv.nvmlDevicePowerSmoothingSetState(None, None)
        nv.nvmlInit()
        handle = nv.nvmlDeviceGetHandleByIndex(0)
        calls = [
            lambda: nv.nvmlDevicePowerSmoothingSetState(handle, pynvml.c_nvmlPowerSmoothingState_v1_t()),
            lambda: nv.nvmlDevicePowerSmoothingActivatePresetProfile(
                handle, pynvml.c_nvmlPowerSmoothingProfile_v1_t()
            ),
            lambda: nv.nvmlDevicePowerSmoothingUpdatePresetProfileParam(
                handle, pynvml.c_nvmlPowerSmoothingProfile_v1_t()
            ),
            lambda: nv.nvmlDeviceWorkloadPowerProfileGetCurrentProfiles(handle, None),
            lambda: nv.nvmlDeviceWorkloadPowerProfileUpdateProfiles_v1(handle, None),
        ]
        for call in calls:
            with pytest.raises(pynvml.NVMLError_NotSupported):
                call()
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            nv.nvmlShutdown()
        nv.set_state_path(None)
        writer.close()
