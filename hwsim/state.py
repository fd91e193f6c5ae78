"""The simulated pod's device state: what the physics computes and the protocol servers serve.

All protocol servers (SNMP, Modbus) run in the same asyncio loop as the physics and read these
objects directly; the NVML fake reads a shared-memory copy of the GPU states from other processes
(see ``hwsim.nvml.shm``). Units are SI-ish and in the field names. Writes from the protocols go
through the ``set_*`` methods, which validate like a real device would (ValueError = refused).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

# NVML clock-event reason bits (nvml.h: nvmlClocksEventReason*), exported one by one by the agent.
CLOCKS_EVENT_GPU_IDLE = 0x1
CLOCKS_EVENT_SW_POWER_CAP = 0x4
CLOCKS_EVENT_HW_SLOWDOWN = 0x8
CLOCKS_EVENT_SW_THERMAL = 0x20
CLOCKS_EVENT_HW_THERMAL = 0x40
CLOCKS_EVENT_HW_POWER_BRAKE = 0x80


@dataclass
class GpuState:
    index: int
    uuid: str
    name: str
    pci_bus_id: str
    serial: str
    server: int  # index of the server (tray) holding it
    loop: str  # id of the CDU whose loop cools it
    default_limit_w: float
    min_limit_w: float
    max_limit_w: float
    power_limit_w: float  # set through NVML (persists until set again or the sim restarts)
    enforced_limit_w: float  # min(power_limit_w, out-of-band limit); what the GPU obeys
    power_w: float = 0.0  # instantaneous (this tick): NVML_FI_DEV_POWER_INSTANT
    # What nvmlDeviceGetPowerUsage reports on Ampere and later: the average over the last second.
    power_avg_w: float = 0.0
    temp_c: float = 30.0
    energy_j: float = 0.0  # since the sim started (NVML reports mJ)
    util_gpu_pct: float = 0.0
    util_mem_pct: float = 0.0
    mem_total_bytes: int = 80 * 1024**3
    mem_used_bytes: int = 0
    clock_sm_mhz: float = 1980.0
    clock_mem_mhz: float = 2619.0
    clock_sm_max_mhz: float = 1980.0
    clock_mem_max_mhz: float = 2619.0
    clocks_event_reasons: int = 0
    ecc_corrected: int = 0
    ecc_uncorrected: int = 0
    temp_shutdown_c: float = 92.0
    temp_slowdown_c: float = 89.0
    temp_max_operating_c: float = 85.0  # NVML_TEMPERATURE_THRESHOLD_GPU_MAX
    temp_mem_max_c: float = 95.0
    lost: bool = False  # fault gpu-lost: NVML answers NVML_ERROR_GPU_IS_LOST


@dataclass
class PhaseState:
    index: int  # 1-based, as the MIBs number them
    voltage_v: float = 230.0
    current_a: float = 0.0
    power_w: float = 0.0
    apparent_power_va: float = 0.0
    peak_current_a: float = 0.0
    energy_wh: float = 0.0


@dataclass
class OutletState:
    index: int  # 1-based
    name: str
    phase: int  # 1..3
    on: bool = True
    server: int | None = None  # server (tray) whose PSU is plugged here, if any
    current_a: float = 0.0
    power_w: float = 0.0
    peak_power_w: float = 0.0
    energy_wh: float = 0.0


@dataclass
class PduState:
    id: str
    vendor: str  # "apc" (PowerNet rPDU2), "raritan" (PDU2-MIB), "modbus" (generic metered PDU)
    model: str
    rating_a: float  # per-phase breaker rating
    phases: list[PhaseState]
    outlets: list[OutletState]
    power_factor: float = 0.98
    power_w: float = 0.0
    apparent_power_va: float = 0.0
    energy_wh: float = 0.0
    # Faults: an agent that never answers (snmp-timeout), a Modbus unit answering "busy".
    unresponsive: bool = False
    # Fault bad-value: metric -> what its Modbus register serves instead (nan, inf, a number,
    # "garbage"); see hwsim/modbus_codec.py.
    bad_values: dict[str, float | str] = field(default_factory=dict)
    busy: bool = False
    response_delay_s: float = 0.0  # fault snmp-slow: every answer comes this late

    def set_outlet(self, index: int, on: bool) -> None:
        """Outlet control (SNMP SET / Modbus coil). Unknown outlet: ValueError."""
        for outlet in self.outlets:
            if outlet.index == index:
                outlet.on = on
                return
        raise ValueError(f"{self.id}: no outlet {index}")


# CDU alarm bits (generic-cdu profile, register "alarms").
CDU_ALARM_PUMP_FAULT = 0x1
CDU_ALARM_LEAK = 0x2
CDU_ALARM_SUPPLY_HIGH = 0x4
CDU_ALARM_FLOW_LOW = 0x8
CDU_ALARM_LEVEL_LOW = 0x10


@dataclass
class CduState:
    id: str
    setpoint_c: float = 30.0  # secondary supply setpoint, writable
    supply_temp_c: float = 30.0  # secondary (GPU side) supply
    return_temp_c: float = 30.0
    facility_supply_temp_c: float = 20.0  # primary side in (from the chiller)
    facility_return_temp_c: float = 20.0
    flow_lpm: float = 0.0
    nominal_flow_lpm: float = 300.0
    supply_pressure_kpa: float = 0.0
    return_pressure_kpa: float = 0.0
    pump_running: bool = True
    pump_speed_pct: float = 80.0  # writable
    pump_fault: bool = False
    leak: bool = False
    reservoir_level_pct: float = 92.0
    heat_removed_kw: float = 0.0
    dew_point_c: float = 12.0
    alarms: int = 0
    busy: bool = False  # fault modbus-exception: every request answered with exception 6
    unresponsive: bool = False
    # Fault bad-value: metric -> what its Modbus register serves instead (nan, inf, a number,
    # "garbage"); see hwsim/modbus_codec.py.
    bad_values: dict[str, float | str] = field(default_factory=dict)

    SETPOINT_RANGE = (15.0, 45.0)

    @property
    def diff_pressure_kpa(self) -> float:
        """Differential pressure across the IT loop (supply minus return), as CDUs report it."""
        return self.supply_pressure_kpa - self.return_pressure_kpa

    def set_setpoint(self, value_c: float) -> None:
        lo, hi = self.SETPOINT_RANGE
        if not lo <= value_c <= hi:
            raise ValueError(f"{self.id}: setpoint {value_c} C outside {lo}..{hi} C")
        self.setpoint_c = value_c

    def set_pump_speed(self, pct: float) -> None:
        if not 20.0 <= pct <= 100.0:
            raise ValueError(f"{self.id}: pump speed {pct}% outside 20..100%")
        self.pump_speed_pct = pct


CHILLER_ALARM_TRIP = 0x1
CHILLER_ALARM_HIGH_TEMP = 0x2


@dataclass
class ChillerState:
    id: str
    running: bool = True
    tripped: bool = False  # fault chiller-trip: compressor off, alarm set
    setpoint_c: float = 20.0  # facility water supply setpoint, writable
    supply_temp_c: float = 20.0
    return_temp_c: float = 20.0
    capacity_kw: float = 100.0
    load_kw: float = 0.0
    compressor_pct: float = 0.0
    alarms: int = 0
    busy: bool = False
    unresponsive: bool = False
    # Fault bad-value: metric -> what its Modbus register serves instead (nan, inf, a number,
    # "garbage"); see hwsim/modbus_codec.py.
    bad_values: dict[str, float | str] = field(default_factory=dict)
    power_w: float = 0.0  # electrical input (compressor + fans): part of the site's auxiliary load

    SETPOINT_RANGE = (10.0, 30.0)

    def set_setpoint(self, value_c: float) -> None:
        lo, hi = self.SETPOINT_RANGE
        if not lo <= value_c <= hi:
            raise ValueError(f"{self.id}: setpoint {value_c} C outside {lo}..{hi} C")
        self.setpoint_c = value_c


# BMS fault bits (generic-bms profile, register "faults"). Any fault opens the DC contactor.
BMS_FAULT_OVERTEMP = 0x1
BMS_FAULT_CELL_IMBALANCE = 0x2
BMS_FAULT_INVERTER = 0x4

# Grid status as the site meter and the BMS report it (generic-site-meter.toml / generic-bms.toml enum).
GRID_NORMAL = 0
GRID_SAG = 1
GRID_OUTAGE = 2
SAG_VOLTAGE_PCT = 70.0  # a typical ride-through sag (IEEE 1668 / SEMI F47 curves go to 50-70%)

BATTERY_MODE_SETPOINT = 0  # follow power_setpoint_w
BATTERY_MODE_GRID_TARGET = 1  # the inverter holds the site meter's import at grid_target_w


@dataclass
class BatteryState:
    """A battery energy storage system behind the site meter (BMS + bidirectional inverter).

    Sign convention (as most BMS maps): power > 0 discharges into the site, < 0 charges from it.
    ``max_charge_w`` / ``max_discharge_w`` are what the BMS allows NOW (0 at the SoC bounds or
    with a fault), like the charge/discharge current limits (CCL/DCL) a real BMS reports.
    """

    id: str
    capacity_wh: float = 20000.0
    rated_charge_w: float = 40000.0
    rated_discharge_w: float = 40000.0
    soc_pct: float = 60.0
    soc_min_pct: float = 5.0  # the BMS's own protection bounds
    soc_max_pct: float = 95.0
    efficiency: float = 0.95  # one-way: charging stores 95%, discharging needs 1/0.95 from the cells
    max_charge_w: float = 40000.0
    max_discharge_w: float = 40000.0
    power_w: float = 0.0
    power_setpoint_w: float = 0.0  # writable
    mode: int = BATTERY_MODE_SETPOINT  # writable
    grid_target_w: float = 0.0  # writable (mode 1)
    faults: int = 0
    energy_charged_wh: float = 0.0
    energy_discharged_wh: float = 0.0
    # What the inverter sees of the grid (GRID_* below): on a sag or an outage it carries the site.
    grid_status: int = 0
    busy: bool = False
    unresponsive: bool = False
    # Fault bad-value: metric -> what its Modbus register serves instead (nan, inf, a number,
    # "garbage"); see hwsim/modbus_codec.py.
    bad_values: dict[str, float | str] = field(default_factory=dict)

    def set_power_setpoint_w(self, watts: float) -> None:
        if not -self.rated_charge_w <= watts <= self.rated_discharge_w:
            raise ValueError(
                f"{self.id}: setpoint {watts} W outside -{self.rated_charge_w}..{self.rated_discharge_w} W"
            )
        self.power_setpoint_w = watts

    def set_mode(self, mode: float) -> None:
        if mode not in (BATTERY_MODE_SETPOINT, BATTERY_MODE_GRID_TARGET):
            raise ValueError(f"{self.id}: mode {mode} is not 0 (setpoint) or 1 (grid target)")
        self.mode = int(mode)

    def set_grid_target_w(self, watts: float) -> None:
        if watts < 0:
            raise ValueError(f"{self.id}: grid target {watts} W below 0")
        self.grid_target_w = watts


@dataclass
class SiteMeterState:
    """The utility meter at the site's point of connection: grid import (+) / export (-)."""

    id: str
    power_w: float = 0.0
    energy_import_wh: float = 0.0
    energy_export_wh: float = 0.0
    grid_status: int = 0  # GRID_NORMAL / GRID_SAG / GRID_OUTAGE
    grid_voltage_pct: float = 100.0  # of nominal
    busy: bool = False
    unresponsive: bool = False
    # Fault bad-value: metric -> what its Modbus register serves instead (nan, inf, a number,
    # "garbage"); see hwsim/modbus_codec.py.
    bad_values: dict[str, float | str] = field(default_factory=dict)


@dataclass
class XidEvent:
    gpu_index: int
    xid: int
    seq: int  # increasing across the pod


_T = TypeVar("_T", PduState, CduState, ChillerState)


@dataclass
class PodState:
    name: str
    gpus: list[GpuState] = field(default_factory=list)
    pdus: list[PduState] = field(default_factory=list)
    cdus: list[CduState] = field(default_factory=list)
    chillers: list[ChillerState] = field(default_factory=list)
    xid_events: list[XidEvent] = field(default_factory=list)  # newest last, bounded by the physics
    sim_time_s: float = 0.0
    battery: BatteryState | None = None
    site_meter: SiteMeterState | None = None

    def pdu(self, device: str) -> PduState:
        return _by_id(self.pdus, device)

    def cdu(self, device: str) -> CduState:
        return _by_id(self.cdus, device)

    def chiller(self, device: str) -> ChillerState:
        return _by_id(self.chillers, device)


def _by_id(items: list[_T], device: str) -> _T:
    for item in items:
        if item.id == device:
            return item
    raise KeyError(device)


@dataclass
class GpuSmoothingState:
    """Per GPU, beside ``GpuState`` (kept apart so that the NVML fake's shared-memory layout, which
    carries every GpuState field, is unchanged until the fake serves these): NVIDIA power
    smoothing (Blackwell-class only), the software fallback's filler floor, and the work done.
    ``hwsim/physics.py`` applies them; the NVML fake serves the smoothing part (hwsim/nvml/shm.py)."""

    supported: bool = False  # Blackwell-class; H100: NVML answers NOT_SUPPORTED
    enabled: bool = False
    profile: int = 0  # active preset profile (0..4)
    floor_pct: float = 0.0  # of TMP (the default limit here) held in the troughs
    ramp_up_w_per_s: float = float("inf")
    ramp_down_w_per_s: float = float("inf")
    hysteresis_ms: float = 0.0  # a fall waits this long before the ramp down starts
    lifetime_pct: float = 100.0  # NVML_FI_PWR_SMOOTHING_HW_CIRCUITRY_PERCENT_LIFETIME_REMAINING
    # NVML's preset profiles (5 x 8 params: % TMP floor, ramp up W/s, ramp down W/s, hysteresis
    # ms, secondary floor, floor window parameters); the active one's first four are applied.
    presets: list[list[float]] = field(
        default_factory=lambda: [[0.0, 10000.0, 10000.0, 0.0, 0.0, 0.0, 0.0, 0.0] for _ in range(5)]
    )
    # Software fallback (any GPU): the node keeps the GPU busy with filler work so that its draw
    # stays >= this (never above the enforced limit). Filler adds no work.
    soft_floor_w: float = 0.0
    # Workload power profiles requested (bit i: NVML_POWER_PROFILE id i; Blackwell-class only).
    # Recorded and served back; the physics gives them no effect (not modelled).
    workload_mask: int = 0
    # Work: what the phase wants (W) and seconds of full-speed progress (slower while the GPU gets
    # less than its phase wants; floors and filler burn power but add none).
    demand_w: float = 0.0
    useful_w: float = 0.0
    work_s: float = 0.0
    fall_since_s: float | None = None  # when the current fall began (hysteresis)
