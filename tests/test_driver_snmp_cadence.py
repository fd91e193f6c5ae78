"""Per-table poll cadence of the SNMP driver: fast tables every poll, outlet tables every N-th."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.drivers.base import DeviceUnavailable
from agent.drivers.snmp import ProfileError, SnmpDriver, load_profile
from agent.model import Quality
from tests.test_driver_snmp import (
    Start,
    agent,  # noqa: F401  (fixture)
    by_metric,
    device_cfg,
    drivers,  # noqa: F401  (fixture)
    expected,
    open_driver,
)

FAST = {"power_w", "energy_wh", "apparent_power_va"}  # + phase*


def is_fast(metric: str) -> bool:
    return metric in FAST or metric.startswith("phase")


@pytest.mark.parametrize(("vendor", "transport"), [("apc", "netsnmp"), ("raritan", "pysnmp")])
async def test_outlet_tables_every_fifth_poll(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
    vendor: str,
    transport: str,
) -> None:
    pdu, h = await agent(vendor)
    d = await open_driver(drivers, device_cfg(h, vendor, "2c", transport=transport))
    everything = set(expected(pdu))
    fast = {m for m in everything if is_fast(m)}
    assert by_metric(await d.poll()).keys() == everything  # the first poll reads every table
    pdu.outlets[0].power_w = 777.0
    pdu.phases[0].current_a = 17.3
    for _ in range(4):
        got = by_metric(await d.poll())
        assert got.keys() == fast  # outlets not re-emitted: the store keeps them with their age
        assert got["phase1_current_a"].value == pytest.approx(17.3)
    got = by_metric(await d.poll())  # poll 5: outlets are due again
    assert got.keys() == everything
    assert got["outlet1_power_w"].value == pytest.approx(777.0)
    assert d.metric_every("outlet12_on") == 5 and d.metric_every("phase2_voltage_v") == 1


@pytest.mark.parametrize(("every", "full_polls"), [(1, [0, 1, 2, 3]), (2, [0, 2])])
async def test_config_overrides_slow_table_every(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
    every: int,
    full_polls: list[int],
) -> None:
    pdu, h = await agent("apc")
    d = await open_driver(drivers, device_cfg(h, "apc", "2c", slow_table_every=every))
    full = [i for i in range(4) if len(await d.poll()) == len(expected(pdu))]
    assert full == full_polls
    assert d.metric_every("outlet3_current_a") == every


async def test_set_outlet_makes_next_poll_read_outlets(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
) -> None:
    pdu, h = await agent("raritan", "3")
    d = await open_driver(drivers, device_cfg(h, "raritan", "3"))
    await d.poll()
    assert "outlet4_on" not in by_metric(await d.poll())
    await d.set_outlet(4, False)
    got = by_metric(await d.poll())
    assert got["outlet4_on"].value == 0.0 and len(got) == len(expected(pdu))
    assert "outlet4_on" not in by_metric(await d.poll())  # and then back to the cadence


async def test_tables_due_in_a_failed_poll_stay_due(
    agent: Start,  # noqa: F811
    drivers: list[SnmpDriver],  # noqa: F811
) -> None:
    pdu, h = await agent("apc")
    d = await open_driver(drivers, device_cfg(h, "apc", "2c", timeout_s=0.3, retries=0))
    for _ in range(5):
        await d.poll()
    pdu.unresponsive = True  # poll 5, when the outlets are due, fails
    with pytest.raises(DeviceUnavailable):
        await d.poll()
    pdu.unresponsive = False
    got = by_metric(await d.poll())
    assert got.keys() == set(expected(pdu))
    assert all(r.quality is Quality.GOOD for r in got.values())


def test_profile_every_validated(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[tables.t]\nentry = "1.3.6.1.4.1.1.1"\ncolumns = [2]\nevery = 0\n'
        '[[metrics]]\nname = "power_w"\ntable = "t"\ncolumn = 2\nindex = [1]\n'
    )
    with pytest.raises(ProfileError, match=r"tables\.t\.every"):
        load_profile(str(bad))
    # The shipped profiles: interlock inputs (device/inlet and phase/pole tables) every poll.
    for name in ("apc-rpdu2", "raritan-pdu2"):
        prof = load_profile(name)
        for m in prof.metrics:
            want = 1 if is_fast(m.name.replace("{n}", "1")) else 5
            assert prof.tables[m.table].every == want, (name, m.name)
