"""The NVML fake per simulated server: a node sees only its server's GPUs, indexed 0..k-1."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pynvml
import pytest

import hwsim.nvml as nv
from hwsim.nvml.shm import NvmlShmWriter
from hwsim.state import PodState, XidEvent
from tests.test_hwsim_nvml import make_gpu

SERVERS, PER = 3, 4


def _shutdown_all() -> None:
    while True:
        try:
            nv.nvmlShutdown()
        except pynvml.NVMLError:
            return


@pytest.fixture
def pod() -> PodState:
    gpus = [replace(make_gpu(i), server=i // PER) for i in range(SERVERS * PER)]
    return PodState(name="test", gpus=gpus)


@pytest.fixture
def writer(tmp_path: Path, pod: PodState) -> Iterator[NvmlShmWriter]:
    w = NvmlShmWriter(tmp_path / "nvml.shm", SERVERS * PER)
    w.publish(pod)
    yield w
    w.close()
    _shutdown_all()
    nv.set_state_path(None)
    nv.set_server(None)


def test_one_server_sees_only_its_gpus(writer: NvmlShmWriter, pod: PodState) -> None:
    nv.set_state_path(writer.path)
    nv.set_server(1)
    nv.nvmlInit()
    assert nv.nvmlDeviceGetCount() == PER
    uuids = [nv.nvmlDeviceGetUUID(nv.nvmlDeviceGetHandleByIndex(i)) for i in range(PER)]
    assert uuids == [g.uuid for g in pod.gpus if g.server == 1]
    for i in range(PER):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        assert nv.nvmlDeviceGetIndex(h) == i  # local index, as NVML on that server
        assert nv.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == round(pod.gpus[PER + i].temp_c)
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nv.nvmlDeviceGetHandleByIndex(PER)
    # Another server's GPU is not found by UUID either.
    with pytest.raises(pynvml.NVMLError_NotFound):
        nv.nvmlDeviceGetHandleByUUID(pod.gpus[0].uuid)
    assert nv.nvmlDeviceGetIndex(nv.nvmlDeviceGetHandleByUUID(pod.gpus[PER + 2].uuid)) == 2


def test_limit_request_reaches_the_right_pod_gpu(writer: NvmlShmWriter) -> None:
    nv.set_state_path(writer.path)
    nv.set_server(2)
    nv.nvmlInit()
    nv.nvmlDeviceSetPowerManagementLimit(nv.nvmlDeviceGetHandleByIndex(1), 400_000)
    assert writer.take_limit_requests() == [(2 * PER + 1, 400.0)]


def test_xid_of_this_server_only(writer: NvmlShmWriter, pod: PodState) -> None:
    nv.set_state_path(writer.path)
    nv.set_server(1)
    nv.nvmlInit()
    es = nv.nvmlEventSetCreate()
    for i in range(PER):
        nv.nvmlDeviceRegisterEvents(
            nv.nvmlDeviceGetHandleByIndex(i), pynvml.nvmlEventTypeXidCriticalError, es
        )
    pod.xid_events += [XidEvent(0, 79, 1), XidEvent(PER + 3, 48, 2)]
    writer.publish(pod)
    data = nv.nvmlEventSetWait_v2(es, 200)
    assert (nv.nvmlDeviceGetIndex(data.device), data.eventData) == (3, 48)
    with pytest.raises(pynvml.NVMLError_Timeout):
        nv.nvmlEventSetWait_v2(es, 20)


def test_env_var_selects_server_and_whole_pod_by_default(
    writer: NvmlShmWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    nv.set_state_path(writer.path)
    nv.nvmlInit()
    assert nv.nvmlDeviceGetCount() == SERVERS * PER  # the `nvml` kind's whole-pod view
    _shutdown_all()
    monkeypatch.setenv(nv.ENV_SERVER, "0")
    nv.nvmlInit()
    assert nv.nvmlDeviceGetCount() == PER
    _shutdown_all()
    monkeypatch.setenv(nv.ENV_SERVER, "nine")
    with pytest.raises(pynvml.NVMLError_InvalidArgument):
        nv.nvmlInit()
