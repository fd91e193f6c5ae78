"""Pod description files (``hwsim/pods/*.toml`` or any path): parsed and validated here.

A bad file gives one clear line naming the file, the key and what was expected (``PodSpecError``).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

POD_DIR = Path(__file__).resolve().parent / "pods"
BUILTIN_PODS = ("tiny", "demo", "full")


class PodSpecError(Exception):
    """A pod file that cannot be used; the message is the one line the user sees."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuSpec(_Spec):
    name: str = "NVIDIA H100 80GB HBM3"
    default_limit_w: float = Field(700.0, gt=0)
    min_limit_w: float = Field(200.0, gt=0)
    max_limit_w: float = Field(700.0, gt=0)
    idle_w: float = Field(70.0, ge=0)
    # Die-to-coolant thermal resistance and time constant: at 644 W and 30 C coolant the die sits at
    # ~65 C, and a step from idle to full power settles in ~3 tau (24 s), like an SXM module on a cold plate.
    r_c_per_w: float = Field(0.055, gt=0)
    tau_s: float = Field(8.0, gt=0)
    memory_gib: int = 80
    # Blackwell-class (GB200/GB300): NVIDIA power smoothing in firmware (a floor as % of TMP, ramp
    # rates, ramp-down hysteresis). H100: not supported (NVML answers NOT_SUPPORTED).
    power_smoothing: bool = False

    @model_validator(mode="after")
    def _limits(self) -> GpuSpec:
        if not self.min_limit_w <= self.default_limit_w <= self.max_limit_w:
            raise ValueError("need min_limit_w <= default_limit_w <= max_limit_w")
        return self


class ServerSpec(_Spec):
    count: int = Field(ge=1, le=1024)
    gpus_per_server: int = Field(8, ge=1, le=72)
    base_w: float = Field(1800.0, ge=0)
    outlets_per_feed: int = Field(3, ge=1, le=6)
    psu_efficiency: float = Field(0.94, gt=0.5, le=1.0)
    # Share of the server's non-GPU heat that goes to the liquid loop (the rest goes to air).
    base_heat_to_liquid: float = Field(0.5, ge=0, le=1)


class WorkloadSpec(_Spec):
    profile: Literal["training", "synchronized", "steady", "idle"] = "training"
    period_s: float = Field(12.0, gt=0)  # one training step: compute, then communication
    duty: float = Field(0.75, gt=0, lt=1)
    high: float = Field(0.92, ge=0, le=1.2)  # fraction of the default power limit while computing
    low: float = Field(0.35, ge=0, le=1.2)  # ... while communicating
    level: float = Field(0.9, ge=0, le=1.2)  # for "steady"
    spike_per_s: float = Field(0.05, ge=0)  # short power spikes per GPU per second
    spike: float = Field(0.12, ge=0)
    # Checkpoint pauses ("training"/"synchronized"): after every K steps, all GPUs drop to
    # checkpoint_level for checkpoint_s while the job writes its checkpoint (0: never).
    checkpoint_every: int = Field(0, ge=0)
    checkpoint_s: float = Field(20.0, gt=0)
    checkpoint_level: float = Field(0.05, ge=0, le=1.2)


class SnmpEndpoint(_Spec):
    version: Literal["2c", "3"] = "2c"
    community: str = "public"
    user: str | None = None
    auth_key: str | None = None
    priv_key: str | None = None
    port: int = Field(0, ge=0, le=65535)

    @model_validator(mode="after")
    def _v3(self) -> SnmpEndpoint:
        if self.version == "3" and not (self.user and self.auth_key and self.priv_key):
            raise ValueError("SNMP v3 needs user, auth_key and priv_key")
        if self.version == "3" and (len(self.auth_key or "") < 8 or len(self.priv_key or "") < 8):
            raise ValueError("SNMP v3 keys need at least 8 characters")
        return self


class ModbusEndpoint(_Spec):
    transport: Literal["tcp", "rtu"] = "tcp"
    unit: int = Field(1, ge=1, le=247)
    port: int = Field(0, ge=0, le=65535)
    bus: str = "rtu0"  # RTU line name; units with the same bus share one serial line


class PduSpec(_Spec):
    id: str
    vendor: Literal["apc", "raritan", "modbus"]
    model: str = ""
    rating_a: float = Field(gt=0)
    outlets: int = Field(24, ge=1, le=64)
    servers: list[int] = Field(default_factory=list)
    partner: str | None = None  # the other feed (A/B) of the same servers
    measures: list[str] = Field(default_factory=list)  # a meter: sums these PDUs, one channel each
    voltage_v: float = 230.0
    power_factor: float = Field(0.97, gt=0, le=1)
    snmp: SnmpEndpoint | None = None
    modbus: ModbusEndpoint | None = None

    @model_validator(mode="after")
    def _endpoint(self) -> PduSpec:
        if self.vendor == "modbus" and self.modbus is None:
            raise ValueError("a vendor = 'modbus' PDU needs a modbus endpoint")
        if self.vendor != "modbus" and self.snmp is None:
            raise ValueError(f"a vendor = '{self.vendor}' PDU needs an snmp endpoint")
        return self


class CduSpec(_Spec):
    id: str
    servers: list[int]
    setpoint_c: float = 30.0
    nominal_flow_lpm: float = Field(gt=0)
    min_flow_lpm: float | None = None
    loop_volume_l: float = Field(gt=0)
    ua_kw_per_k: float = Field(gt=0)  # heat exchanger conductance at nominal flow
    modbus: ModbusEndpoint = ModbusEndpoint()


class ChillerSpec(_Spec):
    id: str
    cdus: list[str]
    setpoint_c: float = 20.0
    capacity_kw: float = Field(gt=0)
    water_volume_l: float = Field(gt=0)  # facility water between chiller and CDUs
    modbus: ModbusEndpoint = ModbusEndpoint()
    # Electrical input: fans/pumps + heat removed / COP (a water-cooled screw chiller: COP ~4-6).
    cop: float = Field(4.5, gt=0)
    fixed_kw: float = Field(1.0, ge=0)


class BatterySpec(_Spec):
    id: str = "bms-1"
    capacity_kwh: float = Field(20.0, gt=0)
    max_charge_kw: float = Field(40.0, gt=0)
    max_discharge_kw: float = Field(40.0, gt=0)
    soc_pct: float = Field(60.0, ge=0, le=100)
    soc_min_pct: float = Field(5.0, ge=0, le=100)
    soc_max_pct: float = Field(95.0, ge=0, le=100)
    efficiency: float = Field(0.95, gt=0.5, le=1.0)
    modbus: ModbusEndpoint = ModbusEndpoint()


class SiteMeterSpec(_Spec):
    id: str = "site-meter"
    modbus: ModbusEndpoint = ModbusEndpoint()


class PodSpec(_Spec):
    name: str
    tick_s: float = Field(0.1, ge=0.01, le=5)
    run_dir: str | None = None
    gpu: GpuSpec = GpuSpec()
    servers: ServerSpec
    workload: WorkloadSpec = WorkloadSpec()
    pdu: list[PduSpec] = Field(default_factory=list)
    cdu: list[CduSpec] = Field(default_factory=list)
    chiller: list[ChillerSpec] = Field(default_factory=list)
    battery: BatterySpec | None = None
    site_meter: SiteMeterSpec | None = None

    @model_validator(mode="after")
    def _references(self) -> PodSpec:
        ids = [d.id for d in [*self.pdu, *self.cdu, *self.chiller]]
        ids += [d.id for d in (self.battery, self.site_meter) if d is not None]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate device id(s): {', '.join(dupes)}")
        pdu_ids = {p.id for p in self.pdu}
        for p in self.pdu:
            bad = [s for s in p.servers if not 0 <= s < self.servers.count]
            if bad:
                raise ValueError(f"pdu {p.id}: server index {bad[0]} outside 0..{self.servers.count - 1}")
            if p.partner is not None and p.partner not in pdu_ids:
                raise ValueError(f"pdu {p.id}: partner {p.partner!r} is not a pdu of this pod")
            for m in p.measures:
                if m not in pdu_ids:
                    raise ValueError(f"pdu {p.id}: measures {m!r}, not a pdu of this pod")
            need = len(p.servers) * self.servers.outlets_per_feed
            if need > p.outlets:
                raise ValueError(f"pdu {p.id}: {need} outlets needed for its servers, has {p.outlets}")
        cdu_ids = {c.id for c in self.cdu}
        for ch in self.chiller:
            for c in ch.cdus:
                if c not in cdu_ids:
                    raise ValueError(f"chiller {ch.id}: cdu {c!r} is not a cdu of this pod")
        for c in self.cdu:
            bad = [s for s in c.servers if not 0 <= s < self.servers.count]
            if bad:
                raise ValueError(f"cdu {c.id}: server index {bad[0]} outside 0..{self.servers.count - 1}")
        return self


def resolve_pod_path(pod: str) -> Path:
    """``tiny`` -> the built-in file; anything else is a path to a pod file."""
    if pod in BUILTIN_PODS:
        return POD_DIR / f"{pod}.toml"
    path = Path(pod)
    if not path.is_file():
        raise PodSpecError(
            f"unknown pod {pod!r}: not one of {', '.join(BUILTIN_PODS)} and no such file {path}"
        )
    return path


def load_pod_spec(pod: str) -> PodSpec:
    path = resolve_pod_path(pod)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise PodSpecError(f"{path}: not valid TOML: {err}") from err
    try:
        return PodSpec.model_validate(data)
    except ValidationError as err:
        raise PodSpecError(one_line(path, err)) from err


def one_line(path: Path, err: ValidationError) -> str:
    """A validation error as the one line a person sees: the file, the first key, the reason."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{path}: {loc}: {first['msg']}{more}"
