"""GPU power smoothing as the agent asks it and as a GPU reads it back: the values NVIDIA power
smoothing takes (nvmlPowerSmoothingProfile_v1 params) and what NVML_FI_PWR_SMOOTHING_* report.
Shared by the NVML driver, the node protocol and the actuators (plain data, no NVML here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTHING_PRESET = 1  # the preset profile the agent writes (0 stays the board's own)
SETTLE_S = 1.0  # how long a smoothing set may take to read back as asked


@dataclass(frozen=True, slots=True)
class SmoothingSettings:
    """NVIDIA power smoothing as the agent asks it (nvmlPowerSmoothingProfile_v1 params)."""

    floor_pct: float  # PERCENT_TMP_FLOOR: the draw never falls under this % of TMP
    ramp_up_w_per_s: float  # RAMP_UP_RATE
    ramp_down_w_per_s: float  # RAMP_DOWN_RATE
    hysteresis_ms: float  # RAMP_DOWN_HYSTERESIS: a fall is held this long before it ramps

    def valid(self) -> bool:
        """NVML's accepted ranges (what the driver would refuse with INVALID_ARGUMENT)."""
        values = (self.floor_pct, self.ramp_up_w_per_s, self.ramp_down_w_per_s, self.hysteresis_ms)
        return (
            all(isinstance(v, int | float) and math.isfinite(v) for v in values)
            and 0.0 <= self.floor_pct <= 100.0
            and 1.0 <= self.ramp_up_w_per_s <= 1e7
            and 1.0 <= self.ramp_down_w_per_s <= 1e7
            and 0.0 <= self.hysteresis_ms <= 60_000.0
        )


@dataclass(frozen=True, slots=True)
class SmoothingReadback:
    """What the GPU reports of its smoothing (NVML_FI_PWR_SMOOTHING_*)."""

    enabled: bool
    profile: int | None  # ACTIVE_PRESET_PROFILE
    floor_w: float | None  # APPLIED_TMP_FLOOR (W; 0 while off)

    def agrees(self, settings: SmoothingSettings | None, preset: int) -> bool:
        if settings is None:
            return not self.enabled
        return self.enabled and (self.profile is None or self.profile == preset)


# NVML's workload power profiles (nvmlPowerProfileType_t: NVML_POWER_PROFILE_<name> = bit).
WORKLOAD_PROFILES = (
    "MAX_P", "MAX_Q", "COMPUTE", "MEMORY_BOUND", "NETWORK", "BALANCED", "LLM_INFERENCE",
    "LLM_TRAINING", "RBM", "DCPCIE", "HMMA_SPARSE", "HMMA_DENSE", "SYNC_BALANCED", "HPC", "MIG",
    "MAX_Q_1", "NETWORK_BOUND", "HIGH_THROUGHPUT_INFERENCE", "MEDIUM_THROUGHPUT_INFERENCE",
    "LOW_LATENCY_INFERENCE", "TRAINING", "INFERENCE", "MAX_Q_2", "MAX_Q_3", "LOW_PRIORITY_BACKGROUND",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class GpuSettingsAsk:
    """What to change on one GPU besides its cap (an unasked part changes nothing)."""

    set_smoothing: bool = False  # smoothing asked (then ``smoothing`` None: switch it off)
    smoothing: SmoothingSettings | None = None
    filler_w: float | None = None  # the filler floor (W, 0: off); None: not asked
    set_workload: bool = False  # workload power profile asked (then None: clear the request)
    workload_profile: str | None = None  # one of WORKLOAD_PROFILES


@dataclass(frozen=True, slots=True)
class GpuSettingsOutcome:
    """What one GPU did with a GpuSettingsAsk: read back, or why not (never raised per GPU)."""

    smoothing: SmoothingReadback | None = None  # read back after a smoothing set
    smoothing_error: str | None = None
    unsupported: bool = False  # the GPU has no power smoothing (NOT_SUPPORTED: H100): do not retry
    filler_w: float | None = None  # the filler floor now in force
    filler_error: str | None = None
    workload: str | None = None  # the workload profile requested now, read back ("" : none)
    workload_error: str | None = None
    workload_unsupported: bool = False  # no workload power profiles (NOT_SUPPORTED: H100)

    @property
    def ok(self) -> bool:
        return self.smoothing_error is None and self.filler_error is None and self.workload_error is None


NOT_SUPPORTED = "NVML_ERROR_NOT_SUPPORTED"
# A host that cannot run filler work (no burn kernel: every real GPU host today). The words travel
# in ``filler_error`` from a node as from the local driver; the power service reads them as "never
# ask this GPU for a filler again" and holds the ramp with caps instead (docs/power.md).
NO_FILLER_BACKEND = "no filler backend"


def filler_unsupported(error: str | None) -> bool:
    """Is this filler refusal permanent (the host has no filler backend), not a passing failure?"""
    return error is not None and NO_FILLER_BACKEND in error


__all__ = [
    "NOT_SUPPORTED",
    "NO_FILLER_BACKEND",
    "SETTLE_S",
    "SMOOTHING_PRESET",
    "WORKLOAD_PROFILES",
    "GpuSettingsAsk",
    "GpuSettingsOutcome",
    "SmoothingReadback",
    "SmoothingSettings",
    "filler_unsupported",
]
