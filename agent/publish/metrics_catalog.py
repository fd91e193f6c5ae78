"""What every reading is called on /metrics: family name, type, help, unit scale and labels.

One place decides the Prometheus names, so the exporter, the generated reference
(``docs/metrics.md``: ``python -m agent.publish.metrics_catalog``) and the tests agree.

Rules (Prometheus' own conventions, and dcgm-exporter's for GPUs):
- A device's readings are ``podagent_<role>_<quantity>_<base unit>``, the role being what the
  device is (pdu, cdu, chiller, battery, meter, host): a PDU's power and the site meter's never
  share a family, so ``sum(podagent_pdu_power_watts)`` adds PDUs only. Pod totals have their own
  families (``podagent_pod_power_watts``) without a ``device`` label.
- Base units: watts (not kW), joules (not Wh or mJ), pascals, hertz, seconds, bytes, ratios 0-1
  (not %), cubic metres per second (not L/min). Counters end in ``_total``.
- GPUs: dcgm-exporter's names, units and labels (``DCGM_FI_DEV_*``, MHz, MiB, %, mJ, ``gpu``,
  ``UUID``, ``device="nvidiaN"``, ``modelName``, ``Hostname``, ``DCGM_FI_DRIVER_VERSION``), so NVIDIA's
  dashboards and alerts work and podagent_gpu_* series join them on the same labels.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class Family:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    source: str = ""  # where it comes from, for the reference


@dataclass(frozen=True)
class DeviceMetric:
    """How one reading becomes one sample."""

    family: Family
    scale: float = 1.0
    # An extra label from the metric's name: ("phase", "1") for phase1_current_a.
    channel: tuple[str, str] | None = None
    # "boot_time": the value is an uptime, exported as the wall-clock time it started;
    # "floor": whole units after scaling (dcgm-exporter's MiB).
    transform: str = ""


GPU_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")
DEVICE = ("device",)

# -- GPUs: NVML driver metric -> dcgm-exporter field (its unit, its help text) -----------------
_MIB = 1.0 / 2**20
DCGM: dict[str, tuple[str, Kind, float, str]] = {
    "clock_sm_mhz": ("DCGM_FI_DEV_SM_CLOCK", "gauge", 1.0, "SM clock frequency (in MHz)."),
    "clock_mem_mhz": ("DCGM_FI_DEV_MEM_CLOCK", "gauge", 1.0, "Memory clock frequency (in MHz)."),
    "mem_temp_c": ("DCGM_FI_DEV_MEMORY_TEMP", "gauge", 1.0, "Memory temperature (in C)."),
    "temp_c": ("DCGM_FI_DEV_GPU_TEMP", "gauge", 1.0, "GPU temperature (in C)."),
    "power_w": ("DCGM_FI_DEV_POWER_USAGE", "gauge", 1.0, "Power draw (in W)."),
    "power_instant_w": (
        "DCGM_FI_DEV_POWER_USAGE_INSTANT",
        "gauge",
        1.0,
        "Current instantaneous power usage of the device (in W).",
    ),
    "energy_mj": (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "counter",
        1.0,
        "Total energy consumption since boot (in mJ).",
    ),
    "pcie_replay_total": ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter", 1.0, "Total number of PCIe retries."),
    "util_gpu_pct": ("DCGM_FI_DEV_GPU_UTIL", "gauge", 1.0, "GPU utilization (in %)."),
    "util_mem_pct": ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", 1.0, "Memory utilization (in %)."),
    "util_enc_pct": ("DCGM_FI_DEV_ENC_UTIL", "gauge", 1.0, "Encoder utilization (in %)."),
    "util_dec_pct": ("DCGM_FI_DEV_DEC_UTIL", "gauge", 1.0, "Decoder utilization (in %)."),
    "xid_last": ("DCGM_FI_DEV_XID_ERRORS", "gauge", 1.0, "Value of the last XID error encountered."),
    "mem_free_bytes": ("DCGM_FI_DEV_FB_FREE", "gauge", _MIB, "Framebuffer memory free (in MiB)."),
    "mem_used_bytes": ("DCGM_FI_DEV_FB_USED", "gauge", _MIB, "Framebuffer memory used (in MiB)."),
    "mem_reserved_bytes": ("DCGM_FI_DEV_FB_RESERVED", "gauge", _MIB, "Framebuffer memory reserved (in MiB)."),
    "mem_total_bytes": ("DCGM_FI_DEV_FB_TOTAL", "gauge", _MIB, "Framebuffer memory total (in MiB)."),
    "remapped_rows_uncorrectable_total": (
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "counter",
        1.0,
        "Number of remapped rows for uncorrectable errors",
    ),
    "remapped_rows_correctable_total": (
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "counter",
        1.0,
        "Number of remapped rows for correctable errors",
    ),
    "row_remap_failure": (
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "gauge",
        1.0,
        "Whether remapping of rows has failed",
    ),
    "row_remap_pending": (
        "DCGM_FI_DEV_ROW_REMAP_PENDING",
        "gauge",
        1.0,
        "Whether remapping of rows is pending (applied at the next GPU reset)",
    ),
    "power_limit_w": ("DCGM_FI_DEV_POWER_MGMT_LIMIT", "gauge", 1.0, "Power management limit (in W)."),
    "enforced_power_limit_w": (
        "DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
        "gauge",
        1.0,
        "Effective power limit that the driver enforces after taking into account all limiters (in W).",
    ),
    "ecc_corrected_total": (
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "counter",
        1.0,
        "Total number of single-bit volatile ECC errors.",
    ),
    "ecc_uncorrected_total": (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "counter",
        1.0,
        "Total number of double-bit volatile ECC errors.",
    ),
}

# -- GPUs: what dcgm-exporter does not have, as podagent_gpu_* with the same labels -------------
_GPU_OWN: dict[str, tuple[str, Kind, str]] = {
    "default_power_limit_w": ("podagent_gpu_power_limit_default_watts", "gauge", "Default power limit."),
    "min_power_limit_w": ("podagent_gpu_power_limit_min_watts", "gauge", "Lowest settable power limit."),
    "max_power_limit_w": ("podagent_gpu_power_limit_max_watts", "gauge", "Highest settable power limit."),
    "temp_slowdown_c": (
        "podagent_gpu_temp_slowdown_threshold_celsius",
        "gauge",
        "Temperature at which the GPU slows its clocks.",
    ),
    "temp_shutdown_c": (
        "podagent_gpu_temp_shutdown_threshold_celsius",
        "gauge",
        "Temperature at which the GPU shuts down.",
    ),
    "temp_max_operating_c": (
        "podagent_gpu_temp_max_operating_celsius",
        "gauge",
        "Highest temperature the GPU is specified to run at.",
    ),
    "lost": ("podagent_gpu_lost", "gauge", "1 while NVML reports the GPU lost (fell off the bus)."),
    "power_smoothing_enabled": (
        "podagent_gpu_power_smoothing_enabled",
        "gauge",
        "1 while NVIDIA power smoothing is on (NVML_FI_PWR_SMOOTHING_ENABLED; Blackwell-class).",
    ),
    "power_smoothing_profile": (
        "podagent_gpu_power_smoothing_profile",
        "gauge",
        "The active power smoothing preset profile (NVML_FI_PWR_SMOOTHING_ACTIVE_PRESET_PROFILE).",
    ),
    "power_smoothing_floor_w": (
        "podagent_gpu_power_smoothing_floor_watts",
        "gauge",
        "The applied power smoothing floor (NVML_FI_PWR_SMOOTHING_APPLIED_TMP_FLOOR).",
    ),
    "nvml_errors_total": (
        "podagent_gpu_nvml_errors_total",
        "counter",
        "NVML calls for this GPU that failed.",
    ),
    "xid_total": (
        "podagent_gpu_xid_events_total",
        "counter",
        "XID events the GPU reported since podagent started.",
    ),
}
GPU_CLOCK_EVENT = Family(
    "podagent_gpu_clock_event_active",
    "gauge",
    "1 while the clock-event (throttle) reason holds the GPU's clocks down.",
    (*GPU_LABELS, "reason"),
    "NVML nvmlDeviceGetCurrentClocksEventReasons",
)

# -- devices from profiles: (role, quantity) -> (family suffix, kind, help) ---------------------
# The quantity is the metric name without its channel (phase1_current_a -> phase_current_a).
_NAMED: dict[tuple[str, str], tuple[str, Kind, str]] = {
    # A GPU server's node agent, as its last poll answer reported it (agent/node/app.py).
    ("node", "node_controller_lost"): (
        "failsafe_active",
        "gauge",
        "1 while the node agent applies its fail-safe cap (nothing valid from the controller for "
        "controller_lost_after_s); its last answer's view.",
    ),
    ("node", "node_lease_hold"): (
        "lease_hold",
        "gauge",
        "1 while the node agent holds the limits it started with (no controller decision yet).",
    ),
    ("node", "node_failsafe_entered_total"): (
        "failsafe_entered_total",
        "counter",
        "Times the node agent went to its fail-safe cap since it started (a partition shows here).",
    ),
    ("node", "node_rejected_total"): (
        "requests_refused_total",
        "counter",
        "Requests the node agent refused since it started, by reason (frame, mac, node, expired, "
        "skew, replay): forged, replayed or expired caps.",
    ),
    ("node", "node_interlock_trips_total"): (
        "interlock_trips_total",
        "counter",
        "Trips of the node agent's own rules (gpu_overtemp, gpu_runaway, sensor_stale).",
    ),
    ("node", "node_cap_failures_total"): (
        "cap_failures_total",
        "counter",
        "NVML power-limit sets that failed on the node agent.",
    ),
    ("node", "node_stale_leases_total"): (
        "stale_leases_total",
        "counter",
        "Older leases the node agent renewed but did not apply (overtaken by a newer one).",
    ),
    ("node", "node_uptime_s"): ("uptime_seconds", "gauge", "Seconds since the node agent started."),
    ("pdu", "power_w"): ("power_watts", "gauge", "Active power of the PDU (all phases)."),
    ("pdu", "apparent_power_va"): ("apparent_power_voltamperes", "gauge", "Apparent power of the PDU."),
    ("pdu", "energy_wh"): (
        "energy_joules_total",
        "counter",
        "Energy through the PDU since its counter reset.",
    ),
    ("pdu", "phase_current_a"): ("phase_current_amperes", "gauge", "RMS current of one phase."),
    ("pdu", "phase_peak_current_a"): ("phase_peak_current_amperes", "gauge", "Peak current of one phase."),
    ("pdu", "phase_voltage_v"): ("phase_voltage_volts", "gauge", "RMS voltage of one phase."),
    ("pdu", "phase_power_w"): ("phase_power_watts", "gauge", "Active power of one phase."),
    ("pdu", "outlet_current_a"): ("outlet_current_amperes", "gauge", "RMS current of one outlet."),
    ("pdu", "outlet_power_w"): ("outlet_power_watts", "gauge", "Active power of one outlet."),
    ("pdu", "outlet_energy_wh"): (
        "outlet_energy_joules_total",
        "counter",
        "Energy through one outlet since its counter reset.",
    ),
    ("pdu", "outlet_on"): ("outlet_on", "gauge", "1 while the outlet is switched on."),
    ("cdu", "supply_temp_c"): ("supply_temp_celsius", "gauge", "Coolant supply temperature (IT side)."),
    ("cdu", "return_temp_c"): ("return_temp_celsius", "gauge", "Coolant return temperature (IT side)."),
    ("cdu", "facility_supply_temp_c"): (
        "facility_supply_temp_celsius",
        "gauge",
        "Facility water supply temperature.",
    ),
    ("cdu", "facility_return_temp_c"): (
        "facility_return_temp_celsius",
        "gauge",
        "Facility water return temperature.",
    ),
    ("cdu", "dew_point_c"): ("dew_point_celsius", "gauge", "Dew point of the room at the CDU."),
    ("cdu", "flow_lpm"): ("flow_cubic_meters_per_second", "gauge", "Coolant flow (IT side)."),
    ("cdu", "supply_pressure_kpa"): ("supply_pressure_pascals", "gauge", "Coolant supply pressure."),
    ("cdu", "return_pressure_kpa"): ("return_pressure_pascals", "gauge", "Coolant return pressure."),
    ("cdu", "diff_pressure_kpa"): ("differential_pressure_pascals", "gauge", "Supply minus return pressure."),
    ("cdu", "reservoir_level_pct"): ("reservoir_level_ratio", "gauge", "Coolant reservoir level (0-1)."),
    ("cdu", "heat_removed_kw"): ("heat_removed_watts", "gauge", "Heat the CDU moves to facility water."),
    ("cdu", "gpu_heat_load_kw"): (
        "gpu_heat_load_watts",
        "gauge",
        "Power drawn by the GPUs this CDU cools (sum of their power, derived by podagent).",
    ),
    ("cdu", "pump_running"): ("pump_running", "gauge", "1 while the coolant pump runs."),
    ("cdu", "pump_fault"): ("pump_fault", "gauge", "1 while the CDU reports a pump fault."),
    ("cdu", "pump_speed_pct"): ("pump_speed_ratio", "gauge", "Pump speed (0-1 of full speed)."),
    ("cdu", "leak"): ("leak_detected", "gauge", "1 while a leak detector of the loop reports a leak."),
    ("cdu", "alarms"): ("alarm_mask", "gauge", "The CDU's alarm word (bitmask; see its profile)."),
    ("cdu", "setpoint_c"): ("supply_temp_setpoint_celsius", "gauge", "Coolant supply temperature setpoint."),
    ("chiller", "supply_temp_c"): ("supply_temp_celsius", "gauge", "Chilled-water supply temperature."),
    ("chiller", "return_temp_c"): ("return_temp_celsius", "gauge", "Chilled-water return temperature."),
    ("chiller", "running"): ("running", "gauge", "1 while the chiller runs."),
    ("chiller", "tripped"): (
        "safety_trip",
        "gauge",
        "1 while the chiller is locked out on a safety trip (needs a reset at the unit).",
    ),
    ("chiller", "alarms"): ("alarm_mask", "gauge", "The chiller's alarm word (bitmask; see its profile)."),
    ("chiller", "compressor_pct"): ("compressor_load_ratio", "gauge", "Compressor load (0-1)."),
    ("chiller", "load_kw"): ("cooling_load_watts", "gauge", "Heat the chiller removes now."),
    ("chiller", "capacity_kw"): ("cooling_capacity_watts", "gauge", "Heat the chiller can remove at most."),
    ("chiller", "setpoint_c"): ("supply_temp_setpoint_celsius", "gauge", "Chilled-water supply setpoint."),
    ("battery", "soc_pct"): ("state_of_charge_ratio", "gauge", "Battery state of charge (0-1)."),
    ("battery", "power_w"): ("power_watts", "gauge", "Battery power (+ discharging, - charging)."),
    ("battery", "max_charge_w"): ("charge_limit_watts", "gauge", "Highest charge power the BMS allows now."),
    ("battery", "max_discharge_w"): (
        "discharge_limit_watts",
        "gauge",
        "Highest discharge power the BMS allows now.",
    ),
    ("battery", "faults"): ("fault_mask", "gauge", "The BMS fault word (bitmask; see its profile)."),
    ("battery", "capacity_wh"): ("capacity_joules", "gauge", "Usable battery capacity."),
    ("battery", "energy_charged_wh"): (
        "energy_charged_joules_total",
        "counter",
        "Energy charged into the battery.",
    ),
    ("battery", "energy_discharged_wh"): (
        "energy_discharged_joules_total",
        "counter",
        "Energy discharged from the battery.",
    ),
    ("battery", "power_setpoint_w"): (
        "power_setpoint_watts",
        "gauge",
        "Power setpoint (+ discharge), mode 0.",
    ),
    ("battery", "mode"): (
        "control_mode",
        "gauge",
        "BMS control mode: 0 follows the power setpoint, 1 holds grid import at the grid target.",
    ),
    ("battery", "grid_target_w"): (
        "grid_target_watts",
        "gauge",
        "Grid import target the BMS holds (mode 1).",
    ),
    ("meter", "power_w"): ("power_watts", "gauge", "Site power at the meter (+ import from the grid)."),
    ("meter", "energy_import_wh"): (
        "energy_import_joules_total",
        "counter",
        "Energy imported from the grid.",
    ),
    ("meter", "energy_export_wh"): ("energy_export_joules_total", "counter", "Energy exported to the grid."),
    ("host", "cpu_pct"): ("cpu_utilization_ratio", "gauge", "CPU busy (0-1) of the controller host."),
    ("host", "load1"): ("load1", "gauge", "1-minute load average of the controller host."),
    ("host", "mem_used_pct"): ("memory_used_ratio", "gauge", "Memory in use (0-1) on the controller host."),
    ("host", "mem_available_bytes"): ("memory_available_bytes", "gauge", "Memory available on the host."),
    ("host", "disk_used_pct"): (
        "disk_used_ratio",
        "gauge",
        "Disk space in use (0-1), per mount (label disk).",
    ),
    ("host", "temp_c"): ("temp_celsius", "gauge", "Hottest temperature sensor of the controller host."),
    ("host", "uptime_s"): ("boot_time_seconds", "gauge", "Unix time the controller host booted."),
}
# A Modbus-metered feed whose power the PDUs already count (``pod_power = false``): PDU readings,
# own families, so sum(podagent_pdu_power_watts) never counts a feed twice.
_ALIAS = {"branch_meter": "pdu"}
POD_POWER = Family(
    "podagent_pod_power_watts",
    "gauge",
    "The pod's IT power: sum of the power of the PDUs that feed it (never the meter or battery).",
    (),
    "derived",
)

# Unit suffix of a reading -> (Prometheus unit, scale to it).
UNITS: dict[str, tuple[str, float]] = {
    "c": ("celsius", 1.0),
    "w": ("watts", 1.0),
    "kw": ("watts", 1000.0),
    "a": ("amperes", 1.0),
    "v": ("volts", 1.0),
    "va": ("voltamperes", 1.0),
    "wh": ("joules", 3600.0),
    "mj": ("joules", 0.001),
    "kpa": ("pascals", 1000.0),
    "lpm": ("cubic_meters_per_second", 1.0 / 60000.0),
    "pct": ("ratio", 0.01),
    "mhz": ("hertz", 1e6),
    "s": ("seconds", 1.0),
    "bytes": ("bytes", 1.0),
}
_CHANNEL = re.compile(r"^(phase|outlet|inlet)(\d+)_(.+)$")
_NODE_REFUSED = re.compile(r"^node_rejected_([a-z_]+)_total$")
_DISK = re.compile(r"^disk_(?:(.+)_)?used_pct$")
_SAFE = re.compile(r"[^a-zA-Z0-9_]")


def _scale_of(metric: str) -> float:
    _, _, suffix = metric.rpartition("_")
    return UNITS[suffix][1] if suffix in UNITS else 1.0


@functools.lru_cache(maxsize=8192)
def device_metric(role: str, metric: str) -> DeviceMetric:
    """A configured device's reading (``pdu``, ``phase1_current_a``) -> its family and scale."""
    channel: tuple[str, str] | None = None
    quantity = metric
    m = _CHANNEL.match(metric)
    if m:
        channel = (m.group(1), m.group(2))
        quantity = f"{m.group(1)}_{m.group(3)}"
    if role == "node" and (r := _NODE_REFUSED.match(metric)):
        channel = ("reason", r.group(1))
        quantity = "node_rejected_total"
    if role == "host":
        d = _DISK.match(metric)
        if d:
            channel = ("disk", d.group(1) or "root")
            quantity = "disk_used_pct"
    labels = DEVICE + ((channel[0],) if channel else ())
    named = _NAMED.get((_ALIAS.get(role, role), quantity))
    transform = "boot_time" if (role, quantity) == ("host", "uptime_s") else ""
    if named is not None:
        suffix, kind, help_ = named
        if role in _ALIAS:
            help_ = f"{role.replace('_', ' ').capitalize()} (measures what PDUs already count): {help_}"
        scale = 1.0 if transform else _scale_of(quantity)
        fam = Family(f"podagent_{role}_{suffix}", kind, help_, labels, f"{role} {quantity}")
        return DeviceMetric(fam, scale, channel, transform)
    # A metric a profile gained that this table does not know yet: still a valid, helped family.
    base, _, suffix = quantity.rpartition("_")
    unit, scale = UNITS.get(suffix, ("", 1.0)) if base else ("", 1.0)
    name = f"{base}_{unit}" if unit else quantity
    kind = "counter" if name.endswith("_total") else "gauge"
    fam = Family(
        _SAFE.sub("_", f"podagent_{role}_{name}"),
        kind,
        f"{quantity} of a {role} device (from its profile; unit {unit or 'none'}).",
        labels,
        f"{role} {quantity}",
    )
    return DeviceMetric(fam, scale, channel)


@functools.lru_cache(maxsize=1024)
def gpu_metric(metric: str) -> DeviceMetric:
    """An NVML reading of one GPU -> its dcgm-exporter (or podagent_gpu_*) family."""
    if metric in DCGM:
        name, kind, scale, help_ = DCGM[metric]
        # dcgm-exporter's MiB are whole (bytes // 2**20).
        floor = "floor" if scale == _MIB else ""
        return DeviceMetric(Family(name, kind, help_, GPU_LABELS, f"nvml {metric}"), scale, None, floor)
    if metric.startswith("throttle_"):
        return DeviceMetric(GPU_CLOCK_EVENT, 1.0, ("reason", metric.removeprefix("throttle_")))
    if metric in _GPU_OWN:
        name, kind, help_ = _GPU_OWN[metric]
        return DeviceMetric(Family(name, kind, help_, GPU_LABELS, f"nvml {metric}"), _scale_of(metric))
    base, _, suffix = metric.rpartition("_")
    unit, scale = UNITS.get(suffix, ("", 1.0)) if base else ("", 1.0)
    name = _SAFE.sub("_", f"podagent_gpu_{base}_{unit}" if unit else f"podagent_gpu_{metric}")
    kind = "counter" if name.endswith("_total") else "gauge"
    return DeviceMetric(
        Family(name, kind, f"NVML reading {metric} of the GPU.", GPU_LABELS, f"nvml {metric}"), scale
    )


# -- the agent's own families ----------------------------------------------------------------
AGENT: tuple[Family, ...] = (
    Family(
        "podagent_build_info", "gauge", "Always 1; the podagent version in its label.", ("version",), "agent"
    ),
    Family(
        "podagent_ready", "gauge", "1 once every device has been polled once (systemd READY=1).", (), "agent"
    ),
    Family("podagent_uptime_seconds", "gauge", "Seconds since this podagent process started.", (), "agent"),
    Family(
        "podagent_device_info",
        "gauge",
        "Always 1 for a configured device; its role (pdu, cdu, ...), driver kind and profile in labels.",
        ("device", "role", "driver", "profile"),
        "config",
    ),
    Family(
        "podagent_device_up",
        "gauge",
        "1 when the device's last poll succeeded and its data is fresh.",
        DEVICE,
        "poller",
    ),
    Family(
        "podagent_device_data_age_seconds",
        "gauge",
        "Seconds since the device last answered a poll (the age of its newest data).",
        DEVICE,
        "poller",
    ),
    Family(
        "podagent_device_polls_total",
        "counter",
        "Polls of the device, failed ones included.",
        DEVICE,
        "poller",
    ),
    Family(
        "podagent_device_poll_errors_total", "counter", "Polls of the device that failed.", DEVICE, "poller"
    ),
    Family(
        "podagent_poll_duration_seconds",
        "histogram",
        "Duration of one poll cycle of the device.",
        (*DEVICE, "le"),
        "poller",
    ),
    Family(
        "podagent_poll_missed_deadlines_total",
        "counter",
        "Poll cycles that started later than their schedule (the previous one overran).",
        DEVICE,
        "poller",
    ),
    Family(
        "podagent_driver_restarts_total",
        "counter",
        "Times the device's driver crashed and was restarted.",
        DEVICE,
        "poller",
    ),
    POD_POWER,
    Family(
        "podagent_mqtt_connected",
        "gauge",
        "1 while the MQTT publisher is connected to a broker.",
        ("broker",),
        "mqtt",
    ),
    Family("podagent_mqtt_connects_total", "counter", "Successful connections to a broker.", (), "mqtt"),
    Family(
        "podagent_mqtt_published_messages_total", "counter", "Messages the broker acknowledged.", (), "mqtt"
    ),
    Family("podagent_mqtt_spool_messages", "gauge", "Messages waiting in the disk spool.", (), "mqtt"),
    Family("podagent_mqtt_spool_bytes", "gauge", "Bytes the disk spool holds.", (), "mqtt"),
    Family("podagent_mqtt_spool_capacity_bytes", "gauge", "The disk spool's size limit.", (), "mqtt"),
    Family(
        "podagent_mqtt_spool_dropped_messages_total",
        "counter",
        "Telemetry messages dropped from a full spool (oldest first).",
        (),
        "mqtt",
    ),
    Family(
        "podagent_mqtt_commands_total",
        "counter",
        "MQTT commands received, by result (accepted, refused).",
        ("result",),
        "mqtt",
    ),
)

# Families the interlock and power services register (their ``metrics()``), for the reference and
# for their type. Histograms come as _bucket/_sum/_count samples of the family named here.
SERVICES: tuple[Family, ...] = (
    Family(
        "podagent_interlock_active",
        "gauge",
        "1 while the interlock is tripped on the device.",
        ("interlock", "device"),
        "interlocks",
    ),
    Family(
        "podagent_gpu_power_cap_watts",
        "gauge",
        "The power cap the interlocks (and budget) ask for this GPU.",
        GPU_LABELS,
        "interlocks",
    ),
    Family("podagent_interlock_overrides_active", "gauge", "Interlock overrides in force.", (), "interlocks"),
    Family(
        "podagent_interlock_evaluations_total", "counter", "Interlock engine evaluations.", (), "interlocks"
    ),
    Family(
        "podagent_interlock_full_evaluations_total",
        "counter",
        "Interlock engine evaluations of every rule and GPU (the rest are partial).",
        (),
        "interlocks",
    ),
    Family(
        "podagent_interlock_coalesced_batches_total",
        "counter",
        "Input batches far from every threshold that waited to be evaluated with later ones.",
        (),
        "interlocks",
    ),
    Family(
        "podagent_interlock_evaluation_duration_seconds",
        "histogram",
        "Duration of one interlock engine evaluation.",
        ("le",),
        "interlocks",
    ),
    Family(
        "podagent_actuation_failing_gpus",
        "gauge",
        "GPUs whose power limit could not be set.",
        (),
        "interlocks",
    ),
    Family(
        "podagent_pod_power_budget_watts",
        "gauge",
        "The pod's IT power budget now (lowest source).",
        (),
        "power",
    ),
    Family("podagent_pod_gpu_power_budget_watts", "gauge", "The budget left for the GPUs.", (), "power"),
    Family("podagent_pod_grid_target_watts", "gauge", "The ramped grid import target.", (), "power"),
    Family(
        "podagent_pod_battery_setpoint_watts",
        "gauge",
        "Battery power the power service asks (+ discharge).",
        (),
        "power",
    ),
    Family(
        "podagent_pod_grid_ramp_watts_per_second",
        "gauge",
        "Grid import rate of change.",
        (),
        "power",
    ),
    Family("podagent_pod_budget_capped_gpus", "gauge", "GPUs capped by the power budget.", (), "power"),
    Family(
        "podagent_pod_grid_contract_ratio",
        "gauge",
        "Grid contract term: measured / limit over the window evaluated (1 = at the limit).",
        ("term",),
        "power",
    ),
    Family(
        "podagent_pod_grid_contract_outside_seconds",
        "gauge",
        "Time the grid import broke this contract term, in the window evaluated.",
        ("term",),
        "power",
    ),
    Family(
        "podagent_pod_grid_contract_binding",
        "gauge",
        "1 for the contract term closest to (or furthest past) its limit.",
        ("term",),
        "power",
    ),
    Family(
        "podagent_pod_grid_contract_band_share_ratio",
        "gauge",
        "Share of the grid import's swing energy inside the contract's band (0-1).",
        (),
        "power",
    ),
    Family(
        "podagent_pod_curtail_active",
        "gauge",
        "1 while a fleet curtailment order is in force (its target held or being released).",
        (),
        "power",
    ),
    Family(
        "podagent_pod_curtail_limit_watts",
        "gauge",
        "Grid import limit the curtailment order sets now (rises at the ramp after its end).",
        (),
        "power",
    ),
    Family(
        "podagent_pod_curtail_target_watts",
        "gauge",
        "Grid import the curtailment order asks for (a fraction: of the import at its start).",
        (),
        "power",
    ),
    Family(
        "podagent_pod_curtail_delivered_watts",
        "gauge",
        "Import at the order's start minus the mean site meter import since the target was reached.",
        (),
        "power",
    ),
    Family(
        "podagent_pod_curtail_reached_seconds",
        "gauge",
        "Time from the order's start to the first site meter reading at its target.",
        (),
        "power",
    ),
)
# The controller's own view of each GPU server's node agent (a ``kind = "node"`` device).
NODES: tuple[Family, ...] = (
    Family(
        "podagent_node_up",
        "gauge",
        "1 while the controller hears from the GPU server's node agent (its last poll succeeded).",
        ("node", "Hostname"),
        "controller",
    ),
    Family(
        "podagent_node_lease_age_seconds",
        "gauge",
        "Seconds since the node agent last acknowledged a lease (a poll or a cap); past the node's "
        "controller_lost_after_s, a live node applies its fail-safe cap.",
        ("node", "Hostname"),
        "controller",
    ),
)
PLANNED: tuple[Family, ...] = ()
KNOWN: dict[str, Family] = {f.name: f for f in (*AGENT, *SERVICES, *NODES)}


# -- the reference --------------------------------------------------------------------------
def _profile_metrics() -> dict[str, set[str]]:
    """role -> the metric names the shipped profiles define (channels as phase1, outlet1)."""
    import tomllib

    from agent.config import profile_path

    out: dict[str, set[str]] = {}
    for path in sorted(Path(profile_path("apc-rpdu2")).parent.glob("*.toml")):
        data = tomllib.loads(path.read_text())
        kind = data.get("device", {}).get("kind", "pdu")
        names = [m.get("name", "") for m in data.get("metrics", [])]
        names += [p.get("metric", "") for p in data.get("points", [])]
        out.setdefault(kind, set()).update(n.replace("{n}", "1") for n in names if n)
    return out


def reference_markdown() -> str:
    rows: dict[str, Family] = {}
    for role, metrics in _profile_metrics().items():
        for metric in metrics:
            for as_role in (role, *(alias for alias, real in _ALIAS.items() if real == role)):
                fam = device_metric(as_role, metric).family
                rows.setdefault(fam.name, fam)
    rows.setdefault("podagent_cdu_gpu_heat_load_watts", device_metric("cdu", "gpu_heat_load_kw").family)
    for metric in (
        "cpu_pct",
        "load1",
        "mem_used_pct",
        "mem_available_bytes",
        "disk_used_pct",
        "temp_c",
        "uptime_s",
    ):
        fam = device_metric("host", metric).family
        rows.setdefault(fam.name, fam)
    for metric in (*DCGM, *_GPU_OWN):
        fam = gpu_metric(metric).family
        rows.setdefault(fam.name, fam)
    rows.setdefault(GPU_CLOCK_EVENT.name, GPU_CLOCK_EVENT)
    for metric in (
        "node_controller_lost",
        "node_lease_hold",
        "node_failsafe_entered_total",
        "node_rejected_mac_total",
        "node_interlock_trips_total",
        "node_cap_failures_total",
        "node_stale_leases_total",
        "node_uptime_s",
    ):
        fam = device_metric("node", metric).family
        rows.setdefault(fam.name, fam)
    for fam in (*AGENT, *SERVICES, *NODES, *PLANNED):
        rows.setdefault(fam.name, fam)
    lines = [
        "# podagent metrics reference",
        "",
        "Generated from `agent/publish/metrics_catalog.py` and the shipped profiles by",
        "`python -m agent.publish.metrics_catalog > docs/metrics.md` (a test checks it is current).",
        "",
        "Samples carry no timestamps: a device that stops answering has its value series dropped",
        "from /metrics at once (Prometheus marks them stale on the next scrape), while",
        "`podagent_device_up` (0) and `podagent_device_data_age_seconds` stay.",
        "GPU families use dcgm-exporter's names, units and labels; podagent_* ones use base units.",
        "`podagent_node_*` with a `node` label is the controller's view of each GPU server's node agent;",
        "with a `device` label, what the node agent reported in its last answer (docs/node.md).",
        "Roles: SNMP PDUs and Modbus PDUs with `pod_power = true` are `pdu`; a Modbus PDU/branch meter",
        "with `pod_power = false` is `branch_meter` (it measures what PDUs already count); Modbus units",
        "take their profile's `kind` (cdu, chiller, battery, meter); the controller itself is `host`.",
        "",
        "| family | type | labels | help | from |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(rows):
        fam = rows[name]
        labels = ", ".join(f"`{label}`" for label in fam.labels)
        lines.append(f"| `{name}` | {fam.kind} | {labels} | {fam.help} | {fam.source} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
