"""Device profiles (``config/profiles/*.toml``) checked as a whole: every problem of a profile file,
each with the file, the key path and what was expected (the nearest valid key for a typo).

The drivers' own loaders (``agent.drivers.modbus.load_profile``, ``agent.drivers.snmp.load_profile``)
stay the source of truth for the map itself; this module adds what they do not say: which keys
exist at all, the device's role (``[device] kind``), and problems listed together instead of the
first one raised.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from agent.config import PROFILE_DIR, ConfigProblem, profile_path
from agent.drivers.modbus import ModbusPoint, ModbusProfile
from agent.drivers.modbus import load_profile as load_modbus_profile
from agent.drivers.snmp import ProfileError, SnmpProfile
from agent.drivers.snmp import load_profile as load_snmp_profile

Protocol = Literal["snmp", "modbus"]
# What a device is, declared by its profile's [device] kind (never guessed from a file name).
ROLES: dict[Protocol, tuple[str, ...]] = {
    "snmp": ("pdu",),
    "modbus": ("pdu", "cdu", "chiller", "battery", "meter"),
}

_SNMP_TOP = ("device", "tables", "metrics", "control")
_SNMP_DEVICE = ("kind", "description")
_SNMP_TABLE = ("entry", "columns", "static", "every")
_SNMP_METRIC = (
    "name", "table", "column", "index", "scale", "unit", "digits", "map", "optional", "valid_range",
)  # fmt: skip
_SNMP_CONTROL = ("oid", "index", "on", "off")
_MODBUS_TOP = ("device", "points")
_MODBUS_DEVICE = ("kind", "description", "word_order")


@dataclass(frozen=True, slots=True)
class LoadedProfile:
    """A profile that passed every check: its role and the driver's parsed map."""

    name: str
    path: Path
    protocol: Protocol
    kind: str
    modbus: ModbusProfile | None = None
    snmp: SnmpProfile | None = None


def known_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _hint(key: str, valid: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(valid)})"


def unknown_keys(table: object, valid: tuple[str, ...], where: str, file: str) -> list[ConfigProblem]:
    if not isinstance(table, dict):
        return []
    return [
        ConfigProblem(file=file, key=f"{where}.{k}" if where else k, message="unknown key" + _hint(k, valid))
        for k in table
        if k not in valid
    ]


def read_toml(path: Path) -> tuple[dict[str, object] | None, list[ConfigProblem]]:
    """A TOML file as a dict, or the one problem that stops it being read (never raises)."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, [ConfigProblem(file=file, key="(file)", message=f"cannot read: {err.strerror}")]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return None, [
            ConfigProblem(
                file=file,
                key="(encoding)",
                message=f"byte 0x{raw[err.start]:02x} at line {line} is not UTF-8 (TOML files are UTF-8)",
            )
        ]
    try:
        return tomllib.loads(text), []
    except tomllib.TOMLDecodeError as err:
        return None, [ConfigProblem(file=file, key="(syntax)", message=f"not valid TOML: {err}")]


def _pydantic_problems(err: ValidationError, data: dict[str, object], file: str) -> list[ConfigProblem]:
    out: list[ConfigProblem] = []
    points = data.get("points")
    for e in err.errors():
        loc = tuple(e["loc"])
        parts: list[str] = []
        for i, item in enumerate(loc):
            if isinstance(item, int) and i > 0 and loc[i - 1] == "points":
                metric = None
                if isinstance(points, list) and 0 <= item < len(points) and isinstance(points[item], dict):
                    metric = points[item].get("metric")
                parts.append(f"[{item}]" + (f"(metric={metric})" if metric else ""))
            else:
                parts.append(("." if parts else "") + str(item))
        key = "".join(parts) or "(top level)"
        if loc and loc[0] != "points":
            key = f"device.{key}"  # [device] keys are merged into the model's top level
        if e["type"] == "extra_forbidden":
            valid: tuple[str, ...] = tuple(
                ModbusPoint.model_fields if len(loc) >= 3 and loc[0] == "points" else _MODBUS_DEVICE
            )
            message = "unknown key" + _hint(str(loc[-1]), valid)
        elif e["type"] == "missing":
            message = "required key is missing"
        else:
            shown = repr(e.get("input"))
            message = str(e["msg"]) + (
                "" if len(shown) > 60 or isinstance(e.get("input"), dict) else f" (got {shown})"
            )
        out.append(ConfigProblem(file=file, key=key, message=message))
    return out


def check_profile(name: str, protocol: Protocol) -> tuple[LoadedProfile | None, list[ConfigProblem]]:
    """Load a profile for a device of ``protocol``; every problem with file and key path."""
    path = profile_path(name)
    if not path.is_file():
        known = known_profiles()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return None, [
            ConfigProblem(
                key="profile",
                message=f"no profile {name!r} (looked for {path}); {hint}known: {', '.join(known)}",
            )
        ]
    file = str(path)
    data, problems = read_toml(path)
    if data is None:
        return None, problems
    device = data.get("device", {})
    if not isinstance(device, dict):
        return None, [ConfigProblem(file=file, key="device", message="expected a [device] table")]
    kind = device.get("kind")
    roles = ROLES[protocol]
    if kind is None:
        problems.append(
            ConfigProblem(
                file=file, key="device.kind", message=f"required: what the device is ({', '.join(roles)})"
            )
        )
    elif kind not in roles:
        problems.append(
            ConfigProblem(
                file=file,
                key="device.kind",
                message=f"{kind!r} is not a {protocol} device kind (expected one of: {', '.join(roles)})",
            )
        )
    if protocol == "modbus":
        problems += unknown_keys(data, _MODBUS_TOP, "", file)
        try:
            ModbusProfile.model_validate({**device, "points": data.get("points", [])})
        except ValidationError as err:
            problems += _pydantic_problems(err, {"points": data.get("points")}, file)
        if problems:
            return None, problems
        modbus = load_modbus_profile(name)
        return LoadedProfile(path.stem, path, protocol, str(kind), modbus=modbus), []
    problems += unknown_keys(data, _SNMP_TOP, "", file)
    problems += unknown_keys(device, _SNMP_DEVICE, "device", file)
    tables = data.get("tables")
    if isinstance(tables, dict):
        for tname, table in tables.items():
            problems += unknown_keys(table, _SNMP_TABLE, f"tables.{tname}", file)
    metrics = data.get("metrics")
    if isinstance(metrics, list):
        for i, metric in enumerate(metrics):
            label = metric.get("name") if isinstance(metric, dict) else None
            problems += unknown_keys(
                metric, _SNMP_METRIC, f"metrics[{i}]" + (f"(name={label})" if label else ""), file
            )
    problems += unknown_keys(data.get("control"), _SNMP_CONTROL, "control", file)
    try:
        snmp = load_snmp_profile(name)
    except (ProfileError, ValueError, KeyError, TypeError, AttributeError) as err:
        # The SNMP loader names the file and key itself; strip the file so it is not said twice.
        text = str(err).removeprefix(f"SNMP profile {path}: ").removeprefix(f"{path}: ")
        key, sep, message = text.partition(": ")
        problems.append(ConfigProblem(file=file, key=key if sep else "(profile)", message=message or text))
        return None, problems
    if problems:
        return None, problems
    return LoadedProfile(path.stem, path, protocol, str(kind), snmp=snmp), []


__all__ = ["ROLES", "LoadedProfile", "check_profile", "known_profiles", "read_toml", "unknown_keys"]
