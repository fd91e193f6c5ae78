"""The SNMP driver against hwsim's simulated APC and Raritan PDUs, over real UDP on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agent.config import SnmpDevice
from agent.drivers.base import AuthError, DeviceUnavailable, Driver, driver_class
from agent.drivers.snmp import TIMEOUT_MARGIN_S, ProfileError, SnmpDriver, load_profile
from agent.model import Quality, Reading
from hwsim.snmp_pdu import SnmpAgentHandle, start_snmp_agent
from hwsim.state import OutletState, PduState, PhaseState

USER, AUTH_KEY, PRIV_KEY = "podagent", "auth-key-123", "priv-key-456"
PROFILES = {"apc": "apc-rpdu2", "raritan": "raritan-pdu2"}
OUTLETS = 8


def make_pdu(vendor: str) -> PduState:
    phases = [
        PhaseState(
            index=i,
            voltage_v=229.0 + i,
            current_a=10.4 + i,
            power_w=2300.0 + 10 * i,
            apparent_power_va=2380.0 + 10 * i,
            peak_current_a=14.2 + i,
        )
        for i in (1, 2, 3)
    ]
    outs = [
        OutletState(
            index=o,
            name=f"o{o}",
            phase=(o - 1) % 3 + 1,
            on=o != 2,  # outlet 2 off
            current_a=1.2 * o,
            power_w=271.0 * o,
            energy_wh=1200.0 * o,
        )
        for o in range(1, OUTLETS + 1)
    ]
    return PduState(
        id=f"pdu-{vendor}",
        vendor=vendor,
        model="sim",
        rating_a=32.0,
        phases=phases,
        outlets=outs,
        power_factor=0.97,
        power_w=6960.0,
        apparent_power_va=7180.0,
        energy_wh=123400.0,
    )


def expected(pdu: PduState) -> dict[str, float]:
    """What every metric must read for this PduState (exact at the profiles' resolution)."""
    exp: dict[str, float] = {
        "power_w": pdu.power_w,
        "energy_wh": pdu.energy_wh,
        "apparent_power_va": pdu.apparent_power_va,
    }
    for p in pdu.phases:
        exp |= {
            f"phase{p.index}_current_a": p.current_a,
            f"phase{p.index}_voltage_v": p.voltage_v,
            f"phase{p.index}_power_w": p.power_w,
        }
        if pdu.vendor == "apc":
            exp[f"phase{p.index}_peak_current_a"] = p.peak_current_a
    for o in pdu.outlets:
        exp |= {
            f"outlet{o.index}_current_a": o.current_a,
            f"outlet{o.index}_power_w": o.power_w,
            f"outlet{o.index}_energy_wh": o.energy_wh,
            f"outlet{o.index}_on": 1.0 if o.on else 0.0,
        }
    return exp


def device_cfg(
    h: SnmpAgentHandle, vendor: str, version: str, *, profile: str | None = None, **kw: object
) -> SnmpDevice:
    creds: dict[str, object] = (
        {"user": USER, "auth_key": AUTH_KEY, "priv_key": PRIV_KEY}
        if version == "3"
        else {"community": "public"}
    )
    args: dict[str, object] = {
        "kind": "snmp",
        "id": h.pdu.id,
        "profile": profile or PROFILES[vendor],
        "host": "127.0.0.1",
        "port": h.port,
        "version": version,
        "timeout_s": 1.0,
        "retries": 0,
        "max_repetitions": 10,
    }
    return SnmpDevice(**(args | creds | kw))  # type: ignore[arg-type]


Start = Callable[..., Awaitable[tuple[PduState, SnmpAgentHandle]]]


@pytest.fixture
async def agent() -> AsyncIterator[Start]:
    handles: list[SnmpAgentHandle] = []

    async def start(vendor: str, version: str = "2c") -> tuple[PduState, SnmpAgentHandle]:
        pdu = make_pdu(vendor)
        v3 = {"v3_user": USER, "v3_auth_key": AUTH_KEY, "v3_priv_key": PRIV_KEY} if version == "3" else {}
        h = await start_snmp_agent(pdu, version=version, **v3)  # type: ignore[arg-type]
        handles.append(h)
        return pdu, h

    yield start
    for h in handles:
        h.close()


@pytest.fixture
async def drivers() -> AsyncIterator[list[SnmpDriver]]:
    made: list[SnmpDriver] = []
    yield made
    for d in made:
        await d.close()


async def open_driver(drivers: list[SnmpDriver], cfg: SnmpDevice) -> SnmpDriver:
    d = SnmpDriver(cfg)
    drivers.append(d)
    await d.open()
    return d


def by_metric(readings: list[Reading]) -> dict[str, Reading]:
    out = {r.metric: r for r in readings}
    assert len(out) == len(readings), "a metric was reported twice"
    return out


VENDORS_VERSIONS = [("apc", "2c"), ("apc", "3"), ("raritan", "2c"), ("raritan", "3")]


@pytest.mark.parametrize(("vendor", "version"), VENDORS_VERSIONS)
async def test_every_metric_good_and_scaled(
    agent: Start, drivers: list[SnmpDriver], vendor: str, version: str
) -> None:
    pdu, h = await agent(vendor, version)
    d = await open_driver(drivers, device_cfg(h, vendor, version))
    got = by_metric(await d.poll())
    exp = expected(pdu)
    assert set(got) == set(exp)
    for name, value in exp.items():
        r = got[name]
        assert r.quality is Quality.GOOD and r.error is None, r
        assert r.device == pdu.id
        # APC's units are coarse (tenths of A, hundredths of kW, tenths of kWh): compare at them.
        tol = {"_a": 0.05, "_w": 5.0, "_wh": 50.0, "_va": 5.0}.get("_" + name.rsplit("_", 1)[-1], 0.5)
        assert r.value == pytest.approx(value, abs=tol), name
    assert got["outlet2_on"].value == 0.0 and got["outlet1_on"].value == 1.0
    assert got["phase1_current_a"].unit == "A" and got["apparent_power_va"].unit == "VA"
    assert got["outlet3_energy_wh"].unit == "Wh"


async def test_registered_and_protocol() -> None:
    assert driver_class("snmp") is SnmpDriver
    cfg = SnmpDevice(kind="snmp", id="p", profile="apc-rpdu2", host="127.0.0.1", community="public")
    assert isinstance(SnmpDriver(cfg), Driver)  # no I/O in __init__: nothing listens there


@pytest.mark.parametrize(("vendor", "version"), VENDORS_VERSIONS)
async def test_set_outlet(agent: Start, drivers: list[SnmpDriver], vendor: str, version: str) -> None:
    pdu, h = await agent(vendor, version)
    d = await open_driver(drivers, device_cfg(h, vendor, version))
    await d.set_outlet(4, False)
    assert pdu.outlets[3].on is False
    assert by_metric(await d.poll())["outlet4_on"].value == 0.0
    await d.set_outlet(4, True)
    assert pdu.outlets[3].on is True


async def test_set_unknown_outlet_refused(agent: Start, drivers: list[SnmpDriver]) -> None:
    from agent.drivers.base import DeviceError

    _, h = await agent("apc")
    d = await open_driver(drivers, device_cfg(h, "apc", "2c"))
    with pytest.raises(DeviceError, match="notWritable"):
        await d.set_outlet(OUTLETS + 1, False)


@pytest.mark.parametrize("version", ["2c", "3"])
async def test_timeout_is_device_unavailable_then_recovers(
    agent: Start, drivers: list[SnmpDriver], version: str
) -> None:
    pdu, h = await agent("apc", version)
    cfg = device_cfg(h, "apc", version, timeout_s=0.5, retries=0)
    d = await open_driver(drivers, cfg)
    assert len(await d.poll()) > 0
    pdu.unresponsive = True
    t0 = time.monotonic()
    with pytest.raises(DeviceUnavailable, match="timeout"):
        await d.poll()
    # pysnmp's timeout is checked on a 0.1 s timer tick; the asyncio guard adds its margin on top.
    assert time.monotonic() - t0 < cfg.timeout_s * (cfg.retries + 1) + TIMEOUT_MARGIN_S
    pdu.unresponsive = False
    readings = await d.poll()
    assert readings and all(r.quality is Quality.GOOD for r in readings)


async def test_slow_pdu_does_not_delay_another(
    agent: Start, drivers: list[SnmpDriver], tmp_path: Path
) -> None:
    # A one-table profile (a new model is a new profile): one request, answered after 5 s.
    profile = tmp_path / "apc-device-only.toml"
    profile.write_text(
        '[tables.device]\nentry = "1.3.6.1.4.1.318.1.1.26.4.3.1"\ncolumns = [5]\n'
        '[[metrics]]\nname = "power_w"\ntable = "device"\ncolumn = 5\nindex = [1]\nscale = 10.0\n'
    )
    _, slow_h = await agent("apc")
    _, fast_h = await agent("raritan")
    slow_h.delay_s = 5.0
    slow = await open_driver(drivers, device_cfg(slow_h, "apc", "2c", profile=str(profile), timeout_s=8.0))
    fast = await open_driver(drivers, device_cfg(fast_h, "raritan", "2c"))

    slow_task = asyncio.create_task(slow.poll(), name="poll[slow]")
    fast_polls = 0
    while not slow_task.done():
        readings = await fast.poll()
        assert readings and all(r.quality is Quality.GOOD for r in readings)
        fast_polls += 1
    slow_readings = await slow_task
    assert slow_readings[0].metric == "power_w" and slow_readings[0].quality is Quality.GOOD
    # Each fast poll is a handful of round trips; many complete while the slow one is pending.
    assert fast_polls >= 5, f"only {fast_polls} polls of the healthy PDU while the slow one waited"


@pytest.mark.parametrize("which", ["auth", "priv"])
async def test_wrong_v3_key_is_auth_error(agent: Start, drivers: list[SnmpDriver], which: str) -> None:
    _, h = await agent("raritan", "3")
    key = "auth_key" if which == "auth" else "priv_key"
    d = await open_driver(drivers, device_cfg(h, "raritan", "3", **{key: "wrong-key-789"}))
    with pytest.raises(AuthError):
        await d.poll()


async def test_poll_raw_lists_oids(agent: Start, drivers: list[SnmpDriver]) -> None:
    pdu, h = await agent("raritan")
    d = await open_driver(drivers, device_cfg(h, "raritan", "2c"))
    raw = dict(await d.poll_raw())
    # Outlet 3 rmsCurrent (mA) and its decimal digits, as on the wire.
    assert raw["1.3.6.1.4.1.13742.6.5.4.3.1.4.1.3.1"] == round(pdu.outlets[2].current_a * 1000)
    assert raw["1.3.6.1.4.1.13742.6.3.5.4.1.7.1.3.1"] == 3


def test_bad_profile_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[tables.t]\nentry = "1.3.6.1.4.1.1.1"\ncolumns = [2]\n'
        '[[metrics]]\nname = "outlet{n}_power_w"\ntable = "t"\ncolumn = 3\nindex = ["n"]\n'
    )
    with pytest.raises(ProfileError, match=r"metrics\[0\].*column"):
        load_profile(str(bad))


def test_shipped_profiles_load() -> None:
    for name in PROFILES.values():
        prof = load_profile(name)
        assert prof.control is not None
        assert {m.name for m in prof.metrics} >= {
            "power_w",
            "energy_wh",
            "outlet{n}_on",
            "phase{n}_current_a",
        }


async def test_v3_session_rebuilt_after_agent_restart(drivers: list[SnmpDriver]) -> None:
    # A restarted agent has a new engineID and boots: the old session's engine gets no answers.
    pdu = make_pdu("apc")
    v3 = {"v3_user": USER, "v3_auth_key": AUTH_KEY, "v3_priv_key": PRIV_KEY}
    h = await start_snmp_agent(pdu, version="3", **v3)  # type: ignore[arg-type]
    try:
        d = await open_driver(drivers, device_cfg(h, "apc", "3", timeout_s=0.5))
        assert len(await d.poll()) == len(expected(pdu))
        port = h.port
        await h.aclose()
        h = await start_snmp_agent(pdu, version="3", port=port, **v3)  # type: ignore[arg-type]
        results: list[str] = []
        for _ in range(3):
            try:
                readings = await d.poll()
            except DeviceUnavailable:
                results.append("unavailable")
            else:
                assert all(r.quality is Quality.GOOD for r in readings)
                results.append("good")
        # At most one failed poll: the failure makes the driver rebuild its engine.
        assert results[-2:] == ["good", "good"], results
    finally:
        h.close()


async def test_missing_row_is_error_reading_unless_optional(
    agent: Start, drivers: list[SnmpDriver], tmp_path: Path
) -> None:
    # rPDU2DeviceStatusPeakPower (.6) is a column the simulated card does not serve.
    profile = tmp_path / "apc-peak.toml"
    profile.write_text(
        '[tables.device]\nentry = "1.3.6.1.4.1.318.1.1.26.4.3.1"\ncolumns = [5, 6]\n'
        '[[metrics]]\nname = "power_w"\ntable = "device"\ncolumn = 5\nindex = [1]\nscale = 10.0\n'
        '[[metrics]]\nname = "peak_power_w"\ntable = "device"\ncolumn = 6\nindex = [1]\nscale = 10.0\n'
        '[[metrics]]\nname = "peak2_power_w"\ntable = "device"\ncolumn = 6\nindex = [1]\noptional = true\n'
    )
    pdu, h = await agent("apc")
    d = await open_driver(drivers, device_cfg(h, "apc", "2c", profile=str(profile)))
    got = by_metric(await d.poll())
    assert set(got) == {"power_w", "peak_power_w"}
    assert got["power_w"].quality is Quality.GOOD and got["power_w"].value == pytest.approx(
        pdu.power_w, abs=5
    )
    assert got["peak_power_w"].value is None and got["peak_power_w"].quality is Quality.ERROR
