"""The [interlocks] section: every threshold of every rule, with design.md's defaults."""

from __future__ import annotations

from pydantic import Field, model_validator

from agent.config_base import Strict


class RuleBase(Strict):
    enabled: bool = True


class GpuOvertemp(RuleBase):
    trip_c: float = 87.0  # between the GPU's max operating (85 C) and slowdown (89 C): act first
    clear_c: float = 80.0
    clear_hold_s: float = Field(30.0, ge=0)
    cap_pct: float = Field(60.0, gt=0, le=100)

    @model_validator(mode="after")
    def _hysteresis(self) -> GpuOvertemp:
        if self.clear_c >= self.trip_c:
            raise ValueError("clear_c must be below trip_c (hysteresis)")
        return self


class GpuRunaway(RuleBase):
    rate_c_per_s: float = Field(3.0, gt=0)
    window_s: float = Field(3.0, gt=0)
    min_temp_c: float = 70.0
    clear_c: float = 80.0
    clear_hold_s: float = Field(30.0, ge=0)
    cap_pct: float = Field(60.0, gt=0, le=100)


class CoolantSupplyHigh(RuleBase):
    trip_c: float = 40.0
    sustain_s: float = Field(5.0, ge=0)
    clear_c: float = 35.0
    clear_hold_s: float = Field(60.0, ge=0)
    cap_pct: float = Field(50.0, gt=0, le=100)
    # Optional: also lower the CDU's supply setpoint while tripped (restored on clear).
    setpoint_on_trip_c: float | None = None

    @model_validator(mode="after")
    def _hysteresis(self) -> CoolantSupplyHigh:
        if self.clear_c >= self.trip_c:
            raise ValueError("clear_c must be below trip_c (hysteresis)")
        return self


class CoolantFlowLow(RuleBase):
    # Used for CDUs whose device config sets no min_flow_lpm.
    min_flow_lpm: float = Field(10.0, ge=0)
    sustain_s: float = Field(2.0, ge=0)
    clear_hold_s: float = Field(60.0, ge=0)
    cap_pct: float = Field(40.0, gt=0, le=100)


class CoolantLeak(RuleBase):
    # Caps every GPU on the loop to its minimum limit; clears only after the detector is dry and a
    # person acknowledged the trip event.
    # shed = true also switches off every server the leaking loop cools (the outlets of its GPUs
    # in the PDUs' outlet_gpus), at once; like any shed, only a person switches them back on.
    shed: bool = False


class CoolantEscalation(RuleBase):
    """The ladder above a loop's coolant caps (docs/interlocks.md): while coolant_supply_high or
    coolant_flow_low caps a loop and its supply temperature still rises by rise_c over
    rise_window_s (or is at/above critical_c), climb one rung after each stage_hold_s: 1 = every
    GPU of the loop to deep_cap_pct, 2 = every GPU to its minimum limit, then `shed` if enabled.
    Each rung is a critical event that needs an ack; it clears with the coolant caps."""

    rise_window_s: float = Field(30.0, gt=0)
    rise_c: float = Field(1.0, ge=0)
    stage_hold_s: float = Field(30.0, ge=0)
    deep_cap_pct: float = Field(30.0, gt=0, le=100)
    critical_c: float = 45.0


class CoolingAlarm(RuleBase):
    """A cooling device's own trip, fault or alarm word (chiller tripped, pump fault, alarm bits)
    raised as a critical event the moment it is read, and its clear when it reads 0 again."""


class PduPhaseOvercurrent(RuleBase):
    trip_pct: float = Field(80.0, gt=0)
    sustain_s: float = Field(10.0, ge=0)
    immediate_pct: float = Field(95.0, gt=0)
    clear_pct: float = Field(75.0, gt=0)
    clear_hold_s: float = Field(60.0, ge=0)
    # On trip, caps aim for this share of the rating; while still >= clear_pct they tighten by
    # tighten_step_pct of the default limit every tighten_interval_s.
    target_pct: float = Field(70.0, gt=0)
    tighten_step_pct: float = Field(10.0, gt=0, le=50)
    tighten_interval_s: float = Field(5.0, gt=0)
    # Used for PDUs whose device config sets no breaker_rating_a.
    default_rating_a: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _order(self) -> PduPhaseOvercurrent:
        if not self.clear_pct < self.trip_pct <= self.immediate_pct:
            raise ValueError("need clear_pct < trip_pct <= immediate_pct")
        return self


class SensorStale(RuleBase):
    cap_pct: float = Field(60.0, gt=0, le=100)  # the fail-safe cap
    fresh_hold_s: float = Field(10.0, ge=0)
    # After start, inputs that never arrived count as stale only after this grace.
    startup_grace_s: float = Field(15.0, ge=0)


class Shed(Strict):
    enabled: bool = False  # off by default (design.md): switching servers off is drastic
    critical_c: float = 50.0
    after_caps_s: float = Field(30.0, ge=0)
    servers: int = Field(1, ge=1, le=64)  # how many of the hottest servers to switch off


# The longest override the daemon grants unless a pod's config says otherwise; podctl's help quotes it.
DEFAULT_MAX_OVERRIDE_S = 3600.0


class InterlockConfig(Strict):
    enabled: bool = True
    # Ramped release: +release_step_pct of the default limit every release_interval_s.
    release_step_pct: float = Field(10.0, gt=0, le=100)
    release_interval_s: float = Field(5.0, gt=0)
    restore_defaults_on_stop: bool = False
    max_override_s: float = Field(DEFAULT_MAX_OVERRIDE_S, gt=0)
    # A failed actuation is retried after this long (and reported once per failure streak).
    retry_s: float = Field(2.0, gt=0)
    # Coalescing: a batch whose interlock inputs are all far from every trip threshold (by
    # coalesce_margin_pct of the threshold) on devices with nothing tripped or timing may wait up
    # to coalesce_s to be evaluated with later batches (agent/interlocks/urgency.py); anything
    # near or past a threshold, missing or bad is evaluated at once. 0 evaluates every batch.
    coalesce_s: float = Field(0.2, ge=0, le=1.0)
    coalesce_margin_pct: float = Field(10.0, ge=0, lt=100)
    gpu_overtemp: GpuOvertemp = GpuOvertemp()
    gpu_runaway: GpuRunaway = GpuRunaway()
    coolant_supply_high: CoolantSupplyHigh = CoolantSupplyHigh()
    coolant_flow_low: CoolantFlowLow = CoolantFlowLow()
    coolant_leak: CoolantLeak = CoolantLeak()
    coolant_escalation: CoolantEscalation = CoolantEscalation()
    cooling_alarm: CoolingAlarm = CoolingAlarm()
    pdu_phase_overcurrent: PduPhaseOvercurrent = PduPhaseOvercurrent()
    sensor_stale: SensorStale = SensorStale()
    shed: Shed = Shed()


INTERLOCKS = (
    "gpu_overtemp",
    "gpu_runaway",
    "coolant_supply_high",
    "coolant_flow_low",
    "coolant_leak",
    "coolant_escalation",
    "pdu_phase_overcurrent",
    "sensor_stale",
    "cooling_alarm",
    "shed",
)
# Overriding these needs an explicit force flag (design.md: coolant-critical and shed).
FORCE_ONLY = frozenset({"coolant_leak", "coolant_escalation", "shed"})
