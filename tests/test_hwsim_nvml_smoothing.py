"""The NVML fake's power smoothing (nvmlDevicePowerSmoothing* and NVML_FI_PWR_SMOOTHING_* read-back)
over the shared-memory file, applied by hwsim's physics: a Blackwell-class GPU honours it, an
H100-class one answers NOT_SUPPORTED."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

import hwsim.nvml as nv
from agent.config import NvmlDevice
from agent.drivers.base import DriverError
from agent.drivers.nvml import NvmlDriver
from agent.drivers.smoothing import WORKLOAD_PROFILES, SmoothingSettings
from hwsim.nvml.shm import NvmlShmWriter
from hwsim.physics import Physics
from hwsim.podspec import PodSpec, load_pod_spec


def _phys(smoothing: bool) -> Physics:
    data = load_pod_spec("tiny").model_dump()
    data["gpu"]["power_smoothing"] = smoothing
    data["workload"].update(profile="synchronized", spike_per_s=0.0)
    return Physics(PodSpec.model_validate(data), seed=1)


class Sim:
    """The physics and its shm writer in-process; ``tick()`` is what hwsim's runner does."""

    def __init__(self, path: Path, smoothing: bool) -> None:
        self.phys = _phys(smoothing)
        self.writer = NvmlShmWriter(path, len(self.phys.state.gpus))
        self.tick()

    def tick(self) -> None:
        for index, op, profile, param, value in self.writer.take_smoothing_requests():
            self.phys.smoothing_request(index, op, profile, param, value)
        self.phys.step(0.1)
        self.writer.publish(self.phys.state, self.phys.smoothing)


@pytest.fixture
def sim(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Sim]:
    s = Sim(tmp_path / "nvml.shm", smoothing=request.param)
    nv.set_state_path(s.writer.path)
    nv.nvmlInit()
    yield s
    nv.nvmlShutdown()
    nv.set_state_path(None)
    s.writer.close()


def _fields(h: object, *ids: int | tuple[int, int]) -> list[float | None]:
    out: list[float | None] = []
    for e in nv.nvmlDeviceGetFieldValues(h, list(ids)):
        out.append(None if e.nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED else float(e.value.dVal))
    return out


def _profile(pid: int, param: int = 0, value: float = 0.0) -> pynvml.c_nvmlPowerSmoothingProfile_v1_t:
    p = pynvml.c_nvmlPowerSmoothingProfile_v1_t()
    p.profileId, p.paramId, p.value = pid, param, value
    return p


@pytest.mark.parametrize("sim", [True], indirect=True)
@pytest.mark.skipif(os.geteuid() != 0, reason="smoothing calls need root, as on real NVML")
def test_blackwell_class_smoothing_is_set_applied_and_read_back(sim: Sim) -> None:
    h = nv.nvmlDeviceGetHandleByIndex(0)
    P = pynvml
    enabled, profiles, lifetime = _fields(
        h,
        P.NVML_FI_PWR_SMOOTHING_ENABLED,
        P.NVML_FI_PWR_SMOOTHING_MAX_NUM_PRESET_PROFILES,
        P.NVML_FI_PWR_SMOOTHING_HW_CIRCUITRY_PERCENT_LIFETIME_REMAINING,
    )
    assert enabled == 0.0 and profiles == 5.0 and lifetime == 100.0
    # Profile 2: floor 80% TMP, 600 W/s up, 100 W/s down, 2 s hysteresis (a fixed profile).
    for param, value in ((0, 80.0), (1, 600.0), (2, 100.0), (3, 2000.0)):
        nv.nvmlDevicePowerSmoothingUpdatePresetProfileParam(h, _profile(2, param, value))
        sim.tick()  # one request slot per GPU: the physics takes each at its next tick
    nv.nvmlDevicePowerSmoothingActivatePresetProfile(h, _profile(2))
    sim.tick()
    state = P.c_nvmlPowerSmoothingState_v1_t()
    state.state = 1
    nv.nvmlDevicePowerSmoothingSetState(h, state)
    sim.tick()
    sm = sim.phys.smoothing[0]
    assert sm.enabled and sm.profile == 2 and sm.floor_pct == 80.0 and sm.ramp_up_w_per_s == 600.0
    got = _fields(
        h,
        P.NVML_FI_PWR_SMOOTHING_ENABLED,
        P.NVML_FI_PWR_SMOOTHING_ACTIVE_PRESET_PROFILE,
        (P.NVML_FI_PWR_SMOOTHING_PROFILE_PERCENT_TMP_FLOOR, 2),
        (P.NVML_FI_PWR_SMOOTHING_PROFILE_RAMP_UP_RATE, 2),
        (P.NVML_FI_PWR_SMOOTHING_PROFILE_RAMP_DOWN_RATE, 2),
        (P.NVML_FI_PWR_SMOOTHING_PROFILE_RAMP_DOWN_HYST_VAL, 2),
        P.NVML_FI_PWR_SMOOTHING_APPLIED_TMP_FLOOR,
    )
    default_w = sim.phys.state.gpus[0].default_limit_w
    assert got == [1.0, 2.0, 80.0, 600_000.0, 100_000.0, 2000.0, 0.8 * default_w]
    # The physics honours it: the draw never falls under the floor in the troughs.
    draws = []
    for _ in range(200):
        sim.tick()
        draws.append(sim.phys.state.gpus[0].power_w)
    assert min(draws[50:]) >= 0.8 * default_w - 1e-6
    # Out of range, unknown profile, bad state: INVALID_ARGUMENT, nothing queued.
    for bad in (_profile(2, 0, 101.0), _profile(2, 1, 0.0), _profile(5, 0, 10.0), _profile(0, 8, 1.0)):
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            nv.nvmlDevicePowerSmoothingUpdatePresetProfileParam(h, bad)
    state.state = 7
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nv.nvmlDevicePowerSmoothingSetState(h, state)
    assert sim.writer.take_smoothing_requests() == []
    # Released: off again, read back.
    state.state = 0
    nv.nvmlDevicePowerSmoothingSetState(h, state)
    sim.tick()
    assert _fields(h, P.NVML_FI_PWR_SMOOTHING_ENABLED) == [0.0] and not sim.phys.smoothing[0].enabled


@pytest.mark.parametrize("sim", [False], indirect=True)
def test_h100_class_answers_not_supported(sim: Sim) -> None:
    h = nv.nvmlDeviceGetHandleByIndex(0)
    state = pynvml.c_nvmlPowerSmoothingState_v1_t()
    state.state = 1
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nv.nvmlDevicePowerSmoothingSetState(h, state)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nv.nvmlDevicePowerSmoothingActivatePresetProfile(h, _profile(0))
    with pytest.raises(pynvml.NVMLError_NotSupported):
        nv.nvmlDevicePowerSmoothingUpdatePresetProfileParam(h, _profile(0, 0, 50.0))
    assert _fields(h, pynvml.NVML_FI_PWR_SMOOTHING_ENABLED, pynvml.NVML_FI_DEV_POWER_INSTANT)[0] is None
    assert sim.writer.take_smoothing_requests() == []


@pytest.mark.parametrize("sim", [True], indirect=True)
@pytest.mark.skipif(os.geteuid() != 0, reason="smoothing calls need root, as on real NVML")
async def test_the_nvml_driver_sets_smoothing_and_its_poll_reads_it_back(sim: Sim) -> None:
    """The agent's NVML driver (controller nvml kind and node agent alike) against the fake, with
    the pod ticking in a thread as hwsim's runner does: six calls in a row, none lost."""
    stop = threading.Event()

    def ticking() -> None:
        while not stop.is_set():
            sim.tick()
            time.sleep(0.005)

    cfg = NvmlDevice.model_validate(
        {"id": "gpus", "kind": "nvml", "library": "hwsim", "hwsim_state": sim.writer.path}
    )
    thread = threading.Thread(target=ticking, daemon=True)
    thread.start()
    drv = NvmlDriver(cfg)
    await drv.open()
    try:
        before = {(r.device, r.metric): r.value for r in await drv.poll()}
        assert before[("gpu0", "power_smoothing_enabled")] == 0.0
        readback = await drv.set_power_smoothing(
            "gpu0", SmoothingSettings(20.0, 2000.0, 2000.0, 100.0), preset=1
        )
        default_w = sim.phys.state.gpus[0].default_limit_w
        assert readback.enabled and readback.profile == 1
        assert readback.floor_w == pytest.approx(0.2 * default_w)
        for _ in range(200):
            got = {(r.device, r.metric): r.value for r in await drv.poll()}
            if got[("gpu0", "power_smoothing_enabled")] == 1.0:
                break
            await asyncio.sleep(0.01)
        assert got[("gpu0", "power_smoothing_profile")] == 1.0
        assert got[("gpu0", "power_smoothing_floor_w")] == pytest.approx(0.2 * default_w)
        sm = sim.phys.smoothing[0]
        assert (sm.floor_pct, sm.ramp_up_w_per_s, sm.ramp_down_w_per_s, sm.hysteresis_ms) == (
            20.0,
            2000.0,
            2000.0,
            100.0,
        )
        assert got[("gpu1", "power_smoothing_enabled")] == 0.0  # only the GPU asked
        released = await drv.set_power_smoothing("gpu0", None)
        assert not released.enabled
        for _ in range(200):
            got = {(r.device, r.metric): r.value for r in await drv.poll()}
            if got[("gpu0", "power_smoothing_enabled")] == 0.0:
                break
            await asyncio.sleep(0.01)
        assert got[("gpu0", "power_smoothing_enabled")] == 0.0
    finally:
        await drv.close()
        stop.set()
        thread.join(5)


@pytest.mark.parametrize("sim", [False], indirect=True)
@pytest.mark.skipif(os.geteuid() != 0, reason="smoothing calls need root, as on real NVML")
async def test_h100_refuses_smoothing_but_takes_a_filler_floor_through_the_driver(sim: Sim) -> None:
    stop = threading.Event()

    def ticking() -> None:
        while not stop.is_set():
            sim.tick()
            time.sleep(0.005)

    cfg = NvmlDevice.model_validate(
        {"id": "gpus", "kind": "nvml", "library": "hwsim", "hwsim_state": sim.writer.path}
    )
    thread = threading.Thread(target=ticking, daemon=True)
    thread.start()
    drv = NvmlDriver(cfg)
    await drv.open()
    try:
        await drv.poll()
        with pytest.raises(DriverError, match="NVML_ERROR_NOT_SUPPORTED"):
            await drv.set_power_smoothing("gpu0", SmoothingSettings(80.0, 600.0, 100.0, 2000.0))
        with pytest.raises(DriverError, match="NVML_ERROR_NOT_SUPPORTED"):
            await drv.set_workload_profile("gpu0", "LLM_TRAINING")
        assert await drv.set_filler_floor("gpu1", 450.0) == 450.0
        for _ in range(200):
            if sim.phys.smoothing[1].soft_floor_w == 450.0:
                break
            await asyncio.sleep(0.01)
        assert sim.phys.smoothing[1].soft_floor_w == 450.0
        assert sim.phys.smoothing[0].soft_floor_w == 0.0
        with pytest.raises(ValueError):
            await drv.set_filler_floor("gpu1", float("nan"))
    finally:
        await drv.close()
        stop.set()
        thread.join(5)


def test_workload_profile_names_are_nvml_ids() -> None:
    for bit, name in enumerate(WORKLOAD_PROFILES):
        assert getattr(pynvml, f"NVML_POWER_PROFILE_{name}") == bit, name
    assert len(WORKLOAD_PROFILES) == pynvml.NVML_POWER_PROFILE_MAX


@pytest.mark.parametrize("sim", [True], indirect=True)
@pytest.mark.skipif(os.geteuid() != 0, reason="workload profile requests need root, as on real NVML")
async def test_the_driver_requests_a_workload_profile_and_reads_it_back(sim: Sim) -> None:
    stop = threading.Event()

    def ticking() -> None:
        while not stop.is_set():
            sim.tick()
            time.sleep(0.005)

    cfg = NvmlDevice.model_validate(
        {"id": "gpus", "kind": "nvml", "library": "hwsim", "hwsim_state": sim.writer.path}
    )
    thread = threading.Thread(target=ticking, daemon=True)
    thread.start()
    drv = NvmlDriver(cfg)
    await drv.open()
    try:
        await drv.poll()
        assert await drv.set_workload_profile("gpu0", "MAX_Q") == "MAX_Q"
        # A new request replaces the old one (the driver clears every other bit first).
        assert await drv.set_workload_profile("gpu0", "LLM_TRAINING") == "LLM_TRAINING"
        assert sim.phys.smoothing[0].workload_mask == 1 << pynvml.NVML_POWER_PROFILE_LLM_TRAINING
        assert sim.phys.smoothing[1].workload_mask == 0
        assert await drv.set_workload_profile("gpu0", None) == ""
        assert sim.phys.smoothing[0].workload_mask == 0
        with pytest.raises(ValueError):
            await drv.set_workload_profile("gpu0", "FASTEST")
        h = nv.nvmlDeviceGetHandleByIndex(0)
        bad = pynvml.c_nvmlWorkloadPowerProfileRequestedProfiles_v1_t()
        bad.version = pynvml.nvmlWorkloadPowerProfileRequestedProfiles_v1
        bad.requestedProfilesMask.mask[0] = 1 << 30  # no such profile
        with pytest.raises(pynvml.NVMLError_InvalidArgument):
            nv.nvmlDeviceWorkloadPowerProfileSetRequestedProfiles(h, bad)
    finally:
        await drv.close()
        stop.set()
        thread.join(5)
