"""The pod's inventory: what every configured device is and what it is connected to, built once
from the config and the profiles it names.

A device's role comes from its profile's ``[device] kind`` (``pdu``, ``cdu``, ``chiller``,
``battery``, ``meter``), never from the profile's file name, so a new PDU or CDU model is a profile
and nothing else. Interlocks, the power controller, the store's derived values and podctl read the
topology from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.config import AgentConfig, ConfigError, ConfigProblem, ModbusDevice, NodeDevice, SnmpDevice
from agent.drivers.modbus import ModbusPoint, PointRole
from agent.profiles import LoadedProfile, check_profile

# Role of a device without a profile: its driver kind says what it is (a kind not listed here,
# e.g. a node agent, is its own role).
_ROLE_OF_KIND = {"nvml": "gpu_host", "host": "host"}


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    id: str
    driver: str  # the config's kind: nvml, snmp, modbus, host
    role: str  # gpu_host, host, node, or the profile's [device] kind
    stale_after_s: float
    profile: LoadedProfile | None = None
    # A PDU's or CDU's: the GPUs it feeds or cools (server wiring expanded). A node's: the GPUs
    # its config says the server has (known before the node ever answers).
    gpus: tuple[str, ...] = ()

    def point(self, metric: str) -> ModbusPoint | None:
        """The Modbus point behind ``metric`` (None: not a Modbus device, or no such point)."""
        if self.profile is None or self.profile.modbus is None:
            return None
        try:
            return self.profile.modbus.point(metric)
        except KeyError:
            return None

    def point_for_role(self, role: PointRole) -> ModbusPoint | None:
        if self.profile is None or self.profile.modbus is None:
            return None
        return self.profile.modbus.point_for_role(role)


@dataclass(frozen=True)
class Inventory:
    devices: Mapping[str, DeviceEntry]
    # Cooling loop (the CDU's id) -> the GPUs it cools.
    loops: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # PDU -> the GPUs it feeds (phase overcurrent caps these); ratings and outlets where known.
    pdus: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pdu_rating_a: Mapping[str, float] = field(default_factory=dict)
    outlet_gpus: Mapping[str, Mapping[int, tuple[str, ...]]] = field(default_factory=dict)
    min_flow_lpm: Mapping[str, float] = field(default_factory=dict)
    # The devices whose power_w adds up to the pod's.
    pod_power: tuple[str, ...] = ()

    def role(self, device: str) -> str | None:
        entry = self.devices.get(device)
        return None if entry is None else entry.role

    def with_role(self, role: str) -> list[DeviceEntry]:
        return [d for d in self.devices.values() if d.role == role]

    def stale_after_s(self, device: str) -> float | None:
        entry = self.devices.get(device)
        return None if entry is None else entry.stale_after_s

    def gpus(self) -> list[str]:
        """Every GPU the config names (on a loop or a feed), in natural order (gpu2 before gpu10).
        The GPUs actually present are the NVML devices' discovery; this is what the wiring expects."""
        named = {g for v in (*self.loops.values(), *self.pdus.values()) for g in v}
        return sorted(named, key=_natural)

    def loop_gpus(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.loops.items()}

    def bit_names(self, device: str, metric: str, raw: int) -> list[str]:
        """Names of the bits set in a bitmask reading (from the profile's ``bits``)."""
        entry = self.devices.get(device)
        point = None if entry is None else entry.point(metric)
        if point is None:
            return [f"0x{raw:x}"] if raw else []
        return point.bit_names(raw)

    def enum_value(self, device: str, metric: str, name: str) -> int | None:
        """The raw value of a named enumeration value (a mode), from the profile's ``enum``."""
        entry = self.devices.get(device)
        point = None if entry is None else entry.point(metric)
        return None if point is None else point.enum_value(name)

    def writable(self, device: str, role: PointRole) -> str | None:
        """The metric of the device's writable point with that role (None: it has none)."""
        entry = self.devices.get(device)
        point = None if entry is None else entry.point_for_role(role)
        return None if point is None else point.metric


def _natural(name: str) -> tuple[str, int]:
    head = name.rstrip("0123456789")
    tail = name[len(head) :]
    return head, int(tail) if tail else -1


def server_gpus(config: AgentConfig) -> dict[str, tuple[str, ...]]:
    """Node device id -> its GPUs' pod-unique ids (empty when its `gpus` count is not set)."""
    return {d.id: tuple(d.gpu_ids()) for d in config.device if isinstance(d, NodeDevice)}


def rack_servers(config: AgentConfig) -> dict[str, list[str]]:
    """Rack -> the node devices in it, in config order."""
    racks: dict[str, list[str]] = {}
    for d in config.device:
        if isinstance(d, NodeDevice) and d.rack is not None:
            racks.setdefault(d.rack, []).append(d.id)
    return racks


def expand_wiring(
    gpus: list[str],
    servers: list[str],
    racks: list[str],
    by_server: Mapping[str, tuple[str, ...]],
    by_rack: Mapping[str, list[str]],
) -> tuple[str, ...]:
    """A device's wiring as GPU ids: its gpu-id list, then every GPU of the servers and racks it
    names, each once, in that order (names nobody has are check-config's to report)."""
    out = dict.fromkeys(gpus)
    for server in [*servers, *(s for r in racks for s in by_rack.get(r, ()))]:
        out.update(dict.fromkeys(by_server.get(server, ())))
    return tuple(out)


def build_inventory(config: AgentConfig) -> Inventory:
    """The inventory of a config (profiles loaded and checked); ``ConfigError`` if a profile is bad."""
    devices: dict[str, DeviceEntry] = {}
    loops: dict[str, tuple[str, ...]] = {}
    pdus: dict[str, tuple[str, ...]] = {}
    ratings: dict[str, float] = {}
    outlets: dict[str, dict[int, tuple[str, ...]]] = {}
    min_flow: dict[str, float] = {}
    pod_power: list[str] = []
    problems: list[ConfigProblem] = []
    by_server, by_rack = server_gpus(config), rack_servers(config)
    for i, dev in enumerate(config.device):
        stale = dev.poll_interval_s * dev.stale_after_polls
        profile: LoadedProfile | None = None
        if isinstance(dev, SnmpDevice | ModbusDevice):
            profile, found = check_profile(dev.profile, dev.kind)
            if profile is None:
                where = f"device[{i}](id={dev.id})"
                problems += [p if p.file else p.model_copy(update={"key": f"{where}.{p.key}"}) for p in found]
                continue
            role = profile.kind
            gpus = expand_wiring(dev.gpus, dev.servers, dev.racks, by_server, by_rack)
        elif isinstance(dev, NodeDevice):
            role = "node"
            gpus = by_server[dev.id]
        else:
            role = _ROLE_OF_KIND.get(dev.kind, dev.kind)
            gpus = ()
        devices[dev.id] = DeviceEntry(dev.id, dev.kind, role, stale, profile, gpus)
        if isinstance(dev, ModbusDevice) and role == "cdu":
            loops[dev.id] = gpus
            if dev.min_flow_lpm is not None:
                min_flow[dev.id] = dev.min_flow_lpm
        elif isinstance(dev, SnmpDevice | ModbusDevice) and role == "pdu":
            if gpus or dev.breaker_rating_a:
                pdus[dev.id] = gpus
            if dev.breaker_rating_a:
                ratings[dev.id] = dev.breaker_rating_a
            if isinstance(dev, SnmpDevice) and (dev.outlet_gpus or dev.outlet_servers):
                outlets[dev.id] = {
                    int(k): expand_wiring(
                        dev.outlet_gpus.get(k, []), dev.outlet_servers.get(k, []), [], by_server, by_rack
                    )
                    for k in (*dev.outlet_gpus, *dev.outlet_servers)
                }
            # SNMP PDUs always count; a Modbus PDU (often a branch meter behind a counted PDU)
            # only when its config says so.
            if isinstance(dev, SnmpDevice) or dev.pod_power:
                pod_power.append(dev.id)
    if problems:
        raise ConfigError("<config>", problems)
    return Inventory(
        devices=devices,
        loops=loops,
        pdus=pdus,
        pdu_rating_a=ratings,
        outlet_gpus=outlets,
        min_flow_lpm=min_flow,
        pod_power=tuple(pod_power),
    )


__all__ = ["DeviceEntry", "Inventory", "build_inventory", "expand_wiring", "rack_servers", "server_gpus"]
