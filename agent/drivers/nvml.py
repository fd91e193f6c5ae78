"""NVML driver: every GPU of this host, through NVIDIA's pynvml or the hwsim drop-in fake.

The same code runs against both: the module comes from ``importlib`` (``pynvml``, or ``hwsim.nvml``
plus ``set_state_path``) and is never asked which one it is. NVML calls block (a real
``nvmlDeviceGetPowerUsage`` can take milliseconds), so they run in ONE worker thread per driver,
one thread hop per poll (or per power-limit set), never on the event loop.

Errors are per call: a failed call yields its metrics as ERROR readings carrying the NVML error
name and counts in that GPU's ``nvml_errors_total``; NOT_SUPPORTED ("not present here", e.g. ECC on
a board without it) is tried once and then skipped, never an error. A lost GPU
(NVML_ERROR_GPU_IS_LOST) reports ``lost`` = 1 and ERROR readings while the others keep polling.
XID events are drained from an NVML event set at each poll (timeout 0 ms: they queue in the driver
meanwhile), counted per GPU and offered to an optional ``event_sink``.

open() and poll() only read: nothing is written to a GPU except by ``set_power_limit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import structlog

from agent.config_base import NvmlDevice
from agent.drivers.base import DeviceError, DeviceUnavailable, DriverError, EventSink, register
from agent.drivers.smoothing import (
    NO_FILLER_BACKEND,
    NOT_SUPPORTED,
    SETTLE_S,
    SMOOTHING_PRESET,
    WORKLOAD_PROFILES,
    GpuSettingsAsk,
    GpuSettingsOutcome,
    SmoothingReadback,
    SmoothingSettings,
)
from agent.drivers.values import untrusted
from agent.model import DeviceEvent, Quality, Reading, unit_of

log = structlog.get_logger(__name__)

# NVML clock-event reason bits (nvml.h nvmlClocksEventReason*; same values as the older
# nvmlClocksThrottleReason* names), one metric each.
_THROTTLE_BITS = (
    ("throttle_gpu_idle", "nvmlClocksEventReasonGpuIdle"),
    ("throttle_sw_power_cap", "nvmlClocksEventReasonSwPowerCap"),
    ("throttle_hw_slowdown", "nvmlClocksEventReasonHwSlowdown"),
    ("throttle_sw_thermal", "nvmlClocksEventReasonSwThermalSlowdown"),
    ("throttle_hw_thermal", "nvmlClocksEventReasonHwThermalSlowdown"),
    ("throttle_hw_power_brake", "nvmlClocksEventReasonHwPowerBrakeSlowdown"),
)
# Errors that mean the library or the driver is gone as a whole, not one GPU or one call.
_LIBRARY_GONE = (
    "NVML_ERROR_UNINITIALIZED",
    "NVML_ERROR_DRIVER_NOT_LOADED",
    "NVML_ERROR_LIBRARY_NOT_FOUND",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
)
_XID_DRAIN_MAX = 256  # events taken per poll at most (a storm must not stall the poll)

Extract = Callable[[Any], float]
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Call:
    """One NVML call per GPU and the metrics it yields (metric, value from the call's result)."""

    key: str
    fetch: Callable[[ModuleType, Any], Any]
    outputs: tuple[tuple[str, Extract], ...]
    # Changes rarely or never (thresholds, constraints, ECC): read every slow_metrics_every polls.
    slow: bool = False


def _w(mw: Any) -> float:
    return float(mw) / 1000.0


def _calls(lib: ModuleType) -> tuple[_Call, ...]:
    """The metric table (units: NVML mW -> W, mJ stays mJ, C, bytes, MHz, %)."""
    thr = lib.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN, lib.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN
    gpu_max = lib.NVML_TEMPERATURE_THRESHOLD_GPU_MAX
    bits = [(metric, int(getattr(lib, const))) for metric, const in _THROTTLE_BITS]
    ecc = lib.NVML_MEMORY_ERROR_TYPE_CORRECTED, lib.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    # Volatile ECC counts (since the driver loaded) behave like a Prometheus counter: they only
    # reset when the driver reloads; aggregate ones persist in the InfoROM across reboots.
    vol = lib.NVML_VOLATILE_ECC

    def bit(mask: int) -> Extract:
        return lambda v: 1.0 if int(v) & mask else 0.0

    return (
        _Call(
            "temp", lambda m, h: m.nvmlDeviceGetTemperature(h, m.NVML_TEMPERATURE_GPU), (("temp_c", float),)
        ),
        _Call("power", lambda m, h: m.nvmlDeviceGetPowerUsage(h), (("power_w", _w),)),
        _Call("limit", lambda m, h: m.nvmlDeviceGetPowerManagementLimit(h), (("power_limit_w", _w),)),
        _Call(
            "enforced", lambda m, h: m.nvmlDeviceGetEnforcedPowerLimit(h), (("enforced_power_limit_w", _w),)
        ),
        _Call(
            "default",
            lambda m, h: m.nvmlDeviceGetPowerManagementDefaultLimit(h),
            (("default_power_limit_w", _w),),
            slow=True,
        ),
        _Call(
            "constraints",
            lambda m, h: m.nvmlDeviceGetPowerManagementLimitConstraints(h),
            (("min_power_limit_w", lambda v: _w(v[0])), ("max_power_limit_w", lambda v: _w(v[1]))),
            slow=True,
        ),
        _Call("energy", lambda m, h: m.nvmlDeviceGetTotalEnergyConsumption(h), (("energy_mj", float),)),
        _Call(
            "util",
            lambda m, h: m.nvmlDeviceGetUtilizationRates(h),
            (("util_gpu_pct", lambda v: float(v.gpu)), ("util_mem_pct", lambda v: float(v.memory))),
        ),
        _Call(
            "memory",
            _memory_info,
            (
                ("mem_used_bytes", lambda v: float(v.used)),
                ("mem_free_bytes", lambda v: float(v.free)),
                ("mem_total_bytes", lambda v: float(v.total)),
            ),
        ),
        _Call(
            "mem_reserved",
            lambda m, h: m.nvmlDeviceGetMemoryInfo(h, version=m.nvmlMemory_v2),
            (("mem_reserved_bytes", lambda v: float(v.reserved)),),
            slow=True,
        ),
        # One nvmlDeviceGetFieldValues for every per-GPU field (bench/nvml_cost.py: one call for
        # two fields costs less than two calls): the HBM temperature and the instantaneous
        # power (nvmlDeviceGetPowerUsage is a 1 s average on Ampere and later). An entry the board
        # lacks (NOT_SUPPORTED in its own entry) drops that metric only.
        _Call(
            "fields",
            lambda m, h: m.nvmlDeviceGetFieldValues(h, [getattr(m, f) for f in _FIELDS]),
            (
                ("mem_temp_c", _field(lib, 0)),
                ("power_instant_w", _milli(_field(lib, 1))),
                # Power smoothing read-back (Blackwell-class; NOT_SUPPORTED entries on H100).
                ("power_smoothing_enabled", _field(lib, 2)),
                ("power_smoothing_profile", _field(lib, 3)),
                ("power_smoothing_floor_w", _field(lib, 4)),
            ),
        ),
        _Call(
            "enc",
            lambda m, h: m.nvmlDeviceGetEncoderUtilization(h),
            (("util_enc_pct", lambda v: float(v[0])),),
        ),
        _Call(
            "dec",
            lambda m, h: m.nvmlDeviceGetDecoderUtilization(h),
            (("util_dec_pct", lambda v: float(v[0])),),
        ),
        _Call(
            "pcie_replay",
            lambda m, h: m.nvmlDeviceGetPcieReplayCounter(h),
            (("pcie_replay_total", float),),
            slow=True,
        ),
        _Call(
            "remapped_rows",
            lambda m, h: m.nvmlDeviceGetRemappedRows(h),
            (
                ("remapped_rows_correctable_total", lambda v: float(v[0])),
                ("remapped_rows_uncorrectable_total", lambda v: float(v[1])),
                ("row_remap_pending", lambda v: float(v[2])),
                ("row_remap_failure", lambda v: float(v[3])),
            ),
            slow=True,
        ),
        _Call(
            "clock_sm", lambda m, h: m.nvmlDeviceGetClockInfo(h, m.NVML_CLOCK_SM), (("clock_sm_mhz", float),)
        ),
        _Call(
            "clock_mem",
            lambda m, h: m.nvmlDeviceGetClockInfo(h, m.NVML_CLOCK_MEM),
            (("clock_mem_mhz", float),),
        ),
        _Call(
            "t_slow",
            lambda m, h: m.nvmlDeviceGetTemperatureThreshold(h, thr[0]),
            (("temp_slowdown_c", float),),
            slow=True,
        ),
        _Call(
            "t_shut",
            lambda m, h: m.nvmlDeviceGetTemperatureThreshold(h, thr[1]),
            (("temp_shutdown_c", float),),
            slow=True,
        ),
        _Call(
            "t_max",
            lambda m, h: m.nvmlDeviceGetTemperatureThreshold(h, gpu_max),
            (("temp_max_operating_c", float),),
            slow=True,
        ),
        _Call(
            "throttle",
            _clock_reasons,
            tuple((metric, bit(mask)) for metric, mask in bits),
        ),
        _Call(
            "ecc_corr",
            lambda m, h: m.nvmlDeviceGetTotalEccErrors(h, ecc[0], vol),
            (("ecc_corrected_total", float),),
            slow=True,
        ),
        _Call(
            "ecc_unc",
            lambda m, h: m.nvmlDeviceGetTotalEccErrors(h, ecc[1], vol),
            (("ecc_uncorrected_total", float),),
            slow=True,
        ),
    )


# The per-GPU field-values entries, in the order the "fields" call's outputs read them.
_FIELDS = (
    "NVML_FI_DEV_MEMORY_TEMP",
    "NVML_FI_DEV_POWER_INSTANT",
    "NVML_FI_PWR_SMOOTHING_ENABLED",
    "NVML_FI_PWR_SMOOTHING_ACTIVE_PRESET_PROFILE",
    "NVML_FI_PWR_SMOOTHING_APPLIED_TMP_FLOOR",
)


def _milli(extract: Extract) -> Extract:
    return lambda v: extract(v) / 1000.0


def _memory_info(lib: ModuleType, handle: Any) -> Any:
    # v2 (R510+) keeps driver-reserved memory out of ``used``, as DCGM's FB_USED does; a driver
    # without it answers FUNCTION_NOT_FOUND and v1's ``used`` includes the reserved part.
    try:
        return lib.nvmlDeviceGetMemoryInfo(handle, version=lib.nvmlMemory_v2)
    except lib.NVMLError as err:
        if err.value not in (lib.NVML_ERROR_FUNCTION_NOT_FOUND, lib.NVML_ERROR_NOT_SUPPORTED):
            raise
        return lib.nvmlDeviceGetMemoryInfo(handle)


class _FieldUnsupported(Exception):
    """A field-values entry the board does not have: skipped, not an error."""


def _field(lib: ModuleType, position: int) -> Extract:
    """The value of entry ``position`` of an nvmlDeviceGetFieldValues answer (each entry carries
    its own return code and value type)."""
    unsupported = int(lib.NVML_ERROR_NOT_SUPPORTED)
    members = {
        int(lib.NVML_VALUE_TYPE_DOUBLE): "dVal",
        int(lib.NVML_VALUE_TYPE_UNSIGNED_INT): "uiVal",
        int(lib.NVML_VALUE_TYPE_UNSIGNED_LONG): "ulVal",
        int(lib.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG): "ullVal",
        int(lib.NVML_VALUE_TYPE_SIGNED_LONG_LONG): "sllVal",
        int(lib.NVML_VALUE_TYPE_SIGNED_INT): "siVal",
        int(lib.NVML_VALUE_TYPE_UNSIGNED_SHORT): "usVal",
    }

    def extract(values: Any) -> float:
        entry = values[position]
        ret = int(entry.nvmlReturn)
        if ret == unsupported:
            raise _FieldUnsupported
        if ret != 0:
            raise ValueError(f"field {int(entry.fieldId)}: NVML error {ret}")
        member = members.get(int(entry.valueType))
        if member is None:
            raise ValueError(f"field {int(entry.fieldId)}: value type {int(entry.valueType)}")
        return float(getattr(entry.value, member))

    return extract


def _clock_reasons(lib: ModuleType, handle: Any) -> Any:
    # nvmlDeviceGetCurrentClocksEventReasons is the R535+ name; older drivers only have the
    # ...ThrottleReasons one (same bits).
    try:
        return lib.nvmlDeviceGetCurrentClocksEventReasons(handle)
    except lib.NVMLError as err:
        if err.value != lib.NVML_ERROR_FUNCTION_NOT_FOUND:
            raise
        return lib.nvmlDeviceGetCurrentClocksThrottleReasons(handle)


@dataclass
class _Gpu:
    index: int
    device: str
    handle: Any = None  # None until obtained (a GPU lost at open has none)
    handle_key: int | None = None  # the handle's pointer value, to match event data
    unsupported: set[str] = field(default_factory=set)
    unsupported_metrics: set[str] = field(default_factory=set)  # field-values entries it lacks
    errors_total: int = 0
    lost: bool = False
    xid_total: int = 0
    xid_last: int | None = None
    constraints_w: tuple[float, float, float] | None = None  # min, max, default
    info: dict[str, str] = field(default_factory=dict)  # uuid, name, pci_bus_id, serial (labels)
    last_error: str | None = None  # for logging state changes only


def _handle_key(handle: Any) -> int | None:
    """The pointer value of an NVML handle (pynvml's and the fake's are both ctypes pointers)."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return None


@register("nvml")
class NvmlDriver:
    """All GPUs of one host; device ids f"{cfg.gpu_prefix}{index}"."""

    def __init__(self, cfg: NvmlDevice, *, event_sink: EventSink | None = None) -> None:
        self.cfg = cfg
        self.device_id = cfg.id
        self._event_sink = event_sink
        self._lib: ModuleType | None = None
        self._calls: tuple[_Call, ...] = ()
        self._slow_metrics: frozenset[str] = frozenset()
        self._err_names: dict[int, str] = {}
        self._gpus: list[_Gpu] = []
        self._by_device: dict[str, _Gpu] = {}
        self._event_set: Any = None
        self._initialised = False
        self._executor: ThreadPoolExecutor | None = None
        self._act_executor: ThreadPoolExecutor | None = None  # power-limit sets (see set_power_limits)
        # Smoothing and filler sets: their own thread (a smoothing profile is several calls that may
        # each wait for the firmware/physics tick; a cap must not wait behind them).
        self._settings_executor: ThreadPoolExecutor | None = None
        self._stuck: asyncio.Future[Any] | None = None  # a call that outlived its timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self.driver_version: str | None = None
        self._polls = 0  # completed polls; slow calls are due when it is a multiple of N

    # -- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._executor is None:
            # One worker: NVML calls of this driver never overlap, and a stuck call holds one thread.
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nvml[{self.device_id}]")
        await self._run(self._open_sync)
        log.info(
            "nvml opened",
            device=self.device_id,
            library=self.cfg.library,
            driver_version=self.driver_version,
            gpus=len(self._gpus),
        )

    async def close(self) -> None:
        if self._executor is None:
            return
        with contextlib.suppress(DeviceUnavailable, DeviceError):
            await self._run(self._shutdown_sync)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        if self._act_executor is not None:
            self._act_executor.shutdown(wait=False, cancel_futures=True)
            self._act_executor = None
        if self._settings_executor is not None:
            self._settings_executor.shutdown(wait=False, cancel_futures=True)
            self._settings_executor = None

    async def poll(self) -> list[Reading]:
        return await self._run(self._poll_sync)

    # -- actuator ------------------------------------------------------------------------------
    def device_info(self) -> dict[str, dict[str, str]]:
        """Static attributes per GPU (uuid, name, pci_bus_id, serial) for labels and inventory."""
        version = {"driver_version": self.driver_version} if self.driver_version else {}
        return {g.device: {"index": str(g.index), **version, **g.info} for g in self._gpus if g.info}

    def gpu_ids(self) -> list[str]:
        return [g.device for g in self._gpus]

    def constraints(self, device: str) -> tuple[float, float, float]:
        """(min, max, default) power limit in W, as read at open (or the last poll that read them)."""
        gpu = self._gpu(device)
        if gpu.constraints_w is None:
            raise DeviceUnavailable(device, "power-limit constraints unknown (GPU not readable since open)")
        return gpu.constraints_w

    async def set_power_limit(self, device: str, watts: float) -> float:
        """Clamp to the GPU's constraints, set, read back; returns the management limit now in W."""
        gpu = self._gpu(device)
        if not math.isfinite(watts):
            raise ValueError(f"{device}: power limit {watts!r} W")
        lo, hi, _ = self.constraints(device)
        target = min(max(watts, lo), hi)
        return await self._run(lambda: self._set_limit_sync(gpu, target))

    def submit_power_limits(
        self, limits: Mapping[str, float]
    ) -> asyncio.Future[dict[str, float | DriverError]]:
        """Hand many sets to the actuation thread NOW (no await: the thread starts at once) and
        return a future of, per GPU, the read-back limit in W or the error. One actuation thread per
        driver, apart from the polling thread: NVML is thread-safe, and a cap must not wait behind a
        poll of every GPU."""
        if self._loop is None or not self._initialised:
            raise DeviceUnavailable(self.device_id, "not open")
        jobs: list[tuple[str, _Gpu | None, float]] = []
        for device, watts in limits.items():
            gpu = self._by_device.get(device)
            if gpu is None or not math.isfinite(watts):
                jobs.append((device, None, watts))
                continue
            lo, hi, _ = self.constraints(device)
            jobs.append((device, gpu, min(max(watts, lo), hi)))

        def work() -> dict[str, float | DriverError]:
            out: dict[str, float | DriverError] = {}
            for device, gpu, target in jobs:
                if gpu is None:
                    out[device] = DeviceError(device, f"no such GPU or bad limit {target!r}")
                    continue
                try:
                    out[device] = self._set_limit_sync(gpu, target)
                except DriverError as err:
                    out[device] = err
            return out

        if self._act_executor is None:
            self._act_executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"nvml-act[{self.device_id}]"
            )
        return self._loop.run_in_executor(self._act_executor, work)

    async def set_power_limits(self, limits: Mapping[str, float]) -> dict[str, float | DriverError]:
        async with asyncio.timeout(self.cfg.timeout_s):
            return await self.submit_power_limits(limits)

    # -- internals: the worker thread ----------------------------------------------------------
    async def _run(self, fn: Callable[[], _T]) -> _T:
        if self._executor is None or self._loop is None:
            raise DeviceUnavailable(self.device_id, "not open")
        if self._stuck is not None and not self._stuck.done():
            # A call that timed out still holds the worker thread (it cannot be cancelled):
            # fail fast instead of queueing behind it. Calls in time (a poll while a power-limit
            # set waits) simply queue: the single worker serialises them.
            raise DeviceUnavailable(self.device_id, "a previous NVML call is still stuck")
        fut = self._loop.run_in_executor(self._executor, fn)
        # If we stop waiting (timeout), the call still ends some day: retrieve its outcome then.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            async with asyncio.timeout(self.cfg.timeout_s):
                return await asyncio.shield(fut)
        except TimeoutError:
            self._stuck = fut
            raise DeviceUnavailable(self.device_id, f"NVML call took over {self.cfg.timeout_s} s") from None

    def _err_name(self, err: Any) -> str:
        value = getattr(err, "value", None)
        if isinstance(value, int):
            return self._err_names.get(value, f"NVML_ERROR_{value}")
        return type(err).__name__

    def _open_sync(self) -> None:
        try:
            lib = importlib.import_module("hwsim.nvml" if self.cfg.library == "hwsim" else "pynvml")
        except ImportError as err:
            raise DeviceUnavailable(self.device_id, f"cannot import the NVML binding: {err}") from err
        if self.cfg.library == "hwsim":
            lib.set_state_path(self.cfg.hwsim_state)
        self._lib = lib
        self._err_names = {}
        for name in dir(lib):
            if name.startswith("NVML_ERROR_"):
                self._err_names.setdefault(int(getattr(lib, name)), name)
        self._calls = _calls(lib)
        self._slow_metrics = frozenset(m for call in self._calls if call.slow for m, _ in call.outputs)
        self._init_sync()

    def _init_sync(self) -> None:
        lib = self._lib
        assert lib is not None
        try:
            lib.nvmlInit()
        except lib.NVMLError as err:
            name = self._err_name(err)
            if name == "NVML_ERROR_LIBRARY_NOT_FOUND":
                reason = (
                    "NVML library not found (no NVIDIA driver on this host)"
                    if self.cfg.library == "pynvml"
                    else "hwsim NVML fake has no state path"
                )
            elif name == "NVML_ERROR_DRIVER_NOT_LOADED":
                reason = (
                    "NVIDIA kernel driver not loaded"
                    if self.cfg.library == "pynvml"
                    else f"no running simulated pod at {self.cfg.hwsim_state}"
                )
            else:
                reason = f"nvmlInit failed: {name}"
            raise DeviceUnavailable(self.device_id, f"{reason} ({name})") from None
        self._initialised = True
        try:
            self.driver_version = str(lib.nvmlSystemGetDriverVersion())
            count = int(lib.nvmlDeviceGetCount())
        except lib.NVMLError as err:
            self._shutdown_sync()
            raise DeviceUnavailable(self.device_id, f"NVML: {self._err_name(err)}") from None
        old = {g.index: g for g in self._gpus}
        self._gpus = [old.get(i) or _Gpu(index=i, device=f"{self.cfg.gpu_prefix}{i}") for i in range(count)]
        self._by_device = {g.device: g for g in self._gpus}
        for gpu in self._gpus:
            gpu.handle = gpu.handle_key = None
            self._ensure_handle(gpu)
            if gpu.handle is not None:
                self._read_constraints(gpu)
        self._event_set = None
        if self.cfg.xid_events:
            self._setup_events()

    def _setup_events(self) -> None:
        lib = self._lib
        assert lib is not None
        try:
            self._event_set = lib.nvmlEventSetCreate()
        except lib.NVMLError as err:
            log.warning("nvml xid events unavailable", device=self.device_id, error=self._err_name(err))
            return
        for gpu in self._gpus:
            if gpu.handle is None:
                continue
            try:
                lib.nvmlDeviceRegisterEvents(gpu.handle, lib.nvmlEventTypeXidCriticalError, self._event_set)
            except lib.NVMLError as err:
                log.warning("nvml xid events not registered", device=gpu.device, error=self._err_name(err))

    def _ensure_handle(self, gpu: _Gpu) -> str | None:
        """Get the GPU's handle if we have none; returns the error name on failure."""
        if gpu.handle is not None:
            return None
        lib = self._lib
        assert lib is not None
        try:
            gpu.handle = lib.nvmlDeviceGetHandleByIndex(gpu.index)
        except lib.NVMLError as err:
            return self._err_name(err)
        gpu.handle_key = _handle_key(gpu.handle)
        return None

    def _read_constraints(self, gpu: _Gpu) -> None:
        lib = self._lib
        assert lib is not None
        try:
            lo, hi = lib.nvmlDeviceGetPowerManagementLimitConstraints(gpu.handle)
            default = lib.nvmlDeviceGetPowerManagementDefaultLimit(gpu.handle)
        except lib.NVMLError:
            return
        gpu.constraints_w = (_w(lo), _w(hi), _w(default))
        info: dict[str, str] = {}
        for key, call in (
            ("uuid", lib.nvmlDeviceGetUUID),
            ("name", lib.nvmlDeviceGetName),
            ("serial", lib.nvmlDeviceGetSerial),
            ("pci_bus_id", lambda h: lib.nvmlDeviceGetPciInfo(h).busId),
        ):
            try:
                value = call(gpu.handle)
            except lib.NVMLError:
                continue  # "not present here" (no serial on consumer boards) is not an error
            info[key] = value.decode() if isinstance(value, bytes) else str(value)
        gpu.info = info

    def _shutdown_sync(self) -> None:
        lib = self._lib
        if lib is None or not self._initialised:
            return
        self._initialised = False
        if self._event_set is not None:
            with contextlib.suppress(lib.NVMLError):
                lib.nvmlEventSetFree(self._event_set)
            self._event_set = None
        with contextlib.suppress(lib.NVMLError):
            lib.nvmlShutdown()

    def _poll_sync(self) -> list[Reading]:
        lib = self._lib
        assert lib is not None
        if not self._initialised:
            # The library went away earlier (driver reload, simulated pod restarted): start over.
            self._init_sync()  # (the poller logs the device's return)
        try:
            lib.nvmlDeviceGetCount()
        except lib.NVMLError as err:
            name = self._err_name(err)
            if name in _LIBRARY_GONE:
                self._shutdown_sync()  # (the poller logs the device's loss, with this reason)
            raise DeviceUnavailable(self.device_id, f"NVML: {name}") from None
        if self._event_set is not None:
            self._drain_events()
        readings: list[Reading] = []
        slow_due = self._polls % self.cfg.slow_metrics_every == 0
        for gpu in self._gpus:
            readings.extend(self._poll_gpu(gpu, slow_due))
        self._polls += 1
        return readings

    def metric_every(self, metric: str) -> int:
        """Polls between two reads of ``metric`` (the poller stretches its staleness limit)."""
        return self.cfg.slow_metrics_every if metric in self._slow_metrics else 1

    def _poll_gpu(self, gpu: _Gpu, slow_due: bool = True) -> list[Reading]:
        lib = self._lib
        assert lib is not None
        ts_mono, ts_wall = time.monotonic(), time.time()
        out: list[Reading] = []
        dev = gpu.device

        def good(metric: str, value: float) -> None:
            if not math.isfinite(value):  # a NaN/Inf from a fake or a broken binding: not a value
                bad(metric, untrusted(value) or "not a finite number")
                return
            out.append(Reading(dev, metric, value, unit_of(metric), ts_mono, ts_wall))

        def bad(metric: str, error: str) -> None:
            out.append(Reading(dev, metric, None, unit_of(metric), ts_mono, ts_wall, Quality.ERROR, error))

        failure = self._ensure_handle(gpu)
        lost = failure == "NVML_ERROR_GPU_IS_LOST"
        # A GPU coming back from an error gets everything re-read at once, not within N polls.
        slow_due = slow_due or gpu.lost or gpu.last_error is not None
        if failure is not None:
            gpu.errors_total += 1
        for call in self._calls:
            if call.key in gpu.unsupported:
                continue
            if call.slow and not slow_due and failure is None:
                continue
            if failure is not None:
                # No handle, or the GPU fell off the bus: every further call would fail the same way
                # (and on real hardware slowly), so report them without calling.
                for metric, _ in call.outputs:
                    bad(metric, failure)
                continue
            try:
                result = call.fetch(lib, gpu.handle)
            except lib.NVMLError as err:
                name = self._err_name(err)
                if name in ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND"):
                    # Not present on this board, or not in this driver: not an error.
                    gpu.unsupported.add(call.key)
                    continue
                gpu.errors_total += 1
                if name == "NVML_ERROR_GPU_IS_LOST":
                    lost = True
                    failure = name
                for metric, _ in call.outputs:
                    bad(metric, name)
                if gpu.last_error != name:
                    log.warning("nvml call failed", device=dev, call=call.key, error=name)
                    gpu.last_error = name
                continue
            for metric, extract in call.outputs:
                if metric in gpu.unsupported_metrics:
                    continue
                try:
                    good(metric, extract(result))
                except _FieldUnsupported:
                    gpu.unsupported_metrics.add(metric)
                    if all(m in gpu.unsupported_metrics for m, _ in call.outputs):
                        gpu.unsupported.add(call.key)
                except (TypeError, ValueError, IndexError, AttributeError) as err:
                    bad(metric, f"bad NVML result: {err}")
            if call.key in {"constraints", "default"}:
                self._refresh_constraints(gpu, call.key, result)
        if lost != gpu.lost:
            log.warning("gpu lost" if lost else "gpu back", device=dev)
            gpu.lost = lost
        if (
            failure is None
            and gpu.last_error is not None
            and not any(r.quality is Quality.ERROR for r in out)
        ):
            log.info("nvml calls recovered", device=dev)
            gpu.last_error = None
        good("lost", 1.0 if lost else 0.0)
        good("nvml_errors_total", float(gpu.errors_total))
        if self._event_set is not None:
            good("xid_total", float(gpu.xid_total))
            # dcgm-exporter's XID_ERRORS: the last XID, 0 while there has been none.
            good("xid_last", float(gpu.xid_last or 0))
        return out

    def _refresh_constraints(self, gpu: _Gpu, key: str, result: Any) -> None:
        try:
            if key == "constraints":
                default = gpu.constraints_w[2] if gpu.constraints_w else _w(result[1])
                gpu.constraints_w = (_w(result[0]), _w(result[1]), default)
            elif gpu.constraints_w is not None:
                gpu.constraints_w = (gpu.constraints_w[0], gpu.constraints_w[1], _w(result))
        except (TypeError, IndexError):
            pass

    def _drain_events(self) -> None:
        lib = self._lib
        assert lib is not None
        xid_type = int(lib.nvmlEventTypeXidCriticalError)
        for _ in range(_XID_DRAIN_MAX):
            try:
                data = lib.nvmlEventSetWait_v2(self._event_set, 0)
            except lib.NVMLError as err:
                name = self._err_name(err)
                if name != "NVML_ERROR_TIMEOUT":
                    log.warning("nvml event wait failed", device=self.device_id, error=name)
                return
            if not int(data.eventType) & xid_type:
                continue
            gpu = self._gpu_of_event(data.device)
            if gpu is None:
                continue
            xid = int(data.eventData)
            gpu.xid_total += 1
            gpu.xid_last = xid
            log.warning("gpu xid", device=gpu.device, xid=xid)
            if self._event_sink is not None and self._loop is not None:
                event = DeviceEvent(device=gpu.device, kind="xid", detail={"xid": xid, "gpu": gpu.index})
                self._loop.call_soon_threadsafe(self._event_sink, event)

    def _gpu_of_event(self, handle: Any) -> _Gpu | None:
        lib = self._lib
        assert lib is not None
        try:
            index = int(lib.nvmlDeviceGetIndex(handle))
        except lib.NVMLError:
            # The GPU may be lost (XID 79 "fell off the bus"): match the handle's pointer instead.
            key = _handle_key(handle)
            return next((g for g in self._gpus if key is not None and g.handle_key == key), None)
        return self._gpus[index] if 0 <= index < len(self._gpus) else None

    def _set_limit_sync(self, gpu: _Gpu, watts: float) -> float:
        lib = self._lib
        assert lib is not None
        failure = self._ensure_handle(gpu)
        if failure is not None:
            raise DeviceUnavailable(gpu.device, f"no NVML handle: {failure}")
        try:
            lib.nvmlDeviceSetPowerManagementLimit(gpu.handle, round(watts * 1000))
            now_mw = lib.nvmlDeviceGetPowerManagementLimit(gpu.handle)
        except lib.NVMLError as err:
            name = self._err_name(err)
            gpu.errors_total += 1
            cls = DeviceUnavailable if name in (*_LIBRARY_GONE, "NVML_ERROR_GPU_IS_LOST") else DeviceError
            raise cls(gpu.device, f"set power limit {watts:.0f} W: {name}") from None
        log.info("gpu power limit set", device=gpu.device, requested_w=watts, now_w=_w(now_mw))
        return _w(now_mw)

    async def set_power_smoothing(
        self, device: str, settings: SmoothingSettings | None, *, preset: int = SMOOTHING_PRESET
    ) -> SmoothingReadback:
        """NVIDIA power smoothing (Blackwell-class, root): write ``preset``'s floor (% of TMP),
        ramp rates (W/s) and hysteresis (ms), activate it and switch smoothing on; ``None``
        switches it off. Returns what the GPU reads back (NVML_FI_PWR_SMOOTHING_*), once it agrees
        with the request or after ``SETTLE_S``. DeviceError ``NVML_ERROR_NOT_SUPPORTED`` on a GPU
        without it (H100)."""
        gpu = self._gpu(device)
        if settings is not None and not settings.valid():
            raise ValueError(f"{device}: power smoothing values {settings!r}")
        return await self._run_settings(lambda: self._set_smoothing_sync(gpu, settings, preset))

    async def set_filler_floor(self, device: str, watts: float) -> float:
        """The software fallback's filler floor (W; 0: off): low-priority work that keeps the GPU's
        draw up while the job communicates. NVML has no such call: it is the library's
        ``podagentSetFillerFloor`` where one is provided (hwsim's fake); elsewhere DeviceError
        ``no filler backend`` (a real node needs a burn kernel, not shipped). Returns the floor
        now in force (the backend's answer: a filler is this host's own process)."""
        gpu = self._gpu(device)
        if not math.isfinite(watts) or watts < 0.0:
            raise ValueError(f"{device}: filler floor {watts!r} W")
        return await self._run_settings(lambda: self._set_filler_sync(gpu, watts))

    async def set_gpu_settings(self, asks: Mapping[str, GpuSettingsAsk]) -> dict[str, GpuSettingsOutcome]:
        """Each GPU's smoothing and filler floor as asked, GPUs in parallel (each set may wait for
        the firmware's tick); per GPU what was read back or why not. Never raises for one GPU."""

        async def one(device: str, ask: GpuSettingsAsk) -> GpuSettingsOutcome:
            smoothing: SmoothingReadback | None = None
            s_err: str | None = None
            f_err: str | None = None
            filler: float | None = None
            if ask.set_smoothing:
                try:
                    smoothing = await self.set_power_smoothing(device, ask.smoothing)
                except (DriverError, ValueError) as err:
                    s_err = err.reason if isinstance(err, DriverError) else str(err)
            if ask.filler_w is not None:
                try:
                    filler = await self.set_filler_floor(device, ask.filler_w)
                except (DriverError, ValueError) as err:
                    f_err = err.reason if isinstance(err, DriverError) else str(err)
            workload: str | None = None
            w_err: str | None = None
            if ask.set_workload:
                try:
                    workload = await self.set_workload_profile(device, ask.workload_profile)
                except (DriverError, ValueError) as err:
                    w_err = err.reason if isinstance(err, DriverError) else str(err)
            unsupported = s_err is not None and NOT_SUPPORTED in s_err
            w_unsupported = w_err is not None and NOT_SUPPORTED in w_err
            return GpuSettingsOutcome(
                smoothing, s_err, unsupported, filler, f_err, workload, w_err, w_unsupported
            )

        devices = list(asks)
        results = await asyncio.gather(*(one(d, asks[d]) for d in devices))
        return dict(zip(devices, results, strict=True))

    async def set_workload_profile(self, device: str, profile: str | None) -> str:
        """Request one NVML workload power profile (``WORKLOAD_PROFILES``; Blackwell-class, root)
        in place of any requested before, or none (None). Returns the profile read back
        (nvmlDeviceWorkloadPowerProfileGetCurrentProfiles' requested mask; "" for none).
        DeviceError ``NVML_ERROR_NOT_SUPPORTED`` on a GPU without them (H100)."""
        gpu = self._gpu(device)
        if profile is not None and profile not in WORKLOAD_PROFILES:
            raise ValueError(f"{device}: unknown workload power profile {profile!r}")
        return await self._run_settings(lambda: self._set_workload_sync(gpu, profile))

    def _set_workload_sync(self, gpu: _Gpu, profile: str | None) -> str:
        lib = self._lib
        assert lib is not None
        failure = self._ensure_handle(gpu)
        if failure is not None:
            raise DeviceUnavailable(gpu.device, f"no NVML handle: {failure}")

        def request(mask: int) -> Any:
            req = lib.c_nvmlWorkloadPowerProfileRequestedProfiles_v1_t()
            req.version = lib.nvmlWorkloadPowerProfileRequestedProfiles_v1
            for i in range(len(req.requestedProfilesMask.mask)):
                req.requestedProfilesMask.mask[i] = (mask >> (32 * i)) & 0xFFFFFFFF
            return req

        want = 0 if profile is None else 1 << WORKLOAD_PROFILES.index(profile)
        try:
            lib.nvmlDeviceWorkloadPowerProfileClearRequestedProfiles(
                gpu.handle, request(((1 << len(WORKLOAD_PROFILES)) - 1) & ~want)
            )
            if want:
                lib.nvmlDeviceWorkloadPowerProfileSetRequestedProfiles(gpu.handle, request(want))
            deadline = time.monotonic() + SETTLE_S
            while True:  # a request takes effect at the firmware's (hwsim: the physics') next tick
                current = lib.c_nvmlWorkloadPowerProfileCurrentProfiles_v1_t()
                current.version = lib.nvmlWorkloadPowerProfileCurrentProfiles_v1
                lib.nvmlDeviceWorkloadPowerProfileGetCurrentProfiles(gpu.handle, current)
                words = current.requestedProfilesMask.mask
                got = sum(int(w) << (32 * i) for i, w in enumerate(words))
                if got == want or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        except lib.NVMLError as err:
            name = self._err_name(err)
            cls = DeviceUnavailable if name in (*_LIBRARY_GONE, "NVML_ERROR_GPU_IS_LOST") else DeviceError
            raise cls(gpu.device, f"workload power profile: {name}") from None
        names = [n for i, n in enumerate(WORKLOAD_PROFILES) if got >> i & 1]
        log.info("gpu workload power profile set", device=gpu.device, profile=profile, readback=names)
        return ",".join(names)

    async def _run_settings(self, fn: Callable[[], _T]) -> _T:
        if self._loop is None or not self._initialised:
            raise DeviceUnavailable(self.device_id, "not open")
        if self._settings_executor is None:
            self._settings_executor = ThreadPoolExecutor(
                max_workers=max(1, min(8, len(self._by_device))),  # GPUs in parallel (own slots)
                thread_name_prefix=f"nvml-set[{self.device_id}]",
            )
        fut = self._loop.run_in_executor(self._settings_executor, fn)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            async with asyncio.timeout(max(self.cfg.timeout_s, 4 * SETTLE_S)):
                return await asyncio.shield(fut)
        except TimeoutError:
            raise DeviceUnavailable(self.device_id, "NVML settings call timed out") from None

    def _set_smoothing_sync(
        self, gpu: _Gpu, settings: SmoothingSettings | None, preset: int
    ) -> SmoothingReadback:
        lib = self._lib
        assert lib is not None
        failure = self._ensure_handle(gpu)
        if failure is not None:
            raise DeviceUnavailable(gpu.device, f"no NVML handle: {failure}")
        try:
            state = lib.c_nvmlPowerSmoothingState_v1_t()
            if settings is not None:
                params = (
                    (lib.NVML_POWER_SMOOTHING_PROFILE_PARAM_PERCENT_TMP_FLOOR, settings.floor_pct),
                    (lib.NVML_POWER_SMOOTHING_PROFILE_PARAM_RAMP_UP_RATE, settings.ramp_up_w_per_s),
                    (lib.NVML_POWER_SMOOTHING_PROFILE_PARAM_RAMP_DOWN_RATE, settings.ramp_down_w_per_s),
                    (lib.NVML_POWER_SMOOTHING_PROFILE_PARAM_RAMP_DOWN_HYSTERESIS, settings.hysteresis_ms),
                )
                for param, value in params:
                    profile = lib.c_nvmlPowerSmoothingProfile_v1_t()
                    profile.profileId, profile.paramId, profile.value = preset, param, float(value)
                    lib.nvmlDevicePowerSmoothingUpdatePresetProfileParam(gpu.handle, profile)
                profile = lib.c_nvmlPowerSmoothingProfile_v1_t()
                profile.profileId = preset
                lib.nvmlDevicePowerSmoothingActivatePresetProfile(gpu.handle, profile)
            state.state = 0 if settings is None else 1
            lib.nvmlDevicePowerSmoothingSetState(gpu.handle, state)
            readback = self._smoothing_readback_sync(gpu)
            deadline = time.monotonic() + SETTLE_S
            # A set takes effect at the firmware's (hwsim: the physics') next tick.
            while not readback.agrees(settings, preset) and time.monotonic() < deadline:
                time.sleep(0.01)
                readback = self._smoothing_readback_sync(gpu)
        except lib.NVMLError as err:
            name = self._err_name(err)
            cls = DeviceUnavailable if name in (*_LIBRARY_GONE, "NVML_ERROR_GPU_IS_LOST") else DeviceError
            raise cls(gpu.device, f"power smoothing: {name}") from None
        log.info(
            "gpu power smoothing set", device=gpu.device, settings=settings, preset=preset, readback=readback
        )
        return readback

    def _smoothing_readback_sync(self, gpu: _Gpu) -> SmoothingReadback:
        lib = self._lib
        assert lib is not None
        ids = [
            lib.NVML_FI_PWR_SMOOTHING_ENABLED,
            lib.NVML_FI_PWR_SMOOTHING_ACTIVE_PRESET_PROFILE,
            lib.NVML_FI_PWR_SMOOTHING_APPLIED_TMP_FLOOR,
        ]
        values = lib.nvmlDeviceGetFieldValues(gpu.handle, ids)
        out: list[float | None] = []
        for position in range(len(ids)):
            try:
                out.append(_field(lib, position)(values))
            except (_FieldUnsupported, ValueError):
                out.append(None)
        enabled, profile, floor_w = out
        if enabled is None:
            raise lib.NVMLError(lib.NVML_ERROR_NOT_SUPPORTED)
        return SmoothingReadback(
            enabled=bool(enabled), profile=None if profile is None else int(profile), floor_w=floor_w
        )

    def _set_filler_sync(self, gpu: _Gpu, watts: float) -> float:
        lib = self._lib
        assert lib is not None
        backend = getattr(lib, "podagentSetFillerFloor", None)
        if backend is None:
            raise DeviceError(gpu.device, f"{NO_FILLER_BACKEND} on this host (NVML has no such call)")
        failure = self._ensure_handle(gpu)
        if failure is not None:
            raise DeviceUnavailable(gpu.device, f"no NVML handle: {failure}")
        try:
            backend(gpu.handle, float(watts))
        except lib.NVMLError as err:
            if err.value == lib.NVML_ERROR_FUNCTION_NOT_FOUND:  # a shim whose burn kernel is absent
                why = f"{NO_FILLER_BACKEND} on this host (FUNCTION_NOT_FOUND)"
                raise DeviceError(gpu.device, why) from None
            raise DeviceError(gpu.device, f"filler floor: {self._err_name(err)}") from None
        return float(watts)

    def _gpu(self, device: str) -> _Gpu:
        gpu = self._by_device.get(device)
        if gpu is None:
            raise DeviceError(device, f"not a GPU of {self.device_id}")
        return gpu
