"""Everything the daemon will load, checked before it loads it: the profiles each device names and
the cross-checks between devices (a GPU on two loops, GPU ids nobody has, outlets that are not
numbers, a state_dir that is a file). ``load_config`` calls this; so ``check-config``, ``run`` and
a reload refuse the same files for the same reasons.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping

from agent.config import AgentConfig, ConfigProblem, ModbusDevice, NodeDevice, NvmlDevice, SnmpDevice
from agent.drivers.modbus import PointRole, load_profile
from agent.inventory import expand_wiring, rack_servers, server_gpus
from agent.profiles import check_profile


def _where(i: int, dev_id: str) -> str:
    return f"device[{i}](id={dev_id})"


def check_profiles_of(data: dict[str, object]) -> list[ConfigProblem]:
    """The profiles a config names, when the config itself did not validate (its raw TOML)."""
    problems: list[ConfigProblem] = []
    devices = data.get("device")
    if not isinstance(devices, list):
        return problems
    for i, dev in enumerate(devices):
        if not isinstance(dev, dict):
            continue
        kind, name, dev_id = dev.get("kind"), dev.get("profile"), dev.get("id", "?")
        if kind in ("snmp", "modbus") and isinstance(name, str):
            _, found = check_profile(name, "snmp" if kind == "snmp" else "modbus")
            where = _where(i, str(dev_id))
            problems += [p if p.file else p.model_copy(update={"key": f"{where}.{p.key}"}) for p in found]
    return problems


def check_loaded(config: AgentConfig) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    roles: dict[str, str] = {}
    for i, dev in enumerate(config.device):
        if not isinstance(dev, SnmpDevice | ModbusDevice):
            continue
        profile, found = check_profile(dev.profile, dev.kind)
        problems += [
            p if p.file else p.model_copy(update={"key": f"{_where(i, dev.id)}.{p.key}"}) for p in found
        ]
        if profile is not None:
            roles[dev.id] = profile.kind
    problems += _cross_checks(config, roles)
    problems += _power_devices(config, roles)
    state_dir = config.paths.state_dir
    if state_dir.exists() and not state_dir.is_dir():
        problems.append(
            ConfigProblem(key="paths.state_dir", message=f"{state_dir} is a file; expected a directory")
        )
    return problems


def _cross_checks(config: AgentConfig, roles: dict[str, str]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    gpu_prefixes = [d.gpu_prefix for d in config.device if isinstance(d, NvmlDevice)]
    gpu_prefixes += [
        d.gpu_prefix if d.gpu_prefix is not None else f"{d.id}-gpu"
        for d in config.device
        if isinstance(d, NodeDevice)
    ]
    prefixes = [re.escape(p) for p in gpu_prefixes]
    # GPU ids are the NVML and node devices' f"{gpu_prefix}{index}"; with neither here (GPUs that
    # other agents report) there is nothing to check them against.
    gpu_id = re.compile(rf"^(?:{'|'.join(prefixes)})\d+$") if prefixes else None
    prefix_text = " or ".join(f"{p}N" for p in gpu_prefixes[:3]) + (" ..." if len(gpu_prefixes) > 3 else "")
    by_server, by_rack = server_gpus(config), rack_servers(config)

    def check_gpus(gpus: list[str], key: str) -> None:
        if gpu_id is None:
            return
        for g in gpus:
            if not gpu_id.match(g):
                problems.append(
                    ConfigProblem(key=key, message=f"unknown GPU {g!r} (GPU ids here are {prefix_text})")
                )

    cooled_by: dict[str, str] = {}
    for i, dev in enumerate(config.device):
        where = _where(i, dev.id)
        if not isinstance(dev, SnmpDevice | ModbusDevice):
            continue
        check_gpus(dev.gpus, f"{where}.gpus")
        problems += _check_servers(dev.servers, f"{where}.servers", by_server)
        problems += _check_racks(dev.racks, f"{where}.racks", by_rack)
        wired = expand_wiring(dev.gpus, dev.servers, dev.racks, by_server, by_rack)
        role = roles.get(dev.id)
        if role is not None and (dev.gpus or dev.servers or dev.racks) and role not in ("pdu", "cdu"):
            key = "gpus" if dev.gpus else "servers" if dev.servers else "racks"
            problems.append(
                ConfigProblem(
                    key=f"{where}.{key}",
                    message=f"a {role} neither feeds nor cools GPUs: {key} goes on PDUs and CDUs",
                )
            )
        if role == "cdu":
            for g in wired:
                other = cooled_by.setdefault(g, dev.id)
                if other != dev.id:
                    problems.append(
                        ConfigProblem(
                            key=f"{where}.gpus",
                            message=f"{g} is already on the loop of {other!r}: a GPU is on one loop",
                        )
                    )
        if isinstance(dev, SnmpDevice):
            for outlet, gpus in dev.outlet_gpus.items():
                key = f"{where}.outlet_gpus.{outlet}"
                if not outlet.isdigit() or int(outlet) < 1:
                    problems.append(
                        ConfigProblem(
                            key=key, message=f"outlet {outlet!r}: expected an outlet number (1, 2, ...)"
                        )
                    )
                check_gpus(gpus, key)
            for outlet, servers in dev.outlet_servers.items():
                key = f"{where}.outlet_servers.{outlet}"
                if not outlet.isdigit() or int(outlet) < 1:
                    problems.append(
                        ConfigProblem(
                            key=key, message=f"outlet {outlet!r}: expected an outlet number (1, 2, ...)"
                        )
                    )
                problems += _check_servers(servers, key, by_server)
            if wired:
                for outlet in (*dev.outlet_gpus, *dev.outlet_servers):
                    fed = expand_wiring(
                        dev.outlet_gpus.get(outlet, []),
                        dev.outlet_servers.get(outlet, []),
                        [],
                        by_server,
                        by_rack,
                    )
                    key = (
                        f"{where}.{'outlet_gpus' if outlet in dev.outlet_gpus else 'outlet_servers'}.{outlet}"
                    )
                    for g in fed:
                        if g not in wired:
                            problems.append(
                                ConfigProblem(
                                    key=key,
                                    message=f"{g} is not among this PDU's GPUs (it feeds {len(wired)})",
                                )
                            )
    return problems


def _nearest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
    return f" (did you mean {close[0]!r}?)" if close else " (there is none)"


def _check_servers(
    servers: list[str], key: str, by_server: Mapping[str, tuple[str, ...]]
) -> list[ConfigProblem]:
    """Each named server is a node device whose GPU count is known (the wiring expands to its GPUs)."""
    problems: list[ConfigProblem] = []
    for name in servers:
        if name not in by_server:
            problems.append(
                ConfigProblem(
                    key=key,
                    message=f"unknown server {name!r}: no node device has that id"
                    + _nearest(name, list(by_server)),
                )
            )
        elif not by_server[name]:
            problems.append(
                ConfigProblem(
                    key=key,
                    message=f"server {name!r} has no gpus count: set `gpus = N` on its node device"
                    " (the wiring expands to its GPUs)",
                )
            )
    return problems


def _check_racks(racks: list[str], key: str, by_rack: Mapping[str, list[str]]) -> list[ConfigProblem]:
    return [
        ConfigProblem(
            key=key,
            message=f"unknown rack {name!r}: no node device has rack = {name!r}"
            + _nearest(name, list(by_rack)),
        )
        for name in racks
        if name not in by_rack
    ]


def _power_devices(config: AgentConfig, roles: dict[str, str]) -> list[ConfigProblem]:
    """The [power] battery and site meter: devices of that kind, with the points the controller
    commands (found by role, the inverter modes by name)."""
    power = config.power
    if not power.enabled:
        return []
    problems: list[ConfigProblem] = []
    ids = {d.id for d in config.device}
    for key, dev_id, want in (
        ("power.battery", power.battery, "battery"),
        ("power.site_meter", power.site_meter, "meter"),
    ):
        if dev_id is None:
            continue
        if dev_id not in ids:
            problems.append(
                ConfigProblem(key=key, message=f"no device {dev_id!r} (known: {', '.join(sorted(ids))})")
            )
        elif dev_id in roles and roles[dev_id] != want:
            problems.append(
                ConfigProblem(
                    key=key,
                    message=f"{dev_id!r} is a {roles[dev_id]} (its profile's kind); expected a {want}",
                )
            )
    if power.battery in roles and roles[power.battery] == "battery":
        dev = config.devices_by_id()[power.battery]
        if isinstance(dev, ModbusDevice):
            profile = load_profile(dev.profile)
            roles_needed: tuple[PointRole, ...] = ("power_setpoint", "grid_target", "mode")
            for role in roles_needed:
                if profile.point_for_role(role) is None:
                    problems.append(
                        ConfigProblem(
                            key="power.battery",
                            message=f"profile {dev.profile!r} has no writable point with role = {role!r}",
                        )
                    )
            mode = profile.point_for_role("mode")
            for name in ("power_setpoint", "grid_target"):
                if mode is not None and mode.enum_value(name) is None:
                    problems.append(
                        ConfigProblem(
                            key="power.battery",
                            message=f"profile {dev.profile!r}: {mode.metric}'s enum names no {name!r} mode",
                        )
                    )
    return problems


__all__ = ["check_loaded", "check_profiles_of"]
