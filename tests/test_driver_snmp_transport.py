"""SNMP transports (net-snmp through netsnmp-cffi by default, pysnmp on request and for AES256)
against hwsim's PDUs, v2c and v3.

Both transports must turn the same PDU state into the same readings; the error paths (timeout,
refused SET) must surface as the same driver errors whichever transport carried the request.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pydantic import ValidationError

from agent.config import SnmpDevice
from agent.drivers.base import AuthError, DeviceError, DeviceUnavailable
from agent.drivers.snmp import TIMEOUT_MARGIN_S, SnmpDriver, choose_transport
from agent.drivers.snmp_transport import (
    TransportError,
    discovery_request,
    netsnmp_available,
    parse_discovery_response,
    password_to_ku,
)
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
TRANSPORTS = ["pysnmp", "netsnmp", "native"]  # v2c
TRANSPORTS_V3 = ["pysnmp", "netsnmp"]


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
    assert got["netsnmp"] == got["pysnmp"] == got["native"]
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
    assert choose_transport(cfg_for("2c")) == "native"
    assert choose_transport(cfg_for("2c", "native")) == "native"
    assert choose_transport(cfg_for("2c", "pysnmp")) == "pysnmp"
    assert choose_transport(cfg_for("2c", "netsnmp")) == "netsnmp"
    assert choose_transport(cfg_for("3")) == "netsnmp"
    assert choose_transport(cfg_for("3", "pysnmp")) == "pysnmp"
    # AES-256 keys are extended differently by different vendors: left to pysnmp.
    aes256 = cfg_for("3").model_copy(update={"priv_protocol": "AES256"})
    assert choose_transport(aes256) == "pysnmp"
    with pytest.raises(ValidationError, match="AES256"):
        SnmpDevice.model_validate(cfg_for("3", "netsnmp").model_dump() | {"priv_protocol": "AES256"})
    with pytest.raises(ValidationError, match="v2c only"):
        cfg_for("3", "native")


def test_password_to_key_matches_rfc3414() -> None:
    # RFC 3414 A.3.1 / A.3.2: the password "maplesyrup".
    assert password_to_ku("maplesyrup", "MD5").hex() == "9faf3283884e92834ebc9847d8edd963"
    assert password_to_ku("maplesyrup", "SHA").hex() == "9fb5cc0381497b3793528939ff788d5d79145211"


def test_discovery_request_and_answer_round_trip() -> None:
    request = discovery_request(4242)
    assert request[0] == 0x30 and b"\x04\x01\x04" in request  # msgFlags: reportable, noAuthNoPriv
    # An engine's Report, built with pysnmp's encoder (an independent BER implementation).
    from pyasn1.codec.ber import encoder
    from pysnmp.proto.api import v2c
    from pysnmp.proto.mpmod.rfc3412 import HeaderData, ScopedPDU, SNMPv3Message
    from pysnmp.proto.secmod.rfc3414.service import UsmSecurityParameters

    msg = SNMPv3Message()
    msg["msgVersion"] = 3
    header = HeaderData()
    header["msgID"] = 4242
    header["msgMaxSize"] = 65507
    header["msgFlags"] = b"\x00"
    header["msgSecurityModel"] = 3
    msg["msgGlobalData"] = header
    usm = UsmSecurityParameters()
    usm["msgAuthoritativeEngineId"] = b"\x80\x00\x1f\x88\x80podagent-test"
    usm["msgAuthoritativeEngineBoots"] = 7
    usm["msgAuthoritativeEngineTime"] = 123456
    usm["msgUserName"] = b""
    usm["msgAuthenticationParameters"] = b""
    usm["msgPrivacyParameters"] = b""
    msg["msgSecurityParameters"] = encoder.encode(usm)
    scoped = ScopedPDU()
    scoped["contextEngineId"] = b""
    scoped["contextName"] = b""
    report = v2c.ReportPDU()
    v2c.apiPDU.set_defaults(report)
    scoped["data"]["report"] = report
    msg["msgData"]["plaintext"] = scoped
    info = parse_discovery_response(encoder.encode(msg), 4242)
    assert info.engine_id == b"\x80\x00\x1f\x88\x80podagent-test"
    assert (info.boots, info.time) == (7, 123456)
    with pytest.raises(TransportError):
        parse_discovery_response(encoder.encode(msg), 4243)  # someone else's answer
    with pytest.raises(TransportError):
        parse_discovery_response(encoder.encode(msg)[:20], 4242)  # truncated


@pytest.mark.parametrize("vendor", ["apc", "raritan"])
async def test_v3_transports_give_identical_readings(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
    vendor: str,
) -> None:
    pdu, h = await agent(vendor, "3")
    got = {}
    for transport in TRANSPORTS_V3:
        d = await open_driver(drivers, device_cfg(h, vendor, "3", transport=transport))
        assert d.transport_name == transport
        got[transport] = comparable(await d.poll())
    assert got["netsnmp"] == got["pysnmp"]
    assert set(got["netsnmp"]) == set(expected(pdu))
    assert got["netsnmp"]["phase2_current_a"][0] == pytest.approx(pdu.phases[1].current_a)


@pytest.mark.parametrize("transport", TRANSPORTS_V3)
@pytest.mark.parametrize("which", ["user", "auth_key", "priv_key"])
async def test_v3_wrong_credentials_are_an_auth_error(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
    transport: str,
    which: str,
) -> None:
    _, h = await agent("apc", "3")
    wrong = {"user": "intruder", "auth_key": "wrong-key-789", "priv_key": "wrong-key-789"}[which]
    d = await open_driver(drivers, device_cfg(h, "apc", "3", transport=transport, **{which: wrong}))
    t0 = time.monotonic()
    with pytest.raises(AuthError):
        await d.poll()
    if which != "priv_key":  # the engine says so at once (a report); a bad priv key cannot be told
        assert time.monotonic() - t0 < 1.0  # from a lost answer: it takes the timeout


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


async def test_v3_discovery_of_a_dead_pdu_never_blocks_the_loop(drivers: list[SnmpDriver]) -> None:  # noqa: F811
    """net-snmp's own engine discovery is a blocking exchange inside snmp_open; ours is not."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        cfg = cfg_for("3").model_copy(update={"port": port, "timeout_s": 0.4, "retries": 1})
        d = SnmpDriver(cfg)
        drivers.append(d)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            with pytest.raises(DeviceUnavailable, match="discovery"):
                await d.open()
        finally:
            task.cancel()
        # 0.8 s of discovery (two tries): the loop kept turning all along.
        assert ticks >= 10


async def test_v3_key_change_on_the_same_engine_takes_effect(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
) -> None:
    """libnetsnmp keeps USM users per (engine ID, user) for the whole process: a corrected (or
    revoked) key after a config reload must not be shadowed by the one it saw first."""
    _, h = await agent("apc", "3")
    for key, works in (("wrong-key-789", False), (None, True), ("wrong-key-789", False), (None, True)):
        extra = {"auth_key": key} if key else {}
        d = await open_driver(drivers, device_cfg(h, "apc", "3", transport="netsnmp", **extra))
        if works:
            assert await d.poll()
        else:
            with pytest.raises(AuthError):
                await d.poll()
        await d.close()
