"""The node agent's config (``podagent node --config FILE``; every key in config/node.example.toml).

A node config is told apart from a controller config by its ``[node]`` table (a controller's has
``[pod]``). Validation errors use the controller's ``ConfigError`` (file, key path, what was expected).
"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from agent.config_base import (
    ConfigError,
    ConfigProblem,
    Logging,
    NvmlDevice,
    Strict,
    inline_secrets,
    key_path,
    problem_message,
)
from agent.interlocks.config import (
    CoolantFlowLow,
    CoolantLeak,
    CoolantSupplyHigh,
    InterlockConfig,
    PduPhaseOvercurrent,
)

NodeIdStr = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:9410")
    return value


class NodeIdentity(Strict):
    # The id the controller's `kind = "node"` device has for this node; requests for another id
    # are refused (one pod key signs for every node of the pod).
    id: NodeIdStr
    # The Hostname label of this server's GPUs (dcgm-exporter's); empty: the host's name.
    hostname: str = ""

    def resolved_hostname(self) -> str:
        return self.hostname or socket.gethostname()


class NodeNvml(Strict):
    poll_interval_s: float = Field(1.0, gt=0, le=60)
    timeout_s: float = Field(2.0, gt=0, le=60)
    stale_after_polls: float = Field(3.0, ge=1)
    library: Literal["pynvml", "hwsim"] = "pynvml"
    hwsim_state: Path | None = None
    # hwsim only: which simulated server this node is (its GPUs alone are visible).
    hwsim_server: int | None = Field(None, ge=0)
    xid_events: bool = True
    slow_metrics_every: int = Field(10, ge=1, le=3600)
    # A controller poll finding the last NVML read older than this reads NVML once more before it
    # is answered: the controller's rules then see the temperature of its poll, not of this node's
    # last tick (crossing -> controller cap within one controller poll, not two). A value over
    # poll_interval_s turns it off (half the NVML reads when both poll at the same rate).
    fresh_on_poll_s: float = Field(0.25, ge=0, le=3600)

    @model_validator(mode="after")
    def _hwsim(self) -> NodeNvml:
        if self.library == "hwsim" and (self.hwsim_state is None or self.hwsim_server is None):
            raise ValueError("library = 'hwsim' needs hwsim_state and hwsim_server")
        return self

    def device(self) -> NvmlDevice:
        return NvmlDevice(
            id="gpus",
            kind="nvml",
            library=self.library,
            hwsim_state=self.hwsim_state,
            poll_interval_s=self.poll_interval_s,
            timeout_s=self.timeout_s,
            retries=0,
            stale_after_polls=self.stale_after_polls,
            xid_events=self.xid_events,
            slow_metrics_every=self.slow_metrics_every,
        )


def _node_interlocks() -> InterlockConfig:
    # Pod rules (coolant, PDU, shed) belong to the controller: a node has no such inputs.
    return InterlockConfig(
        coolant_supply_high=CoolantSupplyHigh(enabled=False),
        coolant_flow_low=CoolantFlowLow(enabled=False),
        coolant_leak=CoolantLeak(enabled=False),
        pdu_phase_overcurrent=PduPhaseOvercurrent(enabled=False),
    )


class NodeConfig(Strict):
    node: NodeIdentity
    # Where the controller reaches this node (the pod network); one port per node.
    listen: str = "0.0.0.0:9410"
    # The pod key shared by the controller and its nodes (>= 16 bytes, e.g. `openssl rand -hex 32`).
    key_file: Path
    # No valid request from the controller for this long: apply the fail-safe cap.
    controller_lost_after_s: float = Field(10.0, gt=0, le=3600)
    # The fail-safe cap, in % of each GPU's default power limit (never below its NVML minimum).
    failsafe_cap_pct: float = Field(60.0, gt=0, le=100)
    # A request issued further than this from the node's clock (either way) is refused.
    max_clock_skew_s: float = Field(5.0, gt=0, le=300)
    logging: Logging = Logging()
    nvml: NodeNvml = NodeNvml()
    # The node-local rules: gpu_overtemp, gpu_runaway, sensor_stale (on the GPU temperatures) and
    # the release ramp; the pod rules here are off and must stay off.
    interlocks: InterlockConfig = Field(default_factory=_node_interlocks)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _host_port(value)

    @model_validator(mode="after")
    def _only_gpu_rules(self) -> NodeConfig:
        il = self.interlocks
        on = [
            name
            for name, rule in (
                ("coolant_supply_high", il.coolant_supply_high),
                ("coolant_flow_low", il.coolant_flow_low),
                ("coolant_leak", il.coolant_leak),
                ("pdu_phase_overcurrent", il.pdu_phase_overcurrent),
            )
            if rule.enabled
        ]
        if on or il.shed.enabled:
            raise ValueError(
                f"interlocks: {', '.join(on or ['shed'])} are pod rules (the controller runs them); "
                "set enabled = false or leave them out"
            )
        return self

    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def _node_interlock_data(data: dict[str, object]) -> None:
    """A node's [interlocks] table defaults the pod rules to off (they must stay off)."""
    il = data.get("interlocks")
    if isinstance(il, dict):
        for name in ("coolant_supply_high", "coolant_flow_low", "coolant_leak", "pdu_phase_overcurrent"):
            rule = il.setdefault(name, {})
            if isinstance(rule, dict):
                rule.setdefault("enabled", False)


def parse_node_config(data: dict[str, object], path: Path | str = "<config>") -> NodeConfig:
    _node_interlock_data(data)
    try:
        cfg = NodeConfig.model_validate(data)
    except ValidationError as err:
        problems = [
            ConfigProblem(key=key_path(tuple(e["loc"]), data), message=problem_message(dict(e), NodeConfig))
            for e in err.errors()
        ]
        raise ConfigError(path, problems) from err
    try:
        with open(cfg.key_file, "rb") as f:
            key = f.read(4096).strip()
    except OSError as err:
        raise ConfigError(
            path, [ConfigProblem(key="key_file", message=f"cannot read {cfg.key_file}: {err.strerror}")]
        ) from None
    if len(key) < 16:
        raise ConfigError(
            path,
            [
                ConfigProblem(
                    key="key_file",
                    message=f"{cfg.key_file}: {len(key)} bytes is too short a pod key "
                    "(expected at least 16, e.g. `openssl rand -hex 32`)",
                )
            ],
        )
    return cfg


def read_toml(path: Path) -> dict[str, object]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(
            path, [ConfigProblem(key="(file)", message=f"cannot read: {err.strerror}")]
        ) from err
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, [ConfigProblem(key="(syntax)", message=f"not valid TOML: {err}")]) from err
    inline_secrets(data, path.parent)
    return data


def load_node_config(path: Path | str) -> NodeConfig:
    path = Path(path)
    data = read_toml(path)
    key_file = data.get("key_file")
    if isinstance(key_file, str) and not Path(key_file).is_absolute():
        data["key_file"] = str(path.parent / key_file)  # relative to the config file, as secrets
    return parse_node_config(data, path)


def is_node_config(path: Path) -> bool:
    """A config with a [node] table and no [pod] table is a node agent's."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # the controller's checker then reports the file's problem
    return "node" in data and "pod" not in data


__all__ = ["NodeConfig", "NodeIdentity", "NodeNvml", "is_node_config", "load_node_config"]
