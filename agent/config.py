"""Configuration: one TOML file, validated by pydantic. Every validation lives here.

A wrong config names the file, the key path and what was expected (see ``ConfigError``).
Secrets may come from files: any ``*_file`` key is read at load time into its sibling key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from agent.config_base import (
    ConfigError,
    ConfigProblem,
    DeviceBase,
    DeviceIdStr,
    Logging,
    NvmlDevice,
    Strict,
    inline_secrets,
    key_path,
    problem_message,
)
from agent.control.config import ControlConfig
from agent.interlocks.config import InterlockConfig
from agent.power.config import PowerConfig
from agent.publish.mqtt_config import MqttConfig

# Package data, so a non-editable install (a wheel, the .deb) finds them; config/profiles links here.
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"


class SnmpDevice(DeviceBase):
    kind: Literal["snmp"]
    profile: str
    host: str
    port: int = Field(161, ge=1, le=65535)
    version: Literal["2c", "3"] = "2c"
    community: str | None = None
    community_file: Path | None = None
    user: str | None = None
    auth_protocol: Literal["SHA", "SHA256", "MD5"] = "SHA"
    auth_key: str | None = None
    auth_key_file: Path | None = None
    priv_protocol: Literal["AES", "AES256", "DES"] = "AES"
    priv_key: str | None = None
    priv_key_file: Path | None = None
    max_repetitions: int = Field(25, ge=1, le=100)
    # "auto": v2c by podagent's own client ("native", agent/drivers/snmp_v2c.py, the cheapest); v3
    # with AES-128 or DES privacy by net-snmp's C library (netsnmp-cffi) when installed; pysnmp
    # otherwise (AES256: vendors disagree on its key extension).
    transport: Literal["auto", "native", "pysnmp", "netsnmp"] = "auto"
    # Walk the profile's slow tables (those with `every` > 1: outlets) every N polls instead of the
    # profile's N; 1 walks everything every poll.
    slow_table_every: int | None = Field(None, ge=1, le=3600)
    # Devices with the same poll_phase are polled at the same instant of their interval (as
    # NodeDevice's): the pod's PDUs are polled together, their phase currents reach the interlock
    # engine together, and the agent wakes once for all of them instead of once per PDU (a poll
    # woken alone, its code and data cold after ~40 ms of other work, costs a few times one that
    # runs right after another). None or "": the id's own phase (polls spread over the interval).
    poll_phase: str | None = "pdus"
    # Which GPUs each outlet's server carries, for the interlocks: {"1": ["gpu0", "gpu1"], ...}
    outlet_gpus: dict[str, list[str]] = Field(default_factory=dict)
    # Which GPUs the PDU feeds at all (phase overcurrent caps these).
    gpus: list[str] = Field(default_factory=list)
    # The same wiring by server (node devices' ids, or racks of them); the inventory expands them
    # to the servers' GPUs (srv-3 -> srv-3-gpu0...). For a pod of node agents, the form to use.
    servers: list[str] = Field(default_factory=list)
    racks: list[str] = Field(default_factory=list)
    outlet_servers: dict[str, list[str]] = Field(default_factory=dict)
    breaker_rating_a: float | None = Field(None, gt=0)

    @field_validator("host")
    @classmethod
    def _host_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected the PDU's host name or address, not an empty string")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> SnmpDevice:
        if self.version == "2c" and not (self.community or self.community_file):
            raise ValueError("SNMP v2c needs community or community_file")
        if self.version == "3":
            if not self.user:
                raise ValueError("SNMP v3 needs user")
            if not (self.auth_key or self.auth_key_file) or not (self.priv_key or self.priv_key_file):
                raise ValueError("SNMP v3 (authPriv) needs auth_key(_file) and priv_key(_file)")
        return self

    @model_validator(mode="after")
    def _transport_supports_version(self) -> SnmpDevice:
        if self.transport == "netsnmp" and self.version == "3" and self.priv_protocol == "AES256":
            raise ValueError(
                "transport 'netsnmp' does not do AES256 privacy (vendors disagree on its key"
                " extension): use 'pysnmp' or 'auto'"
            )
        if self.transport == "native" and self.version == "3":
            raise ValueError("transport 'native' is SNMP v2c only: use 'auto', 'netsnmp' or 'pysnmp' for v3")
        return self


class ModbusDevice(DeviceBase):
    kind: Literal["modbus"]
    profile: str
    transport: Literal["tcp", "rtu"] = "tcp"
    host: str | None = None
    port: int = Field(502, ge=1, le=65535)
    serial: Path | None = None
    baudrate: int = 19200
    parity: Literal["N", "E", "O"] = "N"
    unit: int = Field(1, ge=0, le=247)
    # Per-device quirks are config, not code.
    word_order: Literal["big", "little"] | None = None  # None: the profile's
    pause_between_requests_s: float = Field(0.0, ge=0, le=5)
    reconnect_per_poll: bool = False
    max_registers_per_read: int = Field(60, ge=1, le=125)
    # Modbus TCP: requests of one poll outstanding at once (matched by transaction id). 1, the
    # default, waits for each answer: some devices and gateways drop a request that arrives
    # while they answer another. None: the profile's ``max_in_flight``.
    max_in_flight: int | None = Field(None, ge=1, le=16)
    # A metered PDU or branch meter: does its power_w add to the pod's total? (Meters that measure
    # PDUs already counted would count twice.)
    pod_power: bool = False
    # For a CDU: the flow below which coolant_flow_low trips (None: [interlocks] default).
    min_flow_lpm: float | None = Field(None, ge=0)
    # Cooling loop this unit serves (for CDUs) and the GPUs on it; or the servers (node devices'
    # ids) and racks on it, which the inventory expands to their GPUs.
    gpus: list[str] = Field(default_factory=list)
    servers: list[str] = Field(default_factory=list)
    racks: list[str] = Field(default_factory=list)
    breaker_rating_a: float | None = Field(None, gt=0)
    # Devices with the same poll_phase are polled at the same instant of their interval (others sit
    # at a phase hashed from their id). A unit's poll is a few hundred microseconds of work, and
    # what the agent pays most for is being woken (a timer, then the answers: each wake-up of an
    # idle process costs ~170 us of CPU on a loaded 2-core host, cold caches): the `full` pod's 4
    # units polled together wake it 3-6 times a second instead of ~11, and its CPU per register
    # halves (bench/vs_collectd.py). Unset: "modbus" for TCP units; an RTU unit keeps its own
    # phase, since the units of one line take turns on it request by request and, started
    # together, each poll would last as long as all of them. "": the id's own phase.
    poll_phase: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shared_phase(cls, data: Any) -> Any:
        if isinstance(data, dict) and "poll_phase" not in data and data.get("transport", "tcp") == "tcp":
            return {**data, "poll_phase": "modbus"}
        return data

    @model_validator(mode="after")
    def _address(self) -> ModbusDevice:
        if self.transport == "tcp" and not self.host:
            raise ValueError("transport = 'tcp' needs host")
        if self.transport == "rtu" and not self.serial:
            raise ValueError("transport = 'rtu' needs serial (the serial device path)")
        return self


class HostDevice(DeviceBase):
    kind: Literal["host"]
    disk_paths: list[str] = Field(default_factory=lambda: ["/"])


class NodeDevice(DeviceBase):
    """A GPU server's node agent (``podagent node``), reached over the pod network (docs/node.md).
    Its GPUs are sub-devices ``{gpu_prefix}{local index}`` (default ``{id}-gpu0``...)."""

    kind: Literal["node"]
    host: str
    port: int = Field(9410, ge=1, le=65535)
    # The pod key shared with every node agent of the pod (>= 16 bytes).
    key_file: Path
    # How long each cap lease runs; every poll renews it. None: 3 poll intervals.
    lease_s: float | None = Field(None, gt=0, le=3600)
    # None: f"{id}-gpu" (pod-unique GPU ids, e.g. srv-3-gpu5).
    gpu_prefix: str | None = None
    # How many GPUs the server has (local indices 0..gpus-1). Known up front, the GPUs of a node
    # that is down when the controller starts are under the interlocks from the first step
    # (sensor_stale holds them), and PDU/loop wiring can name the server. None: found at the
    # first answer (and the wiring cannot name this server).
    gpus: int | None = Field(None, ge=1, le=256)
    # The rack the server sits in (a loop's or PDU's `racks` names it).
    rack: DeviceIdStr | None = None
    # Devices with the same poll_phase are polled at the same instant of their interval (others
    # sit at a phase hashed from their id). Every node's answer then lands in the same few
    # milliseconds, and the interlock engine evaluates the pod's GPUs in one step per poll, as it
    # does for a local NVML poll, not once per node (docs/node.md: the controller's cost per node).
    # None: the id's own phase.
    poll_phase: str | None = "nodes"

    def gpu_ids(self) -> list[str]:
        """The pod-unique ids of this server's GPUs, as the node driver names them ([] if the
        count is not configured)."""
        prefix = self.gpu_prefix if self.gpu_prefix is not None else f"{self.id}-gpu"
        return [f"{prefix}{i}" for i in range(self.gpus or 0)]

    @model_validator(mode="after")
    def _lease(self) -> NodeDevice:
        if self.lease_s is not None and self.lease_s <= self.poll_interval_s:
            raise ValueError("lease_s must be longer than poll_interval_s (every poll renews the lease)")
        return self


AnyDevice = Annotated[
    NvmlDevice | SnmpDevice | ModbusDevice | HostDevice | NodeDevice, Field(discriminator="kind")
]


def profile_path(name: str) -> Path:
    """``apc-rpdu2`` -> agent/profiles/apc-rpdu2.toml (a path with a slash is taken as is)."""
    if "/" in name or name.endswith(".toml"):
        return Path(name)
    return PROFILE_DIR / f"{name}.toml"


def read_secret(value: str | None, path: Path | None) -> str | None:
    if value is not None:
        return value
    if path is None:
        return None
    return path.read_text().strip()


class PodIdentity(Strict):
    site: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class Paths(Strict):
    state_dir: Path = Path("/var/lib/podagent")
    socket: Path = Path("/run/podagent/podagent.sock")


class Audit(Strict):
    """The local audit log (state_dir/audit.jsonl, every event) and its safety record
    (state_dir/safety.jsonl: trips, clears, actions, overrides, acks), kept by age whatever else
    is logged."""

    max_bytes: int = Field(10 * 2**20, ge=64 * 1024)
    backups: int = Field(5, ge=1, le=1000)
    safety_keep_days: float = Field(90.0, gt=0, le=3660)


class Prometheus(Strict):
    enabled: bool = True
    listen: str = "127.0.0.1:9400"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9400")
        return value


class AgentConfig(Strict):
    pod: PodIdentity
    paths: Paths = Paths()
    logging: Logging = Logging()
    audit: Audit = Audit()
    prometheus: Prometheus = Prometheus()
    mqtt: MqttConfig = MqttConfig()
    control: ControlConfig = ControlConfig()
    interlocks: InterlockConfig = InterlockConfig()
    power: PowerConfig = PowerConfig()
    device: list[AnyDevice] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> AgentConfig:
        seen: set[str] = set()
        for dev in self.device:
            if dev.id in seen:
                raise ValueError(f"duplicate device id {dev.id!r}")
            seen.add(dev.id)
        return self

    def devices_by_id(self) -> dict[str, AnyDevice]:
        return {d.id: d for d in self.device}


def _message(err: dict[str, object]) -> str:
    return problem_message(err, AgentConfig, _DEVICE_MODELS)


_key_path = key_path
_inline_secrets = inline_secrets

_DEVICE_MODELS: dict[str, type[BaseModel]] = {
    "nvml": NvmlDevice,
    "snmp": SnmpDevice,
    "modbus": ModbusDevice,
    "host": HostDevice,
}


def parse_config(data: dict[str, object], path: Path | str = "<config>") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as err:
        problems = [
            ConfigProblem(key=_key_path(tuple(e["loc"]), data), message=_message(dict(e)))
            for e in err.errors()
        ]
        raise ConfigError(path, problems) from None


def load_config(path: Path | str) -> AgentConfig:
    """Read, validate and cross-check the config and every profile it names; ``ConfigError``
    lists every problem (file, key path, what was expected). Never raises anything else for a
    bad file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(
            path, [ConfigProblem(key="(file)", message=f"cannot read: {err.strerror}")]
        ) from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        message = f"byte 0x{raw[err.start]:02x} at line {line} is not UTF-8 (TOML files are UTF-8)"
        raise ConfigError(path, [ConfigProblem(key="(encoding)", message=message)]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, [ConfigProblem(key="(syntax)", message=f"not valid TOML: {err}")]) from None
    _inline_secrets(data, path.parent)
    # Profiles and the cross-checks between devices need the drivers' profile loaders (which
    # import this module): imported here, not at the top.
    from agent.validate import check_loaded, check_profiles_of

    try:
        config = parse_config(data, path)
    except ConfigError as err:
        # Still check the profiles the file names: every problem at once, not one file per run.
        raise ConfigError(path, err.problems + check_profiles_of(data)) from None
    problems = _check_secret_files(config)
    problems += check_loaded(config)
    if problems:
        raise ConfigError(path, problems)
    return config


def _check_secret_files(config: AgentConfig) -> list[ConfigProblem]:
    """Every ``*_file`` (secrets, TLS material) must be readable now: ``check-config`` saying "ok"
    about a password file that is not there would only move the failure to 3 am."""
    problems: list[ConfigProblem] = []

    def walk(model: BaseModel, key: str) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            where = f"{key}.{name}" if key else name
            if isinstance(value, BaseModel):
                walk(value, where)
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, BaseModel):
                        ident = getattr(item, "id", None)
                        label = f"(id={ident})" if isinstance(ident, str) else ""
                        walk(item, f"{where}[{i}]{label}")
            elif name.endswith("_file") and value is not None:
                try:
                    with open(value, "rb") as f:
                        head = f.read(4096)
                except OSError as err:
                    hint = " (check as the service user)" if isinstance(err, PermissionError) else ""
                    problems.append(
                        ConfigProblem(key=where, message=f"cannot read {value}: {err.strerror}{hint}")
                    )
                    continue
                if not head.strip():
                    problems.append(ConfigProblem(key=where, message=f"{value} is empty"))
                elif name == "command_hmac_key_file" and len(head.strip()) < 16:
                    problems.append(
                        ConfigProblem(
                            key=where,
                            message=f"{value}: {len(head.strip())} bytes is too short a signing key "
                            "(expected at least 16, e.g. `openssl rand -hex 32`)",
                        )
                    )

    walk(config, "")
    return problems


__all__ = [
    "AgentConfig",
    "AnyDevice",
    "ConfigError",
    "ConfigProblem",
    "DeviceBase",
    "DeviceIdStr",
    "HostDevice",
    "Logging",
    "ModbusDevice",
    "NodeDevice",
    "NvmlDevice",
    "SnmpDevice",
    "Strict",
    "ValidationError",
    "field_validator",
    "load_config",
    "parse_config",
    "profile_path",
    "read_secret",
    "tomllib",
]
