"""The NVML fake against a shared-memory writer driven by a hand-built PodState."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

import hwsim.nvml as nv
from hwsim.nvml.shm import SHM_FIELDS, NvmlShmReader, NvmlShmWriter
from hwsim.state import GpuState, PodState, XidEvent

N_GPUS = 4


def make_gpu(i: int) -> GpuState:
    return GpuState(
        index=i,
        uuid=f"GPU-{i:08x}-1111-2222-3333-444455556666",
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id=f"00000000:{0x17 + i:02X}:00.0",
        serial=f"165230{i:07d}",
        server=i // 8,
        loop="cdu-1",
        default_limit_w=700.0,
        min_limit_w=200.0,
        max_limit_w=700.0,
        power_limit_w=700.0,
        enforced_limit_w=650.0,
        power_w=512.3456 + i,
        power_avg_w=512.3456 + i,
        temp_c=55.6 + i,
        energy_j=1234.5678,
        util_gpu_pct=87.4,
        util_mem_pct=41.6,
        mem_used_bytes=30 * 1024**3,
        clock_sm_mhz=1755.0,
        clock_mem_mhz=2619.0,
        clocks_event_reasons=pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwSlowdown,
        ecc_corrected=17,
        ecc_uncorrected=2,
    )


@pytest.fixture
def pod() -> PodState:
    return PodState(name="test", gpus=[make_gpu(i) for i in range(N_GPUS)])


@pytest.fixture
def writer(tmp_path: Path, pod: PodState) -> Iterator[NvmlShmWriter]:
    w = NvmlShmWriter(tmp_path / "nvml.shm", N_GPUS)
    w.publish(pod)
    yield w
    w.close()


def _shutdown_all() -> None:
    while True:
        try:
            nv.nvmlShutdown()
        except pynvml.NVMLError:
            return


@pytest.fixture
def lib(writer: NvmlShmWriter) -> Iterator[None]:
    nv.set_state_path(writer.path)
    nv.nvmlInit()
    yield
    _shutdown_all()
    nv.set_state_path(None)


def test_values_and_units(lib: None, pod: PodState) -> None:
    assert nv.nvmlDeviceGetCount() == N_GPUS
    assert nv.nvmlSystemGetDriverVersion().count(".") == 2
    h = nv.nvmlDeviceGetHandleByIndex(1)
    assert isinstance(h, pynvml.c_nvmlDevice_t)  # the same handle type as real pynvml
    assert nv.nvmlDeviceGetIndex(h) == 1
    assert nv.nvmlDeviceGetUUID(h) == pod.gpus[1].uuid
    assert nv.nvmlDeviceGetName(h) == "NVIDIA H100 80GB HBM3"
    assert nv.nvmlDeviceGetSerial(h) == "1652300000001"
    pci = nv.nvmlDeviceGetPciInfo(h)
    assert pci.busId == "00000000:18:00.0"
    assert pci.bus == 0x18
    assert nv.nvmlDeviceGetIndex(nv.nvmlDeviceGetHandleByUUID(pod.gpus[2].uuid)) == 2
    with pytest.raises(pynvml.NVMLError_NotFound):
        nv.nvmlDeviceGetHandleByUUID("GPU-nope")

    assert nv.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 57  # 56.6 C, NVML gives int C
    assert nv.nvmlDeviceGetPowerUsage(h) == 513346  # mW
    assert nv.nvmlDeviceGetTotalEnergyConsumption(h) == 1234567  # mJ
    assert nv.nvmlDeviceGetPowerManagementLimit(h) == 700000
    assert nv.nvmlDeviceGetEnforcedPowerLimit(h) == 650000
    assert nv.nvmlDeviceGetPowerManagementDefaultLimit(h) == 700000
    assert nv.nvmlDeviceGetPowerManagementLimitConstraints(h) == [200000, 700000]
    util = nv.nvmlDeviceGetUtilizationRates(h)
    assert (util.gpu, util.memory) == (87, 42)
    reserved = nv.RESERVED_BYTES
    mem = nv.nvmlDeviceGetMemoryInfo(h)  # v1: used includes the driver-reserved part
    assert isinstance(mem, pynvml.c_nvmlMemory_t)
    assert (mem.total, mem.used, mem.free) == (80 * 1024**3, 30 * 1024**3 + reserved, 50 * 1024**3 - reserved)
    mem2 = nv.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    assert isinstance(mem2, pynvml.c_nvmlMemory_v2_t) and mem2.version == pynvml.nvmlMemory_v2
    assert (mem2.total, mem2.reserved, mem2.used) == (80 * 1024**3, reserved, 30 * 1024**3)
    assert mem2.free == mem2.total - mem2.reserved - mem2.used
    with pytest.raises(pynvml.NVMLError_ArgumentVersionMismatch):
        nv.nvmlDeviceGetMemoryInfo(h, version=0x01000018)
    # dcgm-exporter's default counters that NVML gives, with pynvml's names, types and units.
    fields = nv.nvmlDeviceGetFieldValues(
        h,
        [
            pynvml.NVML_FI_DEV_MEMORY_TEMP,
            pynvml.NVML_FI_DEV_REMAPPED_UNC,
            pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
        ],
    )
    assert isinstance(fields[0], pynvml.c_nvmlFieldValue_t)
    assert fields[0].nvmlReturn == pynvml.NVML_SUCCESS
    assert fields[0].valueType == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    assert fields[0].value.uiVal == 61  # C: HBM above the die's 56.6 C
    assert fields[1].value.uiVal == 2  # each uncorrectable error remapped a row
    assert fields[2].nvmlReturn == pynvml.NVML_ERROR_NOT_SUPPORTED  # not simulated: per entry
    assert nv.nvmlDeviceGetRemappedRows(h) == (0, 2, 1, 0)  # corr, unc, pending, failure
    assert nv.nvmlDeviceGetPcieReplayCounter(h) == 0
    assert nv.nvmlDeviceGetEncoderUtilization(h) == [0, 167000]
    assert nv.nvmlDeviceGetDecoderUtilization(h) == [0, 167000]
    assert nv.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM) == 1755
    assert nv.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM) == 2619
    assert nv.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM) == 1980
    reasons = nv.nvmlDeviceGetCurrentClocksEventReasons(h)
    assert reasons == nv.nvmlDeviceGetCurrentClocksThrottleReasons(h) == 0x4 | 0x8
    thr = nv.nvmlDeviceGetTemperatureThreshold
    assert thr(h, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN) == 92
    assert thr(h, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN) == 89
    assert thr(h, pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX) == 85
    assert thr(h, pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX) == 95
    with pytest.raises(pynvml.NVMLError_NotSupported):
        thr(h, pynvml.NVML_TEMPERATURE_THRESHOLD_ACOUSTIC_MIN)
    ecc = nv.nvmlDeviceGetTotalEccErrors
    assert ecc(h, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC) == 17
    assert ecc(h, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC) == 2
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nv.nvmlDeviceGetHandleByIndex(N_GPUS)


def test_values_follow_publish(lib: None, pod: PodState, writer: NvmlShmWriter) -> None:
    h = nv.nvmlDeviceGetHandleByIndex(0)
    pod.gpus[0].power_w = 350.0  # this tick
    pod.gpus[0].power_avg_w = 301.0  # the last second
    pod.gpus[0].temp_c = 88.2
    writer.publish(pod)
    assert nv.nvmlDeviceGetPowerUsage(h) == 301000  # the 1 s average (Ampere and later)
    inst = nv.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT])[0]
    assert inst.nvmlReturn == 0 and inst.value.uiVal == 350000  # mW, instantaneous
    assert nv.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 88


def test_calls_before_init_and_without_pod(tmp_path: Path) -> None:
    _shutdown_all()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nv.nvmlDeviceGetCount()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        nv.nvmlShutdown()
    nv.set_state_path(None)
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):  # as pynvml without libnvidia-ml
        nv.nvmlInit()
    nv.set_state_path(tmp_path / "absent.shm")
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):  # library there, "driver" (pod) not
        nv.nvmlInit()
    (tmp_path / "junk.shm").write_bytes(b"x" * 4096)
    nv.set_state_path(tmp_path / "junk.shm")
    with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
        nv.nvmlInit()
    nv.set_state_path(None)


def test_env_var_and_pod_restart(tmp_path: Path, pod: PodState, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "nvml.shm"
    monkeypatch.setenv(nv.ENV_STATE, str(path))
    nv.set_state_path(None)
    w1 = NvmlShmWriter(path, N_GPUS)
    w1.publish(pod)
    try:
        nv.nvmlInit()
        h = nv.nvmlDeviceGetHandleByIndex(0)
        assert nv.nvmlDeviceGetPowerUsage(h) == 512346
        w1.close()
        assert not path.exists()
        with pytest.raises(pynvml.NVMLError_DriverNotLoaded):
            nv.nvmlDeviceGetPowerUsage(h)
        w2 = NvmlShmWriter(path, N_GPUS)
        pod.gpus[0].power_w = pod.gpus[0].power_avg_w = 100.0
        w2.publish(pod)
        nv.nvmlShutdown()
        nv.nvmlInit()
        assert nv.nvmlDeviceGetPowerUsage(nv.nvmlDeviceGetHandleByIndex(0)) == 100000
        w2.close()
    finally:
        _shutdown_all()


def test_set_power_limit_request(lib: None, pod: PodState, writer: NvmlShmWriter) -> None:
    h = nv.nvmlDeviceGetHandleByIndex(2)
    assert writer.take_limit_requests() == []
    nv.nvmlDeviceSetPowerManagementLimit(h, 450000)
    # Real NVML reads a new limit back at once; the fake reports the pending request.
    assert nv.nvmlDeviceGetPowerManagementLimit(h) == 450000
    assert writer.take_limit_requests() == [(2, 450.0)]
    assert writer.take_limit_requests() == []
    # The physics applies it on its tick.
    pod.gpus[2].power_limit_w = pod.gpus[2].enforced_limit_w = 450.0
    writer.publish(pod)
    assert nv.nvmlDeviceGetPowerManagementLimit(h) == 450000
    assert nv.nvmlDeviceGetEnforcedPowerLimit(h) == 450000
    # Two requests before a tick: the physics gets the latest.
    nv.nvmlDeviceSetPowerManagementLimit(h, 300000)
    nv.nvmlDeviceSetPowerManagementLimit(h, 350000)
    assert writer.take_limit_requests() == [(2, 350.0)]
    with pytest.raises(TypeError):  # pynvml passes c_uint(limit): a float is refused
        nv.nvmlDeviceSetPowerManagementLimit(h, 300000.0)


def test_set_power_limit_refused(lib: None, writer: NvmlShmWriter, monkeypatch: pytest.MonkeyPatch) -> None:
    h = nv.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nv.nvmlDeviceSetPowerManagementLimit(h, 199999)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nv.nvmlDeviceSetPowerManagementLimit(h, 700001)
    monkeypatch.setattr(nv.os, "geteuid", lambda: 1000)
    with pytest.raises(pynvml.NVMLError_NoPermission):
        nv.nvmlDeviceSetPowerManagementLimit(h, 400000)
    assert writer.take_limit_requests() == []


def test_lost_gpu(lib: None, pod: PodState, writer: NvmlShmWriter) -> None:
    h1 = nv.nvmlDeviceGetHandleByIndex(1)
    pod.gpus[1].lost = True
    writer.publish(pod)
    calls = [
        lambda: nv.nvmlDeviceGetHandleByIndex(1),
        lambda: nv.nvmlDeviceGetPowerUsage(h1),
        lambda: nv.nvmlDeviceGetTemperature(h1, pynvml.NVML_TEMPERATURE_GPU),
        lambda: nv.nvmlDeviceGetMemoryInfo(h1),
        lambda: nv.nvmlDeviceGetUUID(h1),
        lambda: nv.nvmlDeviceSetPowerManagementLimit(h1, 400000),
    ]
    for call in calls:
        with pytest.raises(pynvml.NVMLError_GpuIsLost) as info:
            call()
        assert info.value.value == pynvml.NVML_ERROR_GPU_IS_LOST
    assert nv.nvmlDeviceGetPowerUsage(nv.nvmlDeviceGetHandleByIndex(0)) == 512346  # others unaffected
    pod.gpus[1].lost = False
    writer.publish(pod)
    assert nv.nvmlDeviceGetPowerUsage(h1) == 513346


def test_xid_events(lib: None, pod: PodState, writer: NvmlShmWriter) -> None:
    pod.xid_events.append(XidEvent(gpu_index=3, xid=13, seq=1))  # before the set: not delivered
    writer.publish(pod)
    es = nv.nvmlEventSetCreate()
    for i in (0, 3):
        nv.nvmlDeviceRegisterEvents(
            nv.nvmlDeviceGetHandleByIndex(i), pynvml.nvmlEventTypeXidCriticalError, es
        )
    pod.xid_events += [XidEvent(3, 79, 2), XidEvent(1, 48, 3), XidEvent(3, 79, 4), XidEvent(0, 94, 5)]
    writer.publish(pod)
    writer.publish(pod)  # publishing again must not repeat events
    got = []
    for _ in range(3):
        data = nv.nvmlEventSetWait_v2(es, 100)
        assert data.eventType == pynvml.nvmlEventTypeXidCriticalError
        got.append((nv.nvmlDeviceGetIndex(data.device), data.eventData))
    assert got == [(3, 79), (3, 79), (0, 94)]  # GPU 1 not registered; identical XIDs are two events
    t0 = time.monotonic()
    with pytest.raises(pynvml.NVMLError_Timeout):
        nv.nvmlEventSetWait_v2(es, 50)
    assert 0.04 <= time.monotonic() - t0 < 1.0
    nv.nvmlEventSetFree(es)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nv.nvmlEventSetWait_v2(es, 0)


_WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from hwsim.state import GpuState, PodState
    from hwsim.nvml.shm import NvmlShmWriter
    path, n = Path(sys.argv[1]), 2
    gpus = [GpuState(index=i, uuid="u", name="n", pci_bus_id="p", serial="s", server=0, loop="l",
                     default_limit_w=0, min_limit_w=0, max_limit_w=0, power_limit_w=0,
                     enforced_limit_w=0) for i in range(n)]
    pod = PodState(name="t", gpus=gpus)
    w = NvmlShmWriter(path, n)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    v = 0
    while not stop.is_set():  # until the test closes our stdin
        v += 1
        for g in gpus:  # every numeric field = v: a torn record mixes two values
            for name in ("default_limit_w", "min_limit_w", "max_limit_w", "power_limit_w",
                         "enforced_limit_w", "power_w", "power_avg_w", "temp_c", "energy_j",
                         "util_gpu_pct",
                         "util_mem_pct", "clock_sm_mhz", "clock_mem_mhz", "clock_sm_max_mhz",
                         "clock_mem_max_mhz", "temp_shutdown_c", "temp_slowdown_c",
                         "temp_max_operating_c", "temp_mem_max_c"):
                setattr(g, name, float(v))
            g.mem_total_bytes = g.mem_used_bytes = g.ecc_corrected = g.ecc_uncorrected = v
            g.clocks_event_reasons = v
        w.publish(pod)
    w.close()
    """
)


def test_seqlock_never_tears_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "nvml.shm"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER_SCRIPT, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        reader = NvmlShmReader(path)
        seen: set[float] = set()
        deadline = time.monotonic() + 20
        reads = 0
        # Read until the writer has visibly moved on many times (a loaded CI box is slow).
        while (len(seen) < 300 or reads < 50_000) and time.monotonic() < deadline:
            for i in (0, 1):
                rec = reader.numbers(i)
                floats = rec[9:]
                ints = (rec.mem_total_bytes, rec.mem_used_bytes, rec.ecc_corrected, rec.ecc_uncorrected)
                assert len(set(floats)) == 1, f"torn record: {rec}"
                assert set(ints) == {int(floats[0])}, f"torn record: {rec}"
                seen.add(floats[0])
                reads += 1
        reader.close()
        # The writer really was writing while we read (many distinct values seen).
        assert len(seen) >= 300, (len(seen), reads)
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_every_gpu_state_field_is_in_shm() -> None:
    from dataclasses import fields

    assert {f.name for f in fields(GpuState)} <= SHM_FIELDS


def _public_functions() -> dict[str, object]:
    return {
        name: obj
        for name, obj in vars(nv).items()
        if inspect.isfunction(obj) and obj.__module__ == nv.__name__ and not name.startswith("_")
    }


def test_api_matches_real_pynvml() -> None:
    funcs = _public_functions()
    assert "nvmlDeviceGetPowerUsage" in funcs
    fake_only = {"set_state_path", "set_server", "podagentSetFillerFloor"}  # not NVML: the filler backend
    for name, fn in funcs.items():
        if name in fake_only:
            continue
        assert hasattr(pynvml, name), f"{name} is not a pynvml function"
        real = inspect.signature(getattr(pynvml, name)).parameters
        ours = inspect.signature(fn).parameters  # type: ignore[arg-type]
        assert len(ours) == len(real), f"{name}: {list(ours)} vs pynvml {list(real)}"
    for name, value in vars(nv).items():
        if name.startswith(("NVML_", "nvmlClocks", "nvmlEventType")) and isinstance(value, int):
            assert getattr(pynvml, name) == value, name
    # The error classes are pynvml's own: code written against pynvml catches the fake's errors.
    assert nv.NVMLError is pynvml.NVMLError
    assert nv.NVMLError_GpuIsLost is pynvml.NVMLError_GpuIsLost  # type: ignore[attr-defined]
    assert type(nv.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)) is pynvml.NVMLError_GpuIsLost
    assert str(nv.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)) == "Insufficient Permissions"


def test_call_cost_is_microseconds(lib: None) -> None:
    h = nv.nvmlDeviceGetHandleByIndex(0)
    n = 5000
    t0 = time.perf_counter()
    for _ in range(n):
        nv.nvmlDeviceGetPowerUsage(h)
        nv.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)
        nv.nvmlDeviceGetMemoryInfo(h)
    per_call_us = (time.perf_counter() - t0) / (3 * n) * 1e6
    assert per_call_us < 50, per_call_us  # ~3 us on a laptop-class core; 50 leaves room for CI noise
