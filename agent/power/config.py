"""``[power]``: the pod's power budget, allocation and grid ramp limiting (docs/power.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from agent.config_base import Strict
from agent.drivers.smoothing import WORKLOAD_PROFILES

# How the ramp is held without a usable battery (PowerConfig.no_battery_fallback).
Fallback = Literal["trough_caps", "soft_floor"]


class GridContract(Strict):
    """``[power.grid_contract]``: the utility's terms on the site meter's import (docs/power.md).

    Measured live (``agent/power/contract.py``), never enforced by itself: status and metrics say
    which term binds. A term left out (None) is not measured."""

    import_limit_w: float | None = Field(None, gt=0)  # None: [power] grid_import_limit_w
    ramp_up_w_per_s: float | None = Field(None, gt=0)
    ramp_down_w_per_s: float | None = Field(None, gt=0)
    # Ramps are measured on the means of consecutive blocks of these lengths (0.1 s and 1 s).
    ramp_horizons_s: tuple[float, ...] = (0.1, 1.0)
    dynamic_range_w: float | None = Field(None, gt=0)  # max - min of the import within any window
    dynamic_range_window_s: float = Field(60.0, gt=0)
    # Share of the swing's spectral energy (detrended) inside [band_lo_hz, band_hi_hz].
    band_lo_hz: float = Field(0.1, ge=0)
    band_hi_hz: float = Field(20.0, gt=0)
    band_share_max: float | None = Field(None, gt=0, le=1)
    # Live measurement: the trailing window evaluated, and how often (the FFT's cost stays small).
    window_s: float = Field(120.0, ge=10, le=3600)
    evaluate_every_s: float = Field(5.0, gt=0, le=600)

    @model_validator(mode="after")
    def _band(self) -> GridContract:
        if self.band_lo_hz >= self.band_hi_hz:
            raise ValueError("need band_lo_hz < band_hi_hz")
        if not self.ramp_horizons_s or any(h <= 0 for h in self.ramp_horizons_s):
            raise ValueError("ramp_horizons_s: need at least one horizon, each > 0")
        return self


class PowerConfig(Strict):
    enabled: bool = False
    # Control period: reads the site meter / battery / pod power, moves the battery, re-plans caps.
    control_period_s: float = Field(0.2, gt=0, le=5)
    # Budgets; the lowest wins (with the fleet's set_power_budget and the interlocks' caps).
    site_limit_w: float | None = Field(None, gt=0)  # static limit on the pod's IT power (PDU sum)
    grid_import_limit_w: float | None = Field(None, gt=0)  # limit on the site meter's import
    # Grid-friendly ramps: the site meter's import may change at most this fast (None: off).
    ramp_limit_w_per_s: float | None = Field(None, gt=0)
    battery: str | None = None  # device id of the BMS (generic-bms profile)
    site_meter: str | None = None  # device id of the site meter (generic-site-meter profile)
    # grid_target: write the ramped grid import target and let the inverter hold it from its own
    # current transformer (fast); setpoint: write the battery power every control period.
    battery_mode: Literal["grid_target", "setpoint"] = "grid_target"
    soc_min_pct: float = Field(15.0, ge=0, le=100)  # inside the BMS's own bounds
    soc_max_pct: float = Field(90.0, ge=0, le=100)
    soc_target_pct: float = Field(60.0, ge=0, le=100)
    # SoC regulation: the grid target moves this many W per % of SoC off target (slowly, ramped).
    soc_gain_w_per_pct: float = Field(500.0, ge=0)
    # With a battery the grid follows the load's moving average (this time constant), not the load.
    smoothing_s: float = Field(30.0, gt=0)
    # Allocation
    hysteresis_w: float = Field(15.0, ge=0)  # per GPU: smaller re-plans are not applied
    idle_util_pct: float = Field(10.0, ge=0, le=100)  # below: the GPU is idle, its headroom is shared
    idle_margin_w: float = Field(50.0, ge=0)  # an idle GPU keeps its draw plus this
    margin_w: float = Field(0.0, ge=0)  # aim this far under every budget
    stale_after_s: float = Field(2.0, gt=0)  # inputs older than this are not used
    grid_contract: GridContract | None = None  # measured against the site meter (contract.py)
    # Without a (usable) battery: "trough_caps" holds the load to the ramped target with GPU caps
    # (costs most of the work on synchronized training); "soft_floor" caps nothing for the ramp and
    # fills the troughs instead (control.soft_floor_step: filler work on the nodes).
    no_battery_fallback: Fallback = "trough_caps"
    soft_floor_frac: float = Field(0.85, ge=0, le=1)  # floor = this x the GPU's recent peak draw
    soft_floor_hold_s: float = Field(5.0, ge=0)  # the peak is held this long (a trough is shorter)
    # NVIDIA power smoothing on the GPUs that have it (Blackwell-class): "auto" sets the profile
    # control.choose_smoothing picks from the contract and the battery (NOT_SUPPORTED GPUs are
    # asked once, then left to the soft floor); "off" never touches it.
    gpu_smoothing: Literal["auto", "off"] = "auto"
    # An NVML workload power profile (e.g. "LLM_TRAINING"; agent/drivers/smoothing.py names them)
    # requested on the smoothing GPUs while a smoothing profile is in force, cleared with it.
    # None: never touched. NOT_SUPPORTED GPUs (H100) are asked once.
    workload_power_profile: str | None = None
    # Ride-through (a grid sag or outage, as the site meter's or the BMS's grid_status says): the
    # GPUs step down to what the battery can carry for this long (its discharge limit, or its
    # energy above soc_min_pct over this time, minus cooling and ride_through_margin_w).
    ride_through_s: float = Field(300.0, gt=0, le=86400)
    ride_through_margin_w: float = Field(0.0, ge=0)
    # Re-energisation: on return the grid import limit climbs from 0 at this rate (None: the
    # contract's ramp_up_w_per_s and ramp_limit_w_per_s, the lower; neither: no climb) and GPU
    # caps are released one server (the device that polls its GPUs) every restore_stagger_s.
    restore_ramp_w_per_s: float | None = Field(None, gt=0)
    restore_stagger_s: float = Field(2.0, ge=0, le=600)

    @model_validator(mode="after")
    def _workload(self) -> PowerConfig:
        profile = self.workload_power_profile
        if profile is not None and profile not in WORKLOAD_PROFILES:
            raise ValueError(
                f"workload_power_profile: {profile!r} is not one of {', '.join(WORKLOAD_PROFILES)}"
            )
        return self

    @model_validator(mode="after")
    def _soc(self) -> PowerConfig:
        if not self.soc_min_pct <= self.soc_target_pct <= self.soc_max_pct:
            raise ValueError("need soc_min_pct <= soc_target_pct <= soc_max_pct")
        return self
