"""What the controller's and the node agent's configs share: the strict model base, the NVML
device, logging, and how a bad file is reported (``ConfigError``: file, key path, what was
expected). Kept apart from agent/config.py so that a node agent does not build (and keep in memory)
every controller config model.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DeviceIdStr = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class DeviceBase(Strict):
    id: DeviceIdStr
    poll_interval_s: float = Field(1.0, gt=0, le=3600)
    timeout_s: float = Field(2.0, gt=0, le=60)
    retries: int = Field(1, ge=0, le=10)
    # Readings older than stale_after_polls intervals are STALE (design.md: 3 poll intervals).
    stale_after_polls: float = Field(3.0, ge=1)
    # Each cycle starts up to this many seconds (uniformly random) after its deadline, as
    # Telegraf's collection_jitter; deadlines already sit at a stable per-device phase.
    poll_jitter_s: float = Field(0.0, ge=0, le=60)


class NvmlDevice(DeviceBase):
    kind: Literal["nvml"]
    # "pynvml" is NVIDIA's binding (nvidia-ml-py); "hwsim" is the simulator's drop-in fake.
    library: Literal["pynvml", "hwsim"] = "pynvml"
    # For library = "hwsim": the shared-memory state file of the running simulated pod.
    hwsim_state: Path | None = None
    # Device ids given to the GPUs: f"{gpu_prefix}{index}" -> gpu0, gpu1, ...
    gpu_prefix: str = "gpu"
    xid_events: bool = True
    # Read the metrics that barely change (default limit, limit constraints, temperature
    # thresholds, ECC counts) every N polls instead of every poll; 1 reads everything every poll.
    # Their staleness limit stretches to match. Costs NVML calls on big hosts, as DCGM does.
    slow_metrics_every: int = Field(10, ge=1, le=3600)

    @model_validator(mode="after")
    def _hwsim_needs_state(self) -> NvmlDevice:
        if self.library == "hwsim" and self.hwsim_state is None:
            raise ValueError("library = 'hwsim' needs hwsim_state (path of the pod's NVML state file)")
        return self


class Logging(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "auto": human-friendly on a terminal, JSON lines otherwise (journald).
    format: Literal["auto", "json", "console"] = "auto"


class ConfigProblem(Strict):
    key: str
    message: str
    # The file the problem is in when it is not the config file itself (a profile).
    file: str | None = None


class ConfigError(Exception):
    """A config that cannot be used: every problem with its key path, and the file."""

    def __init__(self, path: Path | str, problems: list[ConfigProblem]) -> None:
        self.path = Path(path)
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.path}: {len(self.problems)} problem(s)"]
        lines += [f"{p.file or self.path}: {p.key}: {p.message}" for p in self.problems]
        return "\n".join(lines)


def key_path(loc: tuple[int | str, ...], data: object) -> str:
    """pydantic's loc -> a TOML key path a person recognises: device[2].port (device id "pdu-1")."""
    parts: list[str] = []
    node = data
    after_index = False
    for item in loc:
        if isinstance(item, int):
            after_index = True
            label = f"[{item}]"
            if isinstance(node, list) and 0 <= item < len(node):
                node = node[item]
                if isinstance(node, dict) and "id" in node:
                    label = f"[{item}](id={node['id']})"
            parts.append(label)
            continue
        if after_index and item in ("nvml", "snmp", "modbus", "host", "node") and parts[-1].startswith("["):
            after_index = False
            continue  # the discriminated-union tag pydantic inserts: not a key in the file
        after_index = False
        parts.append(("." if parts else "") + str(item))
        node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _valid_keys(
    loc: tuple[int | str, ...], root: type[BaseModel], tagged: Mapping[str, type[BaseModel]]
) -> list[str]:
    """The keys the config model accepts where pydantic found an unknown one."""
    model: type[BaseModel] | None = root
    for item in loc[:-1]:
        if model is None:
            return []
        if isinstance(item, int):
            continue
        # A discriminated union's tag (a device's kind): pydantic names the model it chose.
        if item in tagged and model in tagged.values():
            model = tagged[item]
            continue
        field = model.model_fields.get(item)
        model = None if field is None else _model_in(field.annotation)
    return [] if model is None else list(model.model_fields)


def problem_message(
    err: dict[str, object], root: type[BaseModel], tagged: Mapping[str, type[BaseModel]] | None = None
) -> str:
    """One pydantic error as a person reads it (an unknown key: the nearest valid one)."""
    msg = str(err.get("msg", "invalid"))
    kind = err.get("type")
    if kind == "extra_forbidden":
        loc = err.get("loc")
        valid = _valid_keys(tuple(loc), root, tagged or {}) if isinstance(loc, tuple | list) else []
        bad = str(loc[-1]) if isinstance(loc, tuple | list) and loc else ""
        close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.6)
        if close:
            return f"unknown key (did you mean {close[0]!r}?)"
        return "unknown key (a typo? see config/example.toml)"
    if kind == "missing":
        return "required key is missing"
    if "input" in err and kind not in ("missing",):
        shown = repr(err["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"{msg} (got {shown})"
    return msg


def inline_secrets(data: object, base: Path) -> None:
    """Read ``*_file`` secrets relative to the config file so errors point at the right key."""
    if isinstance(data, dict):
        for key, value in list(data.items()):
            if isinstance(value, dict | list):
                inline_secrets(value, base)
            elif key.endswith("_file") and isinstance(value, str) and not Path(value).is_absolute():
                data[key] = str(base / value)
    elif isinstance(data, list):
        for item in data:
            inline_secrets(item, base)
