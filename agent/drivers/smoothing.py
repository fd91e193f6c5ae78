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


__all__ = ["SETTLE_S", "SMOOTHING_PRESET", "SmoothingReadback", "SmoothingSettings"]
