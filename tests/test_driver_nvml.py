"""The NVML driver against the hwsim fake (shared memory written from a hand-built PodState)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pynvml
import pytest

import hwsim.nvml as nv
from agent.config import NvmlDevice
from agent.drivers.base import DeviceError, DeviceUnavailable, driver_class
from agent.drivers.nvml import NvmlDriver
from agent.model import DeviceEvent, Quality, Reading
from agent.poller import Poller
from agent.state import StateStore
from hwsim.nvml.shm import NvmlShmWriter
from hwsim.state import GpuState, PodState, XidEvent

N_GPUS = 3
ALL_METRICS = {
    "temp_c",
    "power_w",
    "power_limit_w",
    "enforced_power_limit_w",
    "default_power_limit_w",
    "min_power_limit_w",
    "max_power_limit_w",
    "energy_mj",
    "util_gpu_pct",
    "util_mem_pct",
    "mem_used_bytes",
    "mem_total_bytes",
    "clock_sm_mhz",
    "clock_mem_mhz",
    "temp_slowdown_c",
    "temp_shutdown_c",
    "temp_max_operating_c",
    "throttle_gpu_idle",
    "throttle_sw_power_cap",
    "throttle_hw_slowdown",
    "throttle_sw_thermal",
    "throttle_hw_thermal",
    "throttle_hw_power_brake",
    "ecc_corrected_total",
    "ecc_uncorrected_total",
    "xid_total",
    "xid_last",  # 0 until an XID is seen (dcgm-exporter's XID_ERRORS)
    "nvml_errors_total",
    "lost",
    # dcgm-exporter default-counter parity (what NVML gives)
    "mem_free_bytes",
    "mem_reserved_bytes",
    "mem_temp_c",
    "power_instant_w",  # NVML_FI_DEV_POWER_INSTANT, in the same field-values call
    "util_enc_pct",
    "util_dec_pct",
    "pcie_replay_total",
    "remapped_rows_correctable_total",
    "remapped_rows_uncorrectable_total",
    "row_remap_pending",
    "row_remap_failure",
}


def make_gpu(i: int) -> GpuState:
    return GpuState(
        index=i,
        uuid=f"GPU-{i:08x}-aaaa-bbbb-cccc-ddddeeeeffff",
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id=f"00000000:{0x20 + i:02X}:00.0",
        serial=f"1652{i:09d}",
        server=0,
        loop="cdu-1",
        default_limit_w=700.0,
        min_limit_w=200.0,
        max_limit_w=700.0,
        power_limit_w=700.0,
        enforced_limit_w=700.0,
        power_w=420.25 + i,  # this tick
        power_avg_w=400.5 + i,  # the last second: nvmlDeviceGetPowerUsage
        temp_c=61.0,
        energy_j=5000.0,
        util_gpu_pct=90.0,
        util_mem_pct=40.0,
        mem_used_bytes=10 * 1024**3,
        clocks_event_reasons=pynvml.nvmlClocksEventReasonSwThermalSlowdown,
        ecc_corrected=3,
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


def _cfg(state: Path, **kw: object) -> NvmlDevice:
    return NvmlDevice.model_validate(
        {"id": "gpus", "kind": "nvml", "library": "hwsim", "hwsim_state": state, **kw}
    )


@pytest.fixture
async def driver(writer: NvmlShmWriter) -> AsyncIterator[NvmlDriver]:
    drv = NvmlDriver(_cfg(writer.path))
    await drv.open()
    yield drv
    await drv.close()


def by_key(readings: list[Reading]) -> dict[tuple[str, str], Reading]:
    keys = [r.key for r in readings]
    assert len(keys) == len(set(keys)), "duplicate readings in one poll"
    return {r.key: r for r in readings}


def test_registered() -> None:
    assert driver_class("nvml") is NvmlDriver


async def test_every_metric_good_for_every_gpu(driver: NvmlDriver) -> None:
    assert driver.gpu_ids() == ["gpu0", "gpu1", "gpu2"]
    got = by_key(await driver.poll())
    for dev in driver.gpu_ids():
        metrics = {m for (d, m) in got if d == dev}
        assert metrics == ALL_METRICS, metrics ^ ALL_METRICS
        for m in metrics:
            r = got[(dev, m)]
            assert r.quality is Quality.GOOD and r.value is not None, r
    g1 = {m: got[("gpu1", m)].value for m in ALL_METRICS}
    assert g1["power_w"] == pytest.approx(401.5)
    assert g1["power_instant_w"] == pytest.approx(421.25)
    assert g1["temp_c"] == 61
    assert g1["energy_mj"] == 5_000_000
    assert g1["mem_used_bytes"] == 10 * 1024**3
    assert g1["mem_total_bytes"] == 80 * 1024**3
    assert (g1["min_power_limit_w"], g1["max_power_limit_w"], g1["default_power_limit_w"]) == (200, 700, 700)
    assert g1["throttle_sw_thermal"] == 1 and g1["throttle_sw_power_cap"] == 0
    assert g1["ecc_corrected_total"] == 3 and g1["ecc_uncorrected_total"] == 0
    assert g1["lost"] == 0 and g1["nvml_errors_total"] == 0
    # Memory as NVML's v2 struct: reserved apart, used without it (DCGM's FB_USED/FREE/RESERVED).
    reserved = nv.RESERVED_BYTES
    assert g1["mem_reserved_bytes"] == reserved
    assert g1["mem_free_bytes"] == 80 * 1024**3 - reserved - 10 * 1024**3
    assert g1["mem_temp_c"] == 65  # HBM a few C above the die (61 C, 40 % memory load)
    assert (g1["util_enc_pct"], g1["util_dec_pct"], g1["pcie_replay_total"]) == (0, 0, 0)
    assert (g1["remapped_rows_uncorrectable_total"], g1["row_remap_failure"], g1["xid_last"]) == (0, 0, 0)
    assert got[("gpu1", "power_w")].unit == "W"
    assert driver.constraints("gpu2") == (200.0, 700.0, 700.0)


async def test_lost_gpu(driver: NvmlDriver, pod: PodState, writer: NvmlShmWriter) -> None:
    await driver.poll()
    pod.gpus[1].lost = True
    writer.publish(pod)
    got = by_key(await driver.poll())
    for m in ALL_METRICS - {"lost", "nvml_errors_total", "xid_total", "xid_last"}:
        r = got[("gpu1", m)]
        assert r.quality is Quality.ERROR and r.value is None, r
        assert r.error == "NVML_ERROR_GPU_IS_LOST"
    assert got[("gpu1", "lost")].value == 1
    assert got[("gpu1", "nvml_errors_total")].value == 1
    for dev in ("gpu0", "gpu2"):
        assert all(r.quality is Quality.GOOD for (d, _), r in got.items() if d == dev)
        assert got[(dev, "lost")].value == 0
    again = by_key(await driver.poll())
    assert again[("gpu1", "nvml_errors_total")].value == 2  # a counter: each failed poll counts
    pod.gpus[1].lost = False
    writer.publish(pod)
    back = by_key(await driver.poll())
    assert back[("gpu1", "lost")].value == 0
    assert back[("gpu1", "power_w")].value == pytest.approx(401.5)
    assert back[("gpu1", "nvml_errors_total")].value == 2


async def test_gpu_lost_at_open(pod: PodState, writer: NvmlShmWriter) -> None:
    pod.gpus[2].lost = True
    writer.publish(pod)
    drv = NvmlDriver(_cfg(writer.path))
    await drv.open()
    try:
        got = by_key(await drv.poll())
        assert got[("gpu2", "lost")].value == 1
        assert got[("gpu2", "temp_c")].quality is Quality.ERROR
        assert got[("gpu0", "temp_c")].quality is Quality.GOOD
        pod.gpus[2].lost = False
        writer.publish(pod)
        got = by_key(await drv.poll())
        assert got[("gpu2", "temp_c")].value == 61
        assert drv.constraints("gpu2") == (200.0, 700.0, 700.0)
    finally:
        await drv.close()


async def test_xid_counting_and_events(pod: PodState, writer: NvmlShmWriter) -> None:
    events: asyncio.Queue[DeviceEvent] = asyncio.Queue()
    drv = NvmlDriver(_cfg(writer.path), event_sink=events.put_nowait)
    await drv.open()
    try:
        got = by_key(await drv.poll())
        assert got[("gpu2", "xid_total")].value == 0
        assert got[("gpu2", "xid_last")].value == 0  # none yet: 0, as dcgm-exporter reports
        pod.xid_events += [XidEvent(2, 79, 1), XidEvent(2, 79, 2), XidEvent(0, 48, 3)]
        writer.publish(pod)
        got = by_key(await drv.poll())
        assert got[("gpu2", "xid_total")].value == 2  # two identical XIDs count as two
        assert got[("gpu2", "xid_last")].value == 79
        assert got[("gpu0", "xid_total")].value == 1
        assert got[("gpu0", "xid_last")].value == 48
        assert got[("gpu1", "xid_total")].value == 0
        received = [await asyncio.wait_for(events.get(), 2) for _ in range(3)]
        assert [(e.device, e.kind, e.detail) for e in received] == [
            ("gpu2", "xid", {"xid": 79, "gpu": 2}),
            ("gpu2", "xid", {"xid": 79, "gpu": 2}),
            ("gpu0", "xid", {"xid": 48, "gpu": 0}),
        ]
        got = by_key(await drv.poll())
        assert got[("gpu2", "xid_total")].value == 2  # not counted again
    finally:
        await drv.close()


async def test_set_power_limit(driver: NvmlDriver, pod: PodState, writer: NvmlShmWriter) -> None:
    assert await driver.set_power_limit("gpu0", 350.0) == 350.0
    assert await driver.set_power_limit("gpu0", 50.0) == 200.0  # clamped to the minimum
    assert await driver.set_power_limit("gpu1", 900.0) == 700.0  # clamped to the maximum
    # The physics picks up the latest request per GPU on its tick.
    requests = writer.take_limit_requests()
    assert requests == [(0, 200.0), (1, 700.0)]
    for index, watts in requests:
        pod.gpus[index].power_limit_w = pod.gpus[index].enforced_limit_w = watts
    writer.publish(pod)
    got = by_key(await driver.poll())
    assert got[("gpu0", "power_limit_w")].value == 200.0
    assert got[("gpu0", "enforced_power_limit_w")].value == 200.0
    with pytest.raises(DeviceError):
        await driver.set_power_limit("gpu9", 300.0)


async def test_set_power_limit_refused(
    driver: NvmlDriver, pod: PodState, writer: NvmlShmWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nv.os, "geteuid", lambda: 1000)
    with pytest.raises(DeviceError, match="NVML_ERROR_NO_PERMISSION"):
        await driver.set_power_limit("gpu0", 300.0)
    monkeypatch.undo()
    pod.gpus[0].lost = True
    writer.publish(pod)
    with pytest.raises(DeviceUnavailable, match="NVML_ERROR_GPU_IS_LOST"):
        await driver.set_power_limit("gpu0", 300.0)
    assert writer.take_limit_requests() == []


async def test_open_without_pod(tmp_path: Path) -> None:
    drv = NvmlDriver(_cfg(tmp_path / "no-pod.shm"))
    with pytest.raises(DeviceUnavailable, match="no running simulated pod"):
        await drv.open()
    await drv.close()


async def test_open_real_pynvml_without_gpu() -> None:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    drv = NvmlDriver(NvmlDevice.model_validate({"id": "gpus", "kind": "nvml"}))
    with pytest.raises(DeviceUnavailable, match=r"NVML_ERROR_LIBRARY_NOT_FOUND|NVML_ERROR_DRIVER_NOT_LOADED"):
        await drv.open()
    await drv.close()


async def test_pod_restart_recovers(tmp_path: Path, pod: PodState, writer: NvmlShmWriter) -> None:
    drv = NvmlDriver(_cfg(writer.path))
    await drv.open()
    try:
        await drv.poll()
        writer.close()
        with pytest.raises(DeviceUnavailable, match="NVML_ERROR_DRIVER_NOT_LOADED"):
            await drv.poll()
        with pytest.raises(DeviceUnavailable):
            await drv.poll()  # still no pod
        w2 = NvmlShmWriter(writer.path, N_GPUS)
        pod.gpus[0].power_w = pod.gpus[0].power_avg_w = 123.0
        w2.publish(pod)
        got = by_key(await drv.poll())
        assert got[("gpu0", "power_w")].value == 123.0
        w2.close()
    finally:
        await drv.close()


async def test_not_supported_is_skipped_not_an_error(
    driver: NvmlDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A board without ECC (GeForce-class, or ECC disabled) answers NOT_SUPPORTED: simulate it in the
    # fake, the layer that plays the hardware.
    calls = []

    def no_ecc(handle: object, error_type: int, counter_type: int) -> int:
        calls.append(error_type)
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    monkeypatch.setattr(nv, "nvmlDeviceGetTotalEccErrors", no_ecc)
    for _ in range(3):
        got = by_key(await driver.poll())
        assert ("gpu0", "ecc_corrected_total") not in got
        assert ("gpu0", "ecc_uncorrected_total") not in got
        assert got[("gpu0", "nvml_errors_total")].value == 0
        assert all(r.quality is Quality.GOOD for r in got.values())
    assert len(calls) == 2 * N_GPUS  # tried once per GPU and kind, then skipped


async def test_older_driver_and_board_without_a_field(
    driver: NvmlDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pre-R510 driver has no nvmlDeviceGetMemoryInfo_v2 (pynvml raises FUNCTION_NOT_FOUND), and a
    # board without an HBM sensor answers NOT_SUPPORTED inside its field-values entry: v1 memory
    # numbers, no reserved and no memory temperature, and neither counts as an error.
    v1 = nv.nvmlDeviceGetMemoryInfo

    def memory_info(handle: object, version: int | None = None) -> object:
        if version:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return v1(handle)

    real_fields = nv.nvmlDeviceGetFieldValues

    def fields(handle: object, ids: list[int]) -> object:
        values = real_fields(handle, ids)
        for entry in values:
            entry.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    monkeypatch.setattr(nv, "nvmlDeviceGetFieldValues", fields)
    monkeypatch.setattr(nv, "nvmlDeviceGetMemoryInfo", memory_info)
    for _ in range(2):
        got = by_key(await driver.poll())
        assert ("gpu1", "mem_reserved_bytes") not in got and ("gpu1", "mem_temp_c") not in got
        assert ("gpu1", "power_instant_w") not in got
        assert got[("gpu1", "mem_used_bytes")].value == 10 * 1024**3 + nv.RESERVED_BYTES  # v1: reserved in
        assert got[("gpu1", "nvml_errors_total")].value == 0
        assert all(r.quality is Quality.GOOD for r in got.values())


async def test_set_during_poll_queues(driver: NvmlDriver, writer: NvmlShmWriter) -> None:
    readings, limit = await asyncio.gather(driver.poll(), driver.set_power_limit("gpu1", 420.0))
    assert limit == 420.0
    assert len(readings) == N_GPUS * len(ALL_METRICS)
    assert writer.take_limit_requests() == [(1, 420.0)]


async def test_hung_call_times_out_and_fails_fast(
    writer: NvmlShmWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    release = threading.Event()
    real = nv.nvmlDeviceGetPowerUsage

    def hung(handle: object) -> int:  # a driver call that hangs (GPU in a bad state)
        release.wait(10)
        return real(handle)

    drv = NvmlDriver(_cfg(writer.path, timeout_s=0.3))
    await drv.open()
    try:
        monkeypatch.setattr(nv, "nvmlDeviceGetPowerUsage", hung)
        with pytest.raises(DeviceUnavailable, match="took over"):
            await drv.poll()
        with pytest.raises(DeviceUnavailable, match="still stuck"):
            await drv.poll()  # no queueing behind the stuck thread
        monkeypatch.undo()
        release.set()
        assert drv._stuck is not None
        await asyncio.wait_for(asyncio.shield(drv._stuck), 5)
        got = by_key(await drv.poll())
        assert got[("gpu0", "power_w")].quality is Quality.GOOD
    finally:
        release.set()
        await drv.close()


SLOW_METRICS = {
    "default_power_limit_w",
    "min_power_limit_w",
    "max_power_limit_w",
    "temp_slowdown_c",
    "temp_shutdown_c",
    "temp_max_operating_c",
    "ecc_corrected_total",
    "ecc_uncorrected_total",
    "mem_reserved_bytes",
    "pcie_replay_total",
    "remapped_rows_correctable_total",
    "remapped_rows_uncorrectable_total",
    "row_remap_pending",
    "row_remap_failure",
}


async def test_slow_metrics_every_n_polls_and_at_once_after_a_gpu_returns(
    pod: PodState, writer: NvmlShmWriter
) -> None:
    drv = NvmlDriver(_cfg(writer.path, slow_metrics_every=3))
    await drv.open()
    try:
        seen = [{m for (d, m) in by_key(await drv.poll()) if d == "gpu0"} for _ in range(4)]
        assert seen[0] == ALL_METRICS  # the first poll reads everything (the store learns cadences)
        assert seen[1] == seen[2] == ALL_METRICS - SLOW_METRICS
        assert seen[3] == ALL_METRICS
        assert {m for m in ALL_METRICS if drv.metric_every(m) == 3} == SLOW_METRICS
        assert drv.metric_every("temp_c") == 1
        # gpu1 falls off the bus (its slow metrics become errors) and comes back between two
        # slow polls: everything is read again on the poll that finds it back.
        pod.gpus[1].lost = True
        writer.publish(pod)
        lost = by_key(await drv.poll())  # poll 5: not a slow poll
        assert lost[("gpu1", "ecc_corrected_total")].quality is Quality.ERROR
        pod.gpus[1].lost = False
        writer.publish(pod)
        back = by_key(await drv.poll())  # poll 6: not a slow poll either
        assert back[("gpu1", "ecc_corrected_total")].value == 3
        assert ("gpu0", "ecc_corrected_total") not in back
    finally:
        await drv.close()


async def test_slow_metrics_stay_good_in_the_store_between_reads(writer: NvmlShmWriter) -> None:
    """The poller stretches a slow metric's staleness limit to N poll intervals."""
    cfg = _cfg(writer.path, slow_metrics_every=5, poll_interval_s=0.1, stale_after_polls=2)
    store = StateStore()
    store.register_device("gpus", stale_after_s=cfg.poll_interval_s * cfg.stale_after_polls)
    poller = Poller(cfg, NvmlDriver(cfg), store)
    task = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(10):
            while poller.stats.polls < 4:
                await asyncio.sleep(0.05)
        now = time.monotonic()
        slow = store.get("gpu0", "temp_slowdown_c")
        fast = store.get("gpu0", "temp_c")
        assert slow is not None and fast is not None
        assert slow.age_s(now) > cfg.poll_interval_s * cfg.stale_after_polls  # older than 2 polls...
        assert store.effective_quality(slow, now) is Quality.GOOD  # ...but within its 5 x 2 polls
        assert store.effective_quality(fast, now) is Quality.GOOD
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
