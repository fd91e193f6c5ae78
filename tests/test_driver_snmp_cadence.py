"""Per-table poll cadence of the SNMP driver: fast tables every poll, outlet tables every N-th."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import SnmpDevice
from agent.drivers.base import DeviceUnavailable
from agent.drivers.snmp import ProfileError, SnmpDriver, load_profile
from agent.drivers.snmp_transport import Response, Special
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


class _OneTableRefused:
    """A PDU at the transport seam that answers GETBULK from a table of OIDs, and refuses (genErr)
    any request that asks for a column under ``refuse``: a firmware that fails one table."""

    name = "fake"

    def __init__(self, values: dict[tuple[int, ...], int]) -> None:
        self.values = values
        self.keys = sorted(values)
        self.refuse: tuple[int, ...] | None = None
        self.requests: list[list[tuple[int, ...]]] = []

    async def bulk(self, oids: list[tuple[int, ...]], max_repetitions: int) -> Response:
        self.requests.append(list(oids))
        if self.refuse is not None and any(o[: len(self.refuse)] == self.refuse for o in oids):
            return Response([(o, Special.NO_SUCH_OBJECT) for o in oids], error_status=5, error_index=1)
        out: list[tuple[tuple[int, ...], int | str | Special]] = []
        cursor = list(oids)
        for _ in range(max_repetitions):
            for i, oid in enumerate(cursor):
                after = next((k for k in self.keys if k > oid), None)
                if after is None:
                    out.append((oid, Special.END_OF_MIB_VIEW))
                else:
                    out.append((after, self.values[after]))
                    cursor[i] = after
        return Response(out)

    async def set_integer(self, oid: tuple[int, ...], value: int) -> Response:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


async def test_a_table_refused_inside_a_combined_walk_fails_alone() -> None:
    profile = load_profile("apc-rpdu2")
    values: dict[tuple[int, ...], int] = {}
    for table in profile.tables.values():
        rows = [1] if table.name == "device" else [1, 2, 3]
        for col in table.columns:
            for row in rows:  # outlet states: 1 = on (the profile's map); anything else a reading
                values[(*table.entry, col, row)] = 1 if table.name == "outlet_switched" else 10 * col + row
    pdu = _OneTableRefused(values)
    cfg = SnmpDevice(kind="snmp", id="pdu-x", profile="apc-rpdu2", host="127.0.0.1", community="public")
    d = SnmpDriver(cfg)
    d._transport = pdu  # the transport seam: no socket
    first = by_metric(await d.poll())
    assert first and all(r.quality is Quality.GOOD for r in first.values())
    # Poll 2: the device and phase tables (sizes now known and alike) go out in ONE request...
    phase = profile.tables["phase"].entry
    pdu.refuse, pdu.requests = phase, []
    second = by_metric(await d.poll())
    assert len(pdu.requests) == 3  # combined (refused), then device alone, then phase alone
    assert {o[: len(phase)] == phase for o in pdu.requests[0]} == {True, False}
    # ...and when the PDU refuses it, only the refused table's readings are ERROR.
    for metric, r in second.items():
        if metric.startswith("phase"):
            assert r.quality is Quality.ERROR and r.error and "genErr" in r.error, r
        else:
            assert r.quality is Quality.GOOD, r
    assert {m for m in second if m.startswith("phase")} == {m for m in first if m.startswith("phase")}
