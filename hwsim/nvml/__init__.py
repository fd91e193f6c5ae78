"""A drop-in for ``pynvml`` (nvidia-ml-py 13.615) that reads a simulated pod's GPUs.

The same function names, argument counts, return types and units as NVIDIA's binding for what the
agent uses; the constants and the ``NVMLError`` classes ARE pynvml's (importing ``pynvml`` does not
load libnvidia-ml, only ``nvmlInit`` does), so ``except pynvml.NVMLError_GpuIsLost`` and
``except hwsim.nvml.NVMLError_GpuIsLost`` catch the same thing. Handles and event sets are ctypes
pointers of pynvml's own types (never dereferenced), returned structures are pynvml's structures.

How the fake finds the pod: ``set_state_path(path)`` (the agent's driver calls it when its config
says ``library = "hwsim"``), else the environment variable ``HWSIM_NVML_STATE``.

Which GPUs it shows: by default every GPU of the pod (one host seeing the whole pod: the controller's
``nvml`` device kind against a simulated pod). ``set_server(n)`` (the node agent calls it from its
config), else ``HWSIM_NVML_SERVER=n``, shows only simulated server ``n``'s GPUs, as NVML on that
server would: indices 0..k-1 local to the server (``nvmlDeviceGetIndex``), each with its own UUID.

``HWSIM_NVML_FILLER=0``: this host has no filler backend (``podagentSetFillerFloor``, not NVML,
answers FUNCTION_NOT_FOUND), as every real GPU host today.

``nvmlInit`` without a pod, chosen to match what real NVML does:
- no state path configured at all: ``NVMLError_LibraryNotFound`` (12), as pynvml raises when
  ``libnvidia-ml.so.1`` is not installed: there is nothing to talk to.
- a path, but no file there, a file that is not ours, or its writer gone: ``NVMLError_DriverNotLoaded``
  (9), as libnvidia-ml answers when it is installed but the kernel driver is not loaded.
A pod that stops while mapped (writer closed or dead): every call raises ``DriverNotLoaded``;
``nvmlShutdown`` + ``nvmlInit`` maps the new pod's file.

Faithful behaviours: calls before init raise ``Uninitialized``; a lost GPU raises ``GpuIsLost`` from
every per-device call (handle lookup included); ``nvmlDeviceSetPowerManagementLimit`` refuses
non-root callers with ``NoPermission`` and out-of-constraint values with ``InvalidArgument``, and a
non-int limit with ``TypeError`` (ctypes ``c_uint``); a new limit reads back at once (pending until
the physics' next tick applies it; the enforced limit follows on that tick). Events: only XIDs are
ever delivered (``nvmlEventTypeXidCriticalError``); the event data is pynvml's
``c_nvmlEventData_t`` (``.device .eventType .eventData .gpuInstanceId .computeInstanceId``; real
NVML has no ``.gpuId``: map ``.device`` with ``nvmlDeviceGetIndex``).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml as _pynvml
from pynvml import (
    NVML_AGGREGATE_ECC,
    NVML_CLOCK_GRAPHICS,
    NVML_CLOCK_MEM,
    NVML_CLOCK_SM,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_TIMEOUT,
    NVML_ERROR_UNINITIALIZED,
    NVML_FI_DEV_MEMORY_TEMP,
    NVML_FI_DEV_PCIE_REPLAY_COUNTER,
    NVML_FI_DEV_POWER_INSTANT,
    NVML_FI_DEV_REMAPPED_COR,
    NVML_FI_DEV_REMAPPED_FAILURE,
    NVML_FI_DEV_REMAPPED_PENDING,
    NVML_FI_DEV_REMAPPED_UNC,
    NVML_FI_PWR_SMOOTHING_ACTIVE_PRESET_PROFILE,
    NVML_FI_PWR_SMOOTHING_APPLIED_TMP_CEIL,
    NVML_FI_PWR_SMOOTHING_APPLIED_TMP_FLOOR,
    NVML_FI_PWR_SMOOTHING_ENABLED,
    NVML_FI_PWR_SMOOTHING_HW_CIRCUITRY_PERCENT_LIFETIME_REMAINING,
    NVML_FI_PWR_SMOOTHING_IMM_RAMP_DOWN_ENABLED,
    NVML_FI_PWR_SMOOTHING_MAX_NUM_PRESET_PROFILES,
    NVML_FI_PWR_SMOOTHING_MAX_PERCENT_TMP_FLOOR_SETTING,
    NVML_FI_PWR_SMOOTHING_MIN_PERCENT_TMP_FLOOR_SETTING,
    NVML_FI_PWR_SMOOTHING_PRIMARY_POWER_FLOOR,
    NVML_FI_PWR_SMOOTHING_PRIV_LVL,
    NVML_FI_PWR_SMOOTHING_PROFILE_PERCENT_TMP_FLOOR,
    NVML_FI_PWR_SMOOTHING_PROFILE_RAMP_DOWN_HYST_VAL,
    NVML_FI_PWR_SMOOTHING_PROFILE_RAMP_DOWN_RATE,
    NVML_FI_PWR_SMOOTHING_PROFILE_RAMP_UP_RATE,
    NVML_FI_PWR_SMOOTHING_PROFILE_SECONDARY_POWER_FLOOR,
    NVML_MEMORY_ERROR_TYPE_CORRECTED,
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
    NVML_TEMPERATURE_GPU,
    NVML_TEMPERATURE_THRESHOLD_GPU_MAX,
    NVML_TEMPERATURE_THRESHOLD_MEM_MAX,
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
    NVML_VALUE_TYPE_DOUBLE,
    NVML_VALUE_TYPE_UNSIGNED_INT,
    NVML_VOLATILE_ECC,
    NVMLError,
    c_nvmlDevice_t,
    c_nvmlEventData_t,
    c_nvmlEventSet_t,
    c_nvmlFieldValue_t,
    c_nvmlMemory_t,
    c_nvmlMemory_v2_t,
    c_nvmlUtilization_t,
    nvmlEventTypeClock,
    nvmlEventTypeDoubleBitEccError,
    nvmlEventTypePState,
    nvmlEventTypeSingleBitEccError,
    nvmlEventTypeXidCriticalError,
    nvmlMemory_v2,
    nvmlPciInfo_t,
)

from hwsim.nvml.shm import (
    SMOOTH_OP_ACTIVATE,
    SMOOTH_OP_FILLER_FLOOR,
    SMOOTH_OP_SET_STATE,
    SMOOTH_OP_UPDATE_PARAM,
    SMOOTH_OP_WORKLOAD_CLEAR,
    SMOOTH_OP_WORKLOAD_SET,
    SMOOTHING_PARAMS,
    SMOOTHING_PROFILES,
    GpuNumbers,
    NvmlShmReader,
    ShmClosedError,
)

# Re-export every constant and error class under pynvml's names (NVML_*, nvmlClocks*Reason*,
# nvmlEventType*, NVMLError_*), so code written for pynvml finds them here too.
_REEXPORT = (
    "NVML_",
    "NVMLError",
    "nvmlClocksEventReason",
    "nvmlClocksThrottleReason",
    "nvmlEventType",
    "nvmlEventMig",
    "c_nvml",
    "nvmlPciInfo",
    "nvmlPowerSmoothing",  # struct version constants (..._v1)
    "nvmlWorkloadPowerProfile",
)
globals().update({_k: _v for _k, _v in vars(_pynvml).items() if _k.startswith(_REEXPORT)})

ENV_STATE = "HWSIM_NVML_STATE"
ENV_SERVER = "HWSIM_NVML_SERVER"
# "0": this host has no filler backend (podagentSetFillerFloor answers FUNCTION_NOT_FOUND).
ENV_FILLER = "HWSIM_NVML_FILLER"
DRIVER_VERSION = "570.133.20"  # what a current datacenter driver branch reports
NVML_VERSION = "12.570.133.20"
PCI_DEVICE_ID = 0x233010DE  # H100 SXM5 80GB (device 0x2330, vendor 0x10DE)
_HANDLE_BASE = 0x4E564D4C0000  # fake handle "addresses": opaque, never dereferenced
_EVENTSET_BASE = 0x4E564D450000
_SUPPORTED_EVENTS = (
    nvmlEventTypeXidCriticalError
    | nvmlEventTypeSingleBitEccError
    | nvmlEventTypeDoubleBitEccError
    | nvmlEventTypePState
    | nvmlEventTypeClock
)
RESERVED_BYTES = 512 * 2**20  # driver-reserved framebuffer (a few hundred MiB on H100 boards)
REMAP_ROWS_MAX = 512  # rows the sim's HBM can remap before remapping fails
_CODEC_SAMPLE_US = 167_000  # NVENC/NVDEC utilization sampling period NVML reports (us)
_NO_INSTANCE = 0xFFFFFFFF  # gpuInstanceId/computeInstanceId of a non-MIG event
_EVENT_POLL_S = 0.005  # how often a waiting event set looks at the shm ring

_state_path: Path | None = None
_server: int | None = None
_reader: NvmlShmReader | None = None
_refcount = 0
# Handles are per visible GPU, in local index order; a handle's "address" encodes the GPU's index
# in the pod's shm file (the reader's index), so every per-handle call works on pod indices.
_handles: list[Any] = []
_handle_index: dict[int, int] = {}  # id(handle object we made) -> GPU index in the shm file
_local: dict[int, int] = {}  # GPU index in the shm file -> the local index NVML reports
_lock = threading.Lock()


def set_state_path(path: str | os.PathLike[str] | None) -> None:
    """Where the pod's state file is (hwsim-only; takes precedence over ``HWSIM_NVML_STATE``)."""
    global _state_path  # noqa: PLW0603  (module state, as libnvidia-ml's)
    _state_path = Path(path) if path is not None else None


def set_server(server: int | None) -> None:
    """Show only this simulated server's GPUs (hwsim-only; takes precedence over
    ``HWSIM_NVML_SERVER``); None shows the whole pod. Takes effect at the next ``nvmlInit``."""
    global _server  # noqa: PLW0603
    _server = server


def _selected_server() -> int | None:
    if _server is not None:
        return _server
    raw = os.environ.get(ENV_SERVER, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT) from None


# -- library ---------------------------------------------------------------------------------
def nvmlInitWithFlags(flags: int) -> None:  # flags only select GPUs to skip: nothing to skip here
    global _reader, _refcount, _handles, _handle_index, _local  # noqa: PLW0603
    with _lock:
        if _reader is not None:
            _refcount += 1
            return
        path = _state_path
        if path is None and os.environ.get(ENV_STATE):
            path = Path(os.environ[ENV_STATE])
        if path is None:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        try:
            reader = NvmlShmReader(path)
        except (OSError, ValueError):
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED) from None
        if not reader.alive():
            reader.close()
            raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
        try:
            server = _selected_server()
        except NVMLError:
            reader.close()
            raise
        if server is None:
            visible = list(range(reader.n_gpus))
        else:
            # A server's GPUs in the order the pod lists them (its local index order).
            visible = [i for i in range(reader.n_gpus) if reader.numbers(i).server == server]
        handles = [ctypes.cast(ctypes.c_void_p(_HANDLE_BASE + i), c_nvmlDevice_t) for i in visible]
        _handles = handles
        _handle_index = {id(h): i for h, i in zip(handles, visible, strict=True)}
        _local = {i: n for n, i in enumerate(visible)}
        _reader = reader
        _refcount = 1


def nvmlInit() -> None:
    nvmlInitWithFlags(0)


def nvmlShutdown() -> None:
    global _reader, _refcount  # noqa: PLW0603
    with _lock:
        if _reader is None:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _refcount -= 1
        if _refcount <= 0:
            _reader.close()
            _reader = None
            _refcount = 0
            _event_sets.clear()


def nvmlErrorString(result: int) -> str:
    return str(NVMLError._errcode_to_string.get(result, "Unknown Error"))


def _lib() -> NvmlShmReader:
    reader = _reader
    if reader is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    try:
        reader.check()
    except ShmClosedError:
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED) from None
    return reader


def nvmlSystemGetDriverVersion() -> str:
    _lib()
    return DRIVER_VERSION


def nvmlSystemGetNVMLVersion() -> str:
    _lib()
    return NVML_VERSION


def nvmlDeviceGetCount() -> int:
    _lib()
    return len(_handles)


# -- handles ---------------------------------------------------------------------------------
def _index(handle: Any, reader: NvmlShmReader) -> int:
    idx = _handle_index.get(id(handle))
    if idx is not None and _handles[_local[idx]] is handle:
        return idx
    try:
        addr = ctypes.cast(handle, ctypes.c_void_p).value or 0
    except (TypeError, ctypes.ArgumentError):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT) from None
    idx = addr - _HANDLE_BASE
    if not 0 <= idx < reader.n_gpus or idx not in _local:  # not a GPU of this (simulated) host
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return idx


def _gpu(handle: Any) -> tuple[NvmlShmReader, int, GpuNumbers]:
    """The reader, index and numbers of a present GPU (GpuIsLost otherwise)."""
    reader = _lib()
    idx = _index(handle, reader)
    rec = reader.numbers(idx)
    if rec.lost:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    return reader, idx, rec


def nvmlDeviceGetHandleByIndex(index: int) -> Any:
    reader = _lib()
    if not isinstance(index, int) or not 0 <= index < len(_handles):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    handle = _handles[index]
    if reader.numbers(_handle_index[id(handle)]).lost:
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    return handle


def nvmlDeviceGetHandleByUUID(uuid: str | bytes) -> Any:
    reader = _lib()
    want = uuid.decode() if isinstance(uuid, bytes) else uuid
    for i, local in _local.items():
        if reader.strings(i).uuid == want:
            if reader.numbers(i).lost:
                raise NVMLError(NVML_ERROR_GPU_IS_LOST)
            return _handles[local]
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetIndex(handle: Any) -> int:
    return _local[_gpu(handle)[1]]


def nvmlDeviceGetUUID(handle: Any) -> str:
    reader, idx, _ = _gpu(handle)
    return reader.strings(idx).uuid


def nvmlDeviceGetName(handle: Any) -> str:
    reader, idx, _ = _gpu(handle)
    return reader.strings(idx).name


def nvmlDeviceGetSerial(handle: Any) -> str:
    reader, idx, _ = _gpu(handle)
    return reader.strings(idx).serial


def nvmlDeviceGetPciInfo(handle: Any) -> Any:
    reader, idx, _ = _gpu(handle)
    bus_id = reader.strings(idx).pci_bus_id  # "00000000:17:00.0"
    info = nvmlPciInfo_t()
    info.busId = bus_id
    try:
        dom, bus, devfn = bus_id.split(":")
        info.domain, info.bus, info.device = int(dom, 16), int(bus, 16), int(devfn.split(".")[0], 16)
        info.busIdLegacy = f"{info.domain:04x}:{bus}:{devfn}"[:15]
    except ValueError:
        info.busIdLegacy = bus_id[:15]
    info.pciDeviceId = PCI_DEVICE_ID
    info.pciSubSystemId = 0x16C110DE
    return info


# -- sensors ---------------------------------------------------------------------------------
def nvmlDeviceGetTemperature(handle: Any, sensor: int) -> int:
    rec = _gpu(handle)[2]
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return round(rec.temp_c)


_THRESHOLDS = {
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN: "temp_shutdown_c",
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN: "temp_slowdown_c",
    NVML_TEMPERATURE_THRESHOLD_GPU_MAX: "temp_max_operating_c",
    NVML_TEMPERATURE_THRESHOLD_MEM_MAX: "temp_mem_max_c",
}


def nvmlDeviceGetTemperatureThreshold(handle: Any, threshold: int) -> int:
    rec = _gpu(handle)[2]
    name = _THRESHOLDS.get(threshold)
    if name is None:
        # Acoustic and GPS thresholds: not on datacenter boards.
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return round(getattr(rec, name))


def nvmlDeviceGetPowerUsage(handle: Any) -> int:
    # Ampere and later: the draw averaged over the last second (the instantaneous value is the
    # field NVML_FI_DEV_POWER_INSTANT).
    return round(_gpu(handle)[2].power_avg_w * 1000)


def nvmlDeviceGetPowerManagementLimit(handle: Any) -> int:
    reader, idx, rec = _gpu(handle)
    req_seq, req_w = reader.request(idx)
    if req_seq > rec.limit_req_ack:
        return round(req_w * 1000)  # set but not yet applied by the physics: real NVML reads it back
    return round(rec.power_limit_w * 1000)


def nvmlDeviceGetPowerManagementLimitConstraints(handle: Any) -> list[int]:
    rec = _gpu(handle)[2]
    return [round(rec.min_limit_w * 1000), round(rec.max_limit_w * 1000)]


def nvmlDeviceGetPowerManagementDefaultLimit(handle: Any) -> int:
    return round(_gpu(handle)[2].default_limit_w * 1000)


def nvmlDeviceGetEnforcedPowerLimit(handle: Any) -> int:
    return round(_gpu(handle)[2].enforced_limit_w * 1000)


def nvmlDeviceSetPowerManagementLimit(handle: Any, limit: int) -> None:
    reader, idx, rec = _gpu(handle)
    if not isinstance(limit, int):
        raise TypeError("int expected instead of " + type(limit).__name__)  # as ctypes.c_uint(limit)
    if not round(rec.min_limit_w * 1000) <= limit <= round(rec.max_limit_w * 1000):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    if os.geteuid() != 0:
        raise NVMLError(NVML_ERROR_NO_PERMISSION)
    try:
        reader.request_limit(idx, limit / 1000.0)
    except PermissionError:
        raise NVMLError(NVML_ERROR_NO_PERMISSION) from None


def nvmlDeviceGetTotalEnergyConsumption(handle: Any) -> int:
    return int(_gpu(handle)[2].energy_j * 1000)


def nvmlDeviceGetUtilizationRates(handle: Any) -> Any:
    rec = _gpu(handle)[2]
    util = c_nvmlUtilization_t()
    util.gpu = round(rec.util_gpu_pct)
    util.memory = round(rec.util_mem_pct)
    return util


def nvmlDeviceGetMemoryInfo(handle: Any, version: int | None = None) -> Any:
    """v1 (no version): ``used`` includes the driver-reserved memory, as on real drivers;
    ``version=nvmlMemory_v2``: ``reserved`` apart and ``used`` without it (what DCGM's FB_USED shows)."""
    rec = _gpu(handle)[2]
    total = rec.mem_total_bytes
    reserved = min(RESERVED_BYTES, total)
    app = min(rec.mem_used_bytes, total - reserved)
    if not version:
        mem = c_nvmlMemory_t()
        mem.total, mem.used = total, app + reserved
        mem.free = total - mem.used
        return mem
    if version != nvmlMemory_v2:
        raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    mem2 = c_nvmlMemory_v2_t()
    mem2.version = version
    mem2.total, mem2.reserved, mem2.used = total, reserved, app
    mem2.free = total - reserved - app
    return mem2


def _clock(rec: GpuNumbers, type: int, *, maximum: bool) -> int:
    if type in (NVML_CLOCK_SM, NVML_CLOCK_GRAPHICS):  # graphics and SM share a clock on H100
        return round(rec.clock_sm_max_mhz if maximum else rec.clock_sm_mhz)
    if type == NVML_CLOCK_MEM:
        return round(rec.clock_mem_max_mhz if maximum else rec.clock_mem_mhz)
    raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # video clock: not simulated


def nvmlDeviceGetClockInfo(handle: Any, type: int) -> int:
    return _clock(_gpu(handle)[2], type, maximum=False)


def nvmlDeviceGetMaxClockInfo(handle: Any, type: int) -> int:
    return _clock(_gpu(handle)[2], type, maximum=True)


def nvmlDeviceGetCurrentClocksEventReasons(handle: Any) -> int:
    return int(_gpu(handle)[2].clocks_event_reasons)


def nvmlDeviceGetCurrentClocksThrottleReasons(handle: Any) -> int:
    return int(_gpu(handle)[2].clocks_event_reasons)


def nvmlDeviceGetTotalEccErrors(handle: Any, errorType: int, counterType: int) -> int:
    rec = _gpu(handle)[2]
    # The sim's counters run since the pod started: volatile (since driver load) and aggregate
    # (lifetime) are the same thing here.
    if counterType not in (NVML_VOLATILE_ECC, NVML_AGGREGATE_ECC):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    if errorType == NVML_MEMORY_ERROR_TYPE_CORRECTED:
        return int(rec.ecc_corrected)
    if errorType == NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
        return int(rec.ecc_uncorrected)
    raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


def _memory_temp_c(rec: GpuNumbers) -> int:
    # HBM sits beside the die under the same cold plate: a few degrees above it, more under
    # memory-bound load (H100 boards read ~2-8 C over GPU_TEMP in service).
    return round(rec.temp_c + 2.0 + 0.06 * rec.util_mem_pct)


def _remapped_rows(rec: GpuNumbers) -> tuple[int, int, int, int]:
    """(correctable, uncorrectable, pending, failure) as nvmlDeviceGetRemappedRows: on HBM GPUs an
    uncorrectable error remaps its row, active after the next GPU reset (the sim never resets)."""
    unc = min(int(rec.ecc_uncorrected), REMAP_ROWS_MAX)
    return 0, unc, 1 if unc else 0, 1 if rec.ecc_uncorrected > REMAP_ROWS_MAX else 0


def nvmlDeviceGetRemappedRows(device: Any) -> tuple[int, int, int, int]:
    return _remapped_rows(_gpu(device)[2])


def nvmlDeviceGetPcieReplayCounter(handle: Any) -> int:
    _gpu(handle)
    return 0  # the sim's PCIe links never retry


def nvmlDeviceGetEncoderUtilization(handle: Any) -> list[int]:
    _gpu(handle)
    return [0, _CODEC_SAMPLE_US]  # training pods do not use NVENC


def nvmlDeviceGetDecoderUtilization(handle: Any) -> list[int]:
    _gpu(handle)
    return [0, _CODEC_SAMPLE_US]


def _field_values(rec: GpuNumbers) -> dict[int, int]:
    """Every field this fake serves, from one record (computed once per call, as NVML answers
    a whole field list in one driver round trip)."""
    cor, unc, pending, failure = _remapped_rows(rec)
    return {
        NVML_FI_DEV_MEMORY_TEMP: _memory_temp_c(rec),
        NVML_FI_DEV_POWER_INSTANT: round(rec.power_w * 1000),  # mW, this tick
        NVML_FI_DEV_PCIE_REPLAY_COUNTER: 0,
        NVML_FI_DEV_REMAPPED_COR: cor,
        NVML_FI_DEV_REMAPPED_UNC: unc,
        NVML_FI_DEV_REMAPPED_PENDING: pending,
        NVML_FI_DEV_REMAPPED_FAILURE: failure,
    }


_SMOOTHING_FIELDS = (NVML_FI_PWR_SMOOTHING_ENABLED, 300)  # 251..300: NVML_FI_PWR_SMOOTHING_*


def nvmlDeviceGetFieldValues(handle: Any, fieldIds: list[Any]) -> Any:
    """pynvml's array of ``c_nvmlFieldValue_t``; a field this fake does not simulate answers
    ``nvmlReturn = NVML_ERROR_NOT_SUPPORTED`` in its own entry (the call itself succeeds), as
    real NVML does for a field the board lacks."""
    reader, idx, rec = _gpu(handle)
    served = _field_values(rec)
    values = (c_nvmlFieldValue_t * len(fieldIds))()
    now_us = int(time.time() * 1e6)
    for i, field_id in enumerate(fieldIds):
        entry = values[i]
        try:
            entry.fieldId, entry.scopeId = field_id
        except TypeError:
            entry.fieldId = field_id
        entry.timestamp = now_us
        entry.latencyUsec = 0
        fid = int(entry.fieldId)
        if _SMOOTHING_FIELDS[0] <= fid <= _SMOOTHING_FIELDS[1]:
            smooth = _smoothing_field(reader, idx, rec, fid, int(entry.scopeId))
            if smooth is None:
                entry.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
                continue
            entry.nvmlReturn = 0
            entry.valueType = NVML_VALUE_TYPE_DOUBLE
            entry.value.dVal = smooth
            continue
        value = served.get(fid)
        if value is None:
            entry.nvmlReturn = NVML_ERROR_NOT_SUPPORTED
            continue
        entry.nvmlReturn = 0
        entry.valueType = NVML_VALUE_TYPE_UNSIGNED_INT
        entry.value.uiVal = value
    return values


# -- events ----------------------------------------------------------------------------------
@dataclass
class _EventSet:
    cursor: int  # position in the shm XID ring; only events after creation are delivered
    masks: dict[int, int] = field(default_factory=dict)  # GPU index -> registered event types


_event_sets: dict[int, _EventSet] = {}
_next_eventset = 0


def _eventset(eventSet: Any) -> _EventSet:
    try:
        addr = ctypes.cast(eventSet, ctypes.c_void_p).value or 0
    except (TypeError, ctypes.ArgumentError):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT) from None
    es = _event_sets.get(addr)
    if es is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return es


def nvmlEventSetCreate() -> Any:
    global _next_eventset  # noqa: PLW0603
    reader = _lib()
    with _lock:
        _next_eventset += 1
        addr = _EVENTSET_BASE + _next_eventset
        _event_sets[addr] = _EventSet(cursor=reader.xid_count())
    return ctypes.cast(ctypes.c_void_p(addr), c_nvmlEventSet_t)


def nvmlDeviceRegisterEvents(handle: Any, eventTypes: int, eventSet: Any) -> None:
    _, idx, _ = _gpu(handle)
    es = _eventset(eventSet)
    if eventTypes & ~_SUPPORTED_EVENTS:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    es.masks[idx] = es.masks.get(idx, 0) | eventTypes


def nvmlDeviceGetSupportedEventTypes(handle: Any) -> int:
    _gpu(handle)
    return _SUPPORTED_EVENTS


def nvmlEventSetWait_v2(eventSet: Any, timeoutms: int) -> Any:
    reader = _lib()
    es = _eventset(eventSet)
    deadline = time.monotonic() + max(0, timeoutms) / 1000.0
    while True:
        events, cursor = reader.xid_events(es.cursor)
        for n, (_seq, gpu, xid) in enumerate(events):
            if gpu in _local and es.masks.get(gpu, 0) & nvmlEventTypeXidCriticalError:
                es.cursor = cursor - len(events) + n + 1
                data = c_nvmlEventData_t()
                data.device = _handles[_local[gpu]]
                data.eventType = nvmlEventTypeXidCriticalError
                data.eventData = xid
                data.gpuInstanceId = _NO_INSTANCE
                data.computeInstanceId = _NO_INSTANCE
                return data
        es.cursor = cursor
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        time.sleep(min(_EVENT_POLL_S, remaining))
        _lib()  # the pod may have gone while we waited


def nvmlEventSetWait(eventSet: Any, timeoutms: int) -> Any:
    return nvmlEventSetWait_v2(eventSet, timeoutms)


def nvmlEventSetFree(eventSet: Any) -> None:
    _lib()
    addr = ctypes.cast(eventSet, ctypes.c_void_p).value or 0
    if _event_sets.pop(addr, None) is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


# ---------------------------------------------------------------- power smoothing, workload profiles
# Power smoothing: Blackwell-class GPUs (GB200/GB300; hwsim GpuSpec.power_smoothing), root only;
# H100-class answers NOT_SUPPORTED after the usual checks (initialised, a present GPU). A call is
# validated here (INVALID_ARGUMENT as NVML) and queued in the GPU's request slot; the physics
# applies it at its next tick (hwsim.physics.Physics.smoothing_request), and the field values
# (NVML_FI_PWR_SMOOTHING_*) read back what it applied. Workload power profiles: see below.
def _smoothing_gpu(handle: Any) -> tuple[NvmlShmReader, int]:
    reader, idx, _ = _gpu(handle)
    if not reader.smoothing(idx).supported:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if os.geteuid() != 0:
        raise NVMLError(NVML_ERROR_NO_PERMISSION)
    return reader, idx


SMOOTHING_TAKE_TIMEOUT_S = 2.0  # a live pod's physics takes a request within one tick


def _smoothing_request(handle: Any, op: int, profile: int, param: int, value: float) -> None:
    """Queue one call in the GPU's request slot, once the physics took the one before (calls in a
    row must not overwrite each other); NVML_ERROR_TIMEOUT if the pod is not ticking."""
    reader, idx = _smoothing_gpu(handle)
    _queue(reader, idx, op, profile, param, value)


def _queue(reader: NvmlShmReader, idx: int, op: int, profile: int, param: int, value: float) -> None:
    pending = reader.smoothing_request_seq(idx)
    deadline = time.monotonic() + SMOOTHING_TAKE_TIMEOUT_S
    while reader.smoothing(idx).taken < pending:
        if time.monotonic() > deadline:
            raise NVMLError(NVML_ERROR_TIMEOUT)
        time.sleep(0.001)
    try:
        reader.request_smoothing(idx, op, profile, param, value)
    except PermissionError:
        raise NVMLError(NVML_ERROR_NO_PERMISSION) from None


# Each preset parameter's accepted range (PERCENT_TMP_FLOOR %, RAMP_UP/DOWN W/s, HYSTERESIS ms,
# then secondary floor W and the floor window parameters).
_PARAM_RANGES = ((0.0, 100.0), (1.0, 1e7), (1.0, 1e7), (0.0, 60000.0)) + ((0.0, 1e7),) * 4


def _profile_args(profile: Any) -> tuple[int, int, float]:
    version = int(getattr(profile, "version", 0))
    if version != _pynvml.nvmlPowerSmoothingProfile_v1:
        raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    pid, param, value = int(profile.profileId), int(profile.paramId), float(profile.value)
    if not 0 <= pid < SMOOTHING_PROFILES:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return pid, param, value


def nvmlDevicePowerSmoothingSetState(device: Any, state: Any) -> None:
    if int(getattr(state, "version", 0)) != _pynvml.nvmlPowerSmoothingState_v1:
        _gpu(device)
        raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    on = int(state.state)
    if on not in (0, 1):
        _gpu(device)
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    _smoothing_request(device, SMOOTH_OP_SET_STATE, 0, 0, float(on))


def nvmlDevicePowerSmoothingActivatePresetProfile(device: Any, profile: Any) -> None:
    _gpu(device)
    pid, _, _ = _profile_args(profile)
    _smoothing_request(device, SMOOTH_OP_ACTIVATE, pid, 0, 0.0)


def nvmlDevicePowerSmoothingUpdatePresetProfileParam(device: Any, profile: Any) -> None:
    _gpu(device)
    pid, param, value = _profile_args(profile)
    if not 0 <= param < SMOOTHING_PARAMS or not math.isfinite(value):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    lo, hi = _PARAM_RANGES[param]
    if not lo <= value <= hi:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    _smoothing_request(device, SMOOTH_OP_UPDATE_PARAM, pid, param, value)


def _smoothing_field(reader: NvmlShmReader, idx: int, rec: GpuNumbers, fid: int, scope: int) -> float | None:
    """A NVML_FI_PWR_SMOOTHING_* value (None: not served; every one on a GPU without smoothing)."""
    sm = reader.smoothing(idx)
    if not sm.supported:
        return None
    floor_w = sm.floor_pct / 100.0 * rec.default_limit_w
    preset = sm.presets[scope] if 0 <= scope < SMOOTHING_PROFILES else None
    per_profile = {
        NVML_FI_PWR_SMOOTHING_PROFILE_PERCENT_TMP_FLOOR: 0,
        NVML_FI_PWR_SMOOTHING_PROFILE_RAMP_UP_RATE: 1,  # mW/s
        NVML_FI_PWR_SMOOTHING_PROFILE_RAMP_DOWN_RATE: 2,  # mW/s
        NVML_FI_PWR_SMOOTHING_PROFILE_RAMP_DOWN_HYST_VAL: 3,
        NVML_FI_PWR_SMOOTHING_PROFILE_SECONDARY_POWER_FLOOR: 4,
    }
    if fid in per_profile:
        if preset is None:
            return None
        v = preset[per_profile[fid]]
        return v * 1000.0 if per_profile[fid] in (1, 2) else v
    values = {
        NVML_FI_PWR_SMOOTHING_ENABLED: float(sm.enabled),
        NVML_FI_PWR_SMOOTHING_PRIV_LVL: 2.0,  # root
        NVML_FI_PWR_SMOOTHING_IMM_RAMP_DOWN_ENABLED: 0.0,
        NVML_FI_PWR_SMOOTHING_APPLIED_TMP_CEIL: rec.enforced_limit_w,
        NVML_FI_PWR_SMOOTHING_APPLIED_TMP_FLOOR: floor_w if sm.enabled else 0.0,
        NVML_FI_PWR_SMOOTHING_MAX_PERCENT_TMP_FLOOR_SETTING: 100.0,
        NVML_FI_PWR_SMOOTHING_MIN_PERCENT_TMP_FLOOR_SETTING: 0.0,
        NVML_FI_PWR_SMOOTHING_HW_CIRCUITRY_PERCENT_LIFETIME_REMAINING: sm.lifetime_pct,
        NVML_FI_PWR_SMOOTHING_MAX_NUM_PRESET_PROFILES: float(SMOOTHING_PROFILES),
        NVML_FI_PWR_SMOOTHING_ACTIVE_PRESET_PROFILE: float(sm.profile),
        NVML_FI_PWR_SMOOTHING_PRIMARY_POWER_FLOOR: floor_w if sm.enabled else 0.0,
    }
    return values.get(fid)


def podagentSetFillerFloor(handle: Any, watts: float) -> None:
    """Not NVML: the node's filler backend (agent/drivers/nvml.py ``set_filler_floor``). Keeps the
    GPU's draw at ``watts`` or more with work that adds no progress (0: off); any GPU model, no
    root (a filler is an ordinary CUDA process). Applied at the physics' next tick."""
    reader, idx, _ = _gpu(handle)
    if os.environ.get(ENV_FILLER, "1") == "0":
        # A host without a burn kernel (every real GPU host today), as a shim would say it.
        raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
    if not math.isfinite(watts) or watts < 0.0:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    try:
        _queue(reader, idx, SMOOTH_OP_FILLER_FLOOR, 0, 0, float(watts))
    except PermissionError:
        raise NVMLError(NVML_ERROR_NO_PERMISSION) from None


def _not_supported(handle: Any) -> None:
    _gpu(handle)
    raise NVMLError(NVML_ERROR_NOT_SUPPORTED)


# Workload power profiles: Blackwell-class GPUs (as power smoothing), root for the sets. A request
# mask (c_nvmlMask255_t) naming a profile outside 0..24 is INVALID_ARGUMENT. GetCurrentProfiles
# reads back what the physics took (requested = enforced; perf = every profile the fake knows).
# GetProfilesInfo and UpdateProfiles are not simulated (NOT_SUPPORTED).
_WORKLOAD_PROFILES = 25  # NVML_POWER_PROFILE_MAX


def _mask_of(requested: Any) -> int:
    if int(getattr(requested, "version", 0)) != _pynvml.nvmlWorkloadPowerProfileRequestedProfiles_v1:
        raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    words = [int(w) for w in requested.requestedProfilesMask.mask]
    mask = sum(w << (32 * i) for i, w in enumerate(words))
    if mask >> _WORKLOAD_PROFILES:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return mask


def nvmlDeviceWorkloadPowerProfileGetProfilesInfo(device: Any, profilesInfo: Any) -> None:
    _not_supported(device)


def nvmlDeviceWorkloadPowerProfileGetCurrentProfiles(device: Any, currentProfiles: Any) -> None:
    reader, idx, _ = _gpu(device)
    sm = reader.smoothing(idx)
    if not sm.supported:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    if int(getattr(currentProfiles, "version", 0)) != _pynvml.nvmlWorkloadPowerProfileCurrentProfiles_v1:
        raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    for field_name, mask in (
        ("perfProfilesMask", (1 << _WORKLOAD_PROFILES) - 1),
        ("requestedProfilesMask", sm.workload_mask),
        ("enforcedProfilesMask", sm.workload_mask),
    ):
        target = getattr(currentProfiles, field_name).mask
        for i in range(len(target)):
            target[i] = (mask >> (32 * i)) & 0xFFFFFFFF


def nvmlDeviceWorkloadPowerProfileSetRequestedProfiles(device: Any, requestedProfiles: Any) -> None:
    _smoothing_gpu(device)  # NOT_SUPPORTED (H100) and NO_PERMISSION before the argument checks
    mask = _mask_of(requestedProfiles)
    _smoothing_request(device, SMOOTH_OP_WORKLOAD_SET, 0, 0, float(mask))


def nvmlDeviceWorkloadPowerProfileClearRequestedProfiles(device: Any, requestedProfiles: Any) -> None:
    _smoothing_gpu(device)  # NOT_SUPPORTED (H100) and NO_PERMISSION before the argument checks
    mask = _mask_of(requestedProfiles)
    _smoothing_request(device, SMOOTH_OP_WORKLOAD_CLEAR, 0, 0, float(mask))


def nvmlDeviceWorkloadPowerProfileUpdateProfiles_v1(device: Any, updateProfiles: Any) -> None:
    _not_supported(device)
