"""SNMP transports (netsnmp-cffi for v2c, pysnmp for v3 and on request) against hwsim's PDUs.

Both transports must turn the same PDU state into the same readings; the error paths (timeout,
refused SET) must surface as the same driver errors whichever transport carried the request.
"""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from agent.config import SnmpDevice
from agent.drivers.base import DeviceError, DeviceUnavailable
from agent.drivers.snmp import TIMEOUT_MARGIN_S, SnmpDriver, choose_transport
from agent.drivers.snmp_transport import netsnmp_available
from agent.model import Quality, Reading
from tests.test_driver_snmp import (
    OUTLETS,
    Start,
    agent,  # noqa: F401  (fixture)
    by_metric,
    device_cfg,
    drivers,  # noqa: F401  (fixture)
    expected,
    open_driver,
)

pytestmark = pytest.mark.skipif(not netsnmp_available(), reason="netsnmp-cffi not installed")
TRANSPORTS = ["pysnmp", "netsnmp"]


def comparable(readings: list[Reading]) -> dict[str, tuple[float | None, str, Quality, str | None]]:
    return {r.metric: (r.value, r.unit, r.quality, r.error) for r in by_metric(readings).values()}


@pytest.mark.parametrize("vendor", ["apc", "raritan"])
@pytest.mark.parametrize("max_repetitions", [1, 25])
async def test_transports_give_identical_readings(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
    vendor: str,
    max_repetitions: int,
) -> None:
    pdu, h = await agent(vendor)
    got = {}
    for transport in TRANSPORTS:
        cfg = device_cfg(h, vendor, "2c", transport=transport, max_repetitions=max_repetitions)
        d = await open_driver(drivers, cfg)
        assert d.transport_name == transport
        got[transport] = comparable(await d.poll())
    assert got["netsnmp"] == got["pysnmp"]
    assert set(got["netsnmp"]) == set(expected(pdu))
    assert all(q is Quality.GOOD for _, _, q, _ in got["netsnmp"].values())
    # Exact values, not just equal ones: outlet 5 power is 1355 W on both vendors' wire formats.
    assert got["netsnmp"]["outlet5_power_w"][0] == pytest.approx(pdu.outlets[4].power_w)


def cfg_for(version: str, transport: str = "auto") -> SnmpDevice:
    creds: dict[str, object] = (
        {"user": "u", "auth_key": "auth-key-123", "priv_key": "priv-key-456"}
        if version == "3"
        else {"community": "public"}
    )
    return SnmpDevice(
        kind="snmp", id="p", profile="apc-rpdu2", host="127.0.0.1", version=version, transport=transport,
        **creds,  # type: ignore[arg-type]
    )  # fmt: skip


def test_transport_choice() -> None:
    assert choose_transport(cfg_for("2c")) == "netsnmp"
    assert choose_transport(cfg_for("2c", "pysnmp")) == "pysnmp"
    assert choose_transport(cfg_for("2c", "netsnmp")) == "netsnmp"
    # netsnmp-cffi has no SNMPv3: auto picks pysnmp, an explicit netsnmp is a config error.
    assert choose_transport(cfg_for("3")) == "pysnmp"
    assert choose_transport(cfg_for("3", "pysnmp")) == "pysnmp"
    with pytest.raises(ValidationError, match="no SNMPv3"):
        cfg_for("3", "netsnmp")


async def test_v3_polls_through_pysnmp(agent: Start, drivers: list[SnmpDriver]) -> None:  # noqa: F811
    pdu, h = await agent("raritan", "3")
    d = await open_driver(drivers, device_cfg(h, "raritan", "3"))
    assert d.transport_name == "pysnmp"
    got = by_metric(await d.poll())
    assert set(got) == set(expected(pdu))
    assert got["phase2_current_a"].value == pytest.approx(pdu.phases[1].current_a)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_set_outlet_and_refusal(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
    transport: str,
) -> None:
    pdu, h = await agent("apc")
    d = await open_driver(drivers, device_cfg(h, "apc", "2c", transport=transport))
    await d.set_outlet(5, False)
    assert pdu.outlets[4].on is False
    await d.set_outlet(5, True)
    assert pdu.outlets[4].on is True
    # An error-status answer (netsnmp-cffi 0.2 itself drops it) is a DeviceError naming it.
    with pytest.raises(DeviceError, match="notWritable"):
        await d.set_outlet(OUTLETS + 1, False)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_timeout_then_recovery(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
    transport: str,
) -> None:
    pdu, h = await agent("raritan")
    cfg = device_cfg(h, "raritan", "2c", transport=transport, timeout_s=0.3, retries=0)
    d = await open_driver(drivers, cfg)
    assert await d.poll()
    pdu.unresponsive = True
    t0 = time.monotonic()
    with pytest.raises(DeviceUnavailable, match="timeout"):
        await d.poll()
    assert time.monotonic() - t0 < cfg.timeout_s + TIMEOUT_MARGIN_S
    pdu.unresponsive = False
    readings = await d.poll()
    assert readings and all(r.quality is Quality.GOOD for r in readings)


async def test_unreachable_netsnmp_host_is_unavailable(drivers: list[SnmpDriver]) -> None:  # noqa: F811
    cfg = cfg_for("2c", "netsnmp").model_copy(update={"host": "no-such-host.invalid"})
    d = SnmpDriver(cfg)
    drivers.append(d)
    with pytest.raises(DeviceUnavailable, match="resolve"):
        await d.open()
