"""The small interface every driver implements, and the errors that cross it.

Library exceptions stop at the driver: a driver raises only ``DeviceUnavailable`` (no answer,
timeout, connection refused: worth retrying) or ``DeviceError`` (the device answered with an error,
or the answer made no sense). The poller turns either into readings of ERROR quality.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from agent.model import DeviceEvent, Reading


class DriverError(Exception):
    """Base of what a driver may raise."""

    def __init__(self, device: str, reason: str) -> None:
        super().__init__(f"{device}: {reason}")
        self.device = device
        self.reason = reason


class DeviceUnavailable(DriverError):
    """No answer: timeout, refused, unreachable. Retried with backoff."""


class DeviceError(DriverError):
    """The device answered, but with an error (Modbus exception, SNMP error status, NVML error)."""


class AuthError(DeviceError):
    """Credentials refused (SNMPv3 digest/keys, MQTT auth). Never retried quickly."""


@runtime_checkable
class Driver(Protocol):
    """One configured device (or, for NVML, one host's set of GPUs).

    ``__init__(cfg)`` validates and stores config and does no I/O. ``open()`` connects.
    ``poll()`` returns every reading of one cycle; a partly failed cycle returns the good readings
    plus ERROR-quality readings for what failed; a wholly failed one raises.
    """

    device_id: str

    async def open(self) -> None: ...

    async def poll(self) -> list[Reading]: ...

    async def close(self) -> None: ...


EventSink = Callable[[DeviceEvent], None]

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(kind: str) -> Callable[[type], type]:
    """Class decorator: ``@register("snmp") class SnmpDriver: ...``."""

    def deco(cls: type) -> type:
        _REGISTRY[kind] = cls
        return cls

    return deco


def driver_class(kind: str) -> Callable[..., Any]:
    if kind not in _REGISTRY:
        # Import lazily so that a daemon without, say, serial hardware never imports pyserial.
        import importlib

        importlib.import_module(f"agent.drivers.{kind}")
    return _REGISTRY[kind]
