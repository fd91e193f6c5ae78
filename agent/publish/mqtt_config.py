"""The [mqtt] section of the agent config (validated like every other section).

Every knob of the fleet link lives here; ``docs/mqtt.md`` documents the wire format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from agent.config_base import Strict


class Deadband(Strict):
    """Report-by-exception for metrics matching ``pattern`` (fnmatch glob on ``metric`` or
    ``device/metric``): a reading is sent when it moved more than ``absolute`` (in the metric's
    unit) or ``relative`` (fraction of the last sent value) since the last value sent."""

    pattern: str = Field(min_length=1)
    absolute: Annotated[float, Field(ge=0)] | None = None
    relative: Annotated[float, Field(ge=0, le=10)] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Deadband:
        if self.absolute is None and self.relative is None:
            raise ValueError("a deadband needs `absolute` and/or `relative`")
        return self


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"broker {value!r}: expected HOST:PORT, e.g. mqtt.example.net:8883")
    return value


class MqttConfig(Strict):
    enabled: bool = False
    # Cluster nodes, tried in order; on failure the agent moves on to the next (failover).
    brokers: list[str] = Field(default_factory=lambda: ["127.0.0.1:1883"], min_length=1)
    client_id: str | None = None  # default: podagent-{site}-{pod}
    # "auto": MQTT 5, falling back to 3.1.1 when the broker refuses the protocol version.
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    connect_timeout_s: Annotated[float, Field(gt=0, le=120)] = 5.0
    # TLS (TLS 1.2+): on when tls = true or any TLS file is set. ca_file: the broker's CA (else
    # the system store); cert_file + key_file: the client certificate for mutual TLS.
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None  # read at start; the secret never sits in the config
    topic_root: str | None = None  # default: podagent/v1/{site}/{pod}
    deadbands: list[Deadband] = Field(default_factory=list)
    full_refresh_s: Annotated[float, Field(gt=0)] = 300.0  # every metric sent, deadband or not
    telemetry_period_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    state_min_interval_s: Annotated[float, Field(ge=0)] = 1.0  # retained `state` rate limit
    state_max_interval_s: Annotated[float, Field(gt=0)] = 60.0  # republished at least this often
    spool_path: Path | None = None  # default: {paths.state_dir}/mqtt-spool.sqlite
    # The spool's bound on disk (database + WAL + journal); over it the oldest telemetry goes first.
    spool_max_bytes: Annotated[int, Field(ge=1 << 16)] = 1 << 30  # 1 GiB
    # Events and command replies have their own allowance inside the bound (default: a quarter).
    spool_event_max_bytes: Annotated[int, Field(ge=1 << 12)] | None = None
    replay_window: Annotated[int, Field(ge=1, le=1000)] = 100  # publishes in flight
    # Spooled telemetry rows of one device a replayed message may carry (docs/mqtt.md, "Replay":
    # every sample in `readings`, the seqs in `seqs`); 1 replays one message per row, as before.
    replay_batch: Annotated[int, Field(ge=1, le=1000)] = 16
    command_hmac_key_file: Path | None = None  # when set, every command must carry a valid `sig`
    command_max_bytes: Annotated[int, Field(ge=256, le=1 << 20)] = 16384
    command_max_ttl_s: Annotated[float, Field(gt=0)] = 3600.0  # expires_at at most this far ahead
    # set_power_budget below this is refused (a typo or a unit slip would starve the pod); above
    # [power] site_limit_w (when set) too.
    command_budget_min_w: Annotated[float, Field(ge=0)] = 1000.0
    reconnect_min_s: Annotated[float, Field(gt=0)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0
    drain_on_stop_s: Annotated[float, Field(ge=0)] = 2.0  # on a clean stop, wait this long for PUBACKs

    @field_validator("brokers")
    @classmethod
    def _brokers(cls, value: list[str]) -> list[str]:
        return [_host_port(v) for v in value]

    @field_validator("topic_root")
    @classmethod
    def _root(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "+#") or value.endswith("/")):
            raise ValueError("topic_root: no wildcards, no trailing slash")
        return value

    @model_validator(mode="after")
    def _coherent(self) -> MqttConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs a username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must be >= reconnect_min_s")
        if self.state_max_interval_s < self.state_min_interval_s:
            raise ValueError("state_max_interval_s must be >= state_min_interval_s")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls or any(
            f is not None for f in (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        )

    def broker_addresses(self) -> list[tuple[str, int]]:
        out = []
        for b in self.brokers:
            host, _, port = b.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out
