"""hwsim's simulated SNMP PDUs, checked from the outside with net-snmp's own tools on loopback."""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from hwsim.snmp_pdu import SnmpAgentHandle, start_snmp_agent
from hwsim.state import OutletState, PduState, PhaseState

pytestmark = pytest.mark.skipif(shutil.which("snmpget") is None, reason="net-snmp tools not installed")

APC = "1.3.6.1.4.1.318.1.1.26"
RARITAN = "1.3.6.1.4.1.13742.6"
USER, AUTH_KEY, PRIV_KEY = "podagent", "auth-key-123", "priv-key-456"
V3 = ["-v3", "-l", "authPriv", "-u", USER, "-a", "SHA", "-A", AUTH_KEY, "-x", "AES", "-X", PRIV_KEY]
V2C = ["-v2c", "-c", "public"]
# Short timeouts so that "no answer" tests stay fast; answers on loopback take milliseconds.
FAST = ["-t", "0.5", "-r", "0", "-On", "-Oe"]


def make_pdu(vendor: str, outlets: int = 6) -> PduState:
    phases = [
        PhaseState(
            index=i,
            voltage_v=229.6 + i,
            current_a=10.04 + i,
            power_w=2300.0 + 10 * i,
            apparent_power_va=2380.0 + 10 * i,
            peak_current_a=14.26 + i,
            energy_wh=5000.0 * i,
        )
        for i in (1, 2, 3)
    ]
    outs = [
        OutletState(
            index=o,
            name=f"server{o}-psu",
            phase=(o - 1) % 3 + 1,
            current_a=1.23 * o,
            power_w=271.0 * o,
            peak_power_w=300.0 * o,
            energy_wh=1250.0 * o,
        )
        for o in range(1, outlets + 1)
    ]
    return PduState(
        id=f"pdu-{vendor}",
        vendor=vendor,
        model="AP8886" if vendor == "apc" else "PX3-5190R",
        rating_a=32.0,
        phases=phases,
        outlets=outs,
        power_factor=0.97,
        power_w=6960.0,
        apparent_power_va=7175.0,
        energy_wh=123456.0,
    )


async def snmp(tool: str, *args: str) -> tuple[int, str]:
    """Run a net-snmp tool; returns (exit status, stdout + stderr)."""
    proc = await asyncio.create_subprocess_exec(
        tool, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def values(out: str) -> dict[str, str]:
    """``.1.3.6... = INTEGER: 12`` lines -> {oid (no leading dot): "12"}."""
    result: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^\.?([\d.]+) = [\w-]+: \"?(.*?)\"?$", line)
        if m:
            result[m.group(1)] = m.group(2)
    return result


def oid_key(oid: str) -> tuple[int, ...]:
    return tuple(int(x) for x in oid.split("."))


Agent = Callable[..., Awaitable[tuple[PduState, SnmpAgentHandle]]]


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    handles: list[SnmpAgentHandle] = []

    async def start(vendor: str, version: str = "2c", **kw: object) -> tuple[PduState, SnmpAgentHandle]:
        pdu = make_pdu(vendor)
        if version == "3":
            kw |= {"v3_user": USER, "v3_auth_key": AUTH_KEY, "v3_priv_key": PRIV_KEY}
        h = await start_snmp_agent(pdu, version=version, **kw)  # type: ignore[arg-type]
        handles.append(h)
        return pdu, h

    yield start
    for h in handles:
        h.close()


def target(h: SnmpAgentHandle) -> str:
    return f"127.0.0.1:{h.port}"


@pytest.mark.parametrize("version", ["2c", "3"])
async def test_apc_get_matches_state(agent: Agent, version: str) -> None:
    pdu, h = await agent("apc", version)
    auth = V3 if version == "3" else V2C
    oids = [
        "1.3.6.1.2.1.1.5.0",  # sysName
        f"{APC}.4.3.1.5.1",  # device power, hundredths of kW
        f"{APC}.4.3.1.9.1",  # device energy, tenths of kWh
        f"{APC}.6.3.1.5.2",  # phase 2 current, tenths of A
        f"{APC}.6.3.1.6.3",  # phase 3 voltage, V
        f"{APC}.6.3.1.7.1",  # phase 1 power, hundredths of kW
        f"{APC}.6.3.1.10.2",  # phase 2 peak current, tenths of A
        f"{APC}.9.4.3.1.6.4",  # outlet 4 current, tenths of A
        f"{APC}.9.4.3.1.7.5",  # outlet 5 power, W
        f"{APC}.9.4.3.1.11.6",  # outlet 6 energy, tenths of kWh
        f"{APC}.9.2.3.1.5.1",  # outlet 1 state: on 2
    ]
    rc, out = await snmp("snmpget", *auth, *FAST, target(h), *oids)
    assert rc == 0, out
    got = values(out)
    assert got["1.3.6.1.2.1.1.5.0"] == pdu.id
    assert int(got[oids[1]]) == round(pdu.power_w / 10)
    assert int(got[oids[2]]) == round(pdu.energy_wh / 100)
    assert int(got[oids[3]]) == round(pdu.phases[1].current_a * 10)
    assert int(got[oids[4]]) == round(pdu.phases[2].voltage_v)
    assert int(got[oids[5]]) == round(pdu.phases[0].power_w / 10)
    assert int(got[oids[6]]) == round(pdu.phases[1].peak_current_a * 10)
    assert int(got[oids[7]]) == round(pdu.outlets[3].current_a * 10)
    assert int(got[oids[8]]) == round(pdu.outlets[4].power_w)
    assert int(got[oids[9]]) == round(pdu.outlets[5].energy_wh / 100)
    assert int(got[oids[10]]) == 2


async def test_values_are_live(agent: Agent) -> None:
    pdu, h = await agent("apc")
    oid = f"{APC}.6.3.1.5.1"
    pdu.phases[0].current_a = 31.7
    rc, out = await snmp("snmpget", *V2C, *FAST, target(h), oid)
    assert rc == 0 and values(out)[oid] == "317", out


@pytest.mark.parametrize("version", ["2c", "3"])
async def test_apc_walk_outlet_column(agent: Agent, version: str) -> None:
    pdu, h = await agent("apc", version)
    auth = V3 if version == "3" else V2C
    rc, out = await snmp("snmpwalk", *auth, *FAST, target(h), f"{APC}.9.4.3.1.7")
    assert rc == 0, out
    got = values(out)
    assert got == {f"{APC}.9.4.3.1.7.{o.index}": str(round(o.power_w)) for o in pdu.outlets}


@pytest.mark.parametrize("version", ["2c", "3"])
async def test_raritan_bulkwalk_scaled_by_decimal_digits(agent: Agent, version: str) -> None:
    pdu, h = await agent("raritan", version)
    auth = V3 if version == "3" else V2C
    rc, out = await snmp("snmpbulkwalk", *auth, *FAST, "-Cr10", target(h), f"{RARITAN}.5.4.3.1.4")
    assert rc == 0, out
    vals = values(out)
    rc, out = await snmp("snmpbulkwalk", *auth, *FAST, target(h), f"{RARITAN}.3.5.4.1.7")
    assert rc == 0, out
    digits = {oid.removeprefix(f"{RARITAN}.3.5.4.1.7."): int(v) for oid, v in values(out).items()}

    def scaled(outlet: int, sensor: int) -> float:
        idx = f"1.{outlet}.{sensor}"
        return int(vals[f"{RARITAN}.5.4.3.1.4.{idx}"]) / 10 ** digits[idx]

    assert digits["1.1.1"] == 3  # rmsCurrent in mA resolution, as a PX3 reports it
    for o in pdu.outlets:
        assert scaled(o.index, 1) == pytest.approx(o.current_a, abs=1e-3)
        assert scaled(o.index, 5) == pytest.approx(o.power_w, abs=1)
        assert scaled(o.index, 8) == pytest.approx(o.energy_wh, abs=1)
    # Per-phase (inlet pole) sensors: pdu 1, inlet 1, pole n, rmsCurrent.
    rc, out = await snmp("snmpget", *auth, *FAST, target(h), f"{RARITAN}.5.3.3.1.4.1.1.2.1")
    assert rc == 0, out
    assert int(values(out)[f"{RARITAN}.5.3.3.1.4.1.1.2.1"]) == round(pdu.phases[1].current_a * 1000)


@pytest.mark.parametrize("vendor", ["apc", "raritan"])
@pytest.mark.parametrize("tool", ["snmpwalk", "snmpbulkwalk"])
async def test_walk_is_lexicographic(agent: Agent, vendor: str, tool: str) -> None:
    _, h = await agent(vendor)
    # -Cc: do not let the tool check ordering itself; we check it here.
    rc, out = await snmp(tool, *V2C, *FAST, "-Cc", target(h), "1.3.6.1")
    assert rc == 0, out
    oids = [oid_key(o) for o in values(out)]
    assert len(oids) > 50
    assert all(a < b for a, b in itertools.pairwise(oids)), "walk not strictly increasing"
    assert oids[0] == (1, 3, 6, 1, 2, 1, 1, 1, 0)  # sysDescr comes first


@pytest.mark.parametrize("version", ["2c", "3"])
async def test_apc_set_switches_outlet(agent: Agent, version: str) -> None:
    pdu, h = await agent("apc", version)
    auth = V3 if version == "3" else V2C
    cmd = f"{APC}.9.2.4.1.5.3"
    rc, out = await snmp("snmpset", *auth, *FAST, target(h), cmd, "i", "2")  # immediateOff
    assert rc == 0, out
    assert pdu.outlets[2].on is False
    assert all(o.on for o in pdu.outlets if o.index != 3)
    rc, out = await snmp("snmpget", *auth, *FAST, target(h), f"{APC}.9.2.3.1.5.3")
    assert values(out)[f"{APC}.9.2.3.1.5.3"] == "1"  # status: off
    rc, out = await snmp("snmpset", *auth, *FAST, target(h), cmd, "i", "1")  # immediateOn
    assert rc == 0, out
    assert pdu.outlets[2].on is True


async def test_raritan_set_switches_outlet(agent: Agent) -> None:
    pdu, h = await agent("raritan", "3")
    op = f"{RARITAN}.4.1.2.1.2.1.5"
    rc, out = await snmp("snmpset", *V3, *FAST, target(h), op, "i", "0")  # off
    assert rc == 0, out
    assert pdu.outlets[4].on is False
    rc, out = await snmp("snmpget", *V3, *FAST, target(h), f"{RARITAN}.4.1.2.1.3.1.5")
    assert values(out)[f"{RARITAN}.4.1.2.1.3.1.5"] == "8"  # outletSwitchingState off
    rc, out = await snmp("snmpset", *V3, *FAST, target(h), op, "i", "1")  # on
    assert rc == 0 and pdu.outlets[4].on is True, out


@pytest.mark.parametrize(
    ("vendor", "oid"),
    [("apc", f"{APC}.6.3.1.5.1"), ("raritan", f"{RARITAN}.5.4.3.1.4.1.1.1"), ("apc", "1.3.6.1.2.1.1.5.0")],
)
async def test_set_read_only_object_fails(agent: Agent, vendor: str, oid: str) -> None:
    pdu, h = await agent(vendor)
    before = pdu.phases[0].current_a
    rc, out = await snmp("snmpset", *V2C, *FAST, target(h), oid, "i", "5")
    assert rc != 0
    assert "notWritable" in out, out
    assert pdu.phases[0].current_a == before


async def test_set_bad_value_refused(agent: Agent) -> None:
    pdu, h = await agent("apc")
    rc, out = await snmp("snmpset", *V2C, *FAST, target(h), f"{APC}.9.2.4.1.5.1", "i", "4")
    assert rc != 0 and "wrongValue" in out, out
    assert pdu.outlets[0].on is True


async def test_wrong_community_gets_nothing(agent: Agent) -> None:
    _, h = await agent("apc")
    rc, out = await snmp("snmpget", "-v2c", "-c", "private", *FAST, target(h), "1.3.6.1.2.1.1.5.0")
    assert rc != 0
    assert "Timeout" in out and "pdu-apc" not in out, out


@pytest.mark.parametrize("which", ["auth", "priv"])
async def test_wrong_v3_key_gets_nothing(agent: Agent, which: str) -> None:
    _, h = await agent("raritan", "3")
    auth = list(V3)
    auth[auth.index(AUTH_KEY if which == "auth" else PRIV_KEY)] = "wrong-key-789"
    rc, out = await snmp("snmpget", *auth, *FAST, target(h), "1.3.6.1.2.1.1.5.0")
    assert rc != 0
    assert "pdu-raritan" not in out, out


async def test_unresponsive_fault_times_out_then_recovers(agent: Agent) -> None:
    pdu, h = await agent("apc")
    pdu.unresponsive = True
    rc, out = await snmp("snmpget", *V2C, *FAST, target(h), "1.3.6.1.2.1.1.5.0")
    assert rc != 0 and "Timeout" in out, out
    assert h.dropped >= 1
    pdu.unresponsive = False
    rc, out = await snmp("snmpget", *V2C, *FAST, target(h), "1.3.6.1.2.1.1.5.0")
    assert rc == 0 and values(out)["1.3.6.1.2.1.1.5.0"] == pdu.id, out


async def test_port_in_use_is_a_clear_oserror(agent: Agent) -> None:
    _, h = await agent("apc")
    with pytest.raises(OSError, match=rf"UDP 127\.0\.0\.1:{h.port}.*in use"):
        await start_snmp_agent(make_pdu("apc"), port=h.port)


async def test_close_frees_the_port_and_manifest(agent: Agent) -> None:
    _, h = await agent("raritan", "3")
    entry = h.manifest_entry()
    assert entry["port"] == h.port and entry["version"] == "3" and entry["user"] == USER
    assert entry["auth_protocol"] == "SHA" and entry["priv_protocol"] == "AES"
    _, h2 = await agent("apc")
    assert h2.manifest_entry()["community"] == "public"
    port = h.port
    h.close()
    h.close()  # idempotent
    await h.wait_closed()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))  # would raise EADDRINUSE if the agent still held it


@pytest.mark.parametrize("version", ["2c", "3"])
async def test_reads_take_the_fast_path_and_sets_do_not(agent: Agent, version: str) -> None:
    """GET/GETNEXT/GETBULK are answered from encoded varbinds (hwsim/snmp_wire.py), a SET by pysnmp;
    both give the same values as the state."""
    pdu, h = await agent("apc", version)
    auth = V3 if version == "3" else V2C
    assert h.fast is not None
    rc, out = await snmp("snmpbulkwalk", *auth, *FAST, target(h), f"{APC}.9.4.3.1.7")
    assert rc == 0, out
    assert [int(v) for v in values(out).values()] == [round(o.power_w) for o in pdu.outlets]
    answered = h.fast.answered
    assert answered >= 1
    rc, out = await snmp("snmpset", *auth, *FAST, target(h), f"{APC}.9.2.4.1.5.2", "i", "2")
    assert rc == 0 and pdu.outlets[1].on is False, out
    assert h.fast.answered == answered  # the SET went to pysnmp


async def test_answers_are_encoded_once_per_generation() -> None:
    """With a generation (hwsim's tick), a value read twice in one tick is encoded once and a new
    tick (or a SET) serves the new state."""
    gen = [0]
    pdu = make_pdu("apc")
    h = await start_snmp_agent(pdu, generation=lambda: gen[0])
    try:
        oid = f"{APC}.6.3.1.5.1"
        assert h.fast is not None
        rc, out = await snmp("snmpget", *V2C, *FAST, target(h), oid)
        assert rc == 0 and values(out)[oid] == str(round(pdu.phases[0].current_a * 10)), out
        encoded = h.fast.cache.encoded
        pdu.phases[0].current_a = 31.7  # changed between ticks: the tick still serves its snapshot
        rc, out = await snmp("snmpget", *V2C, *FAST, target(h), oid)
        assert values(out)[oid] != "317" and h.fast.cache.encoded == encoded, out
        gen[0] += 1
        rc, out = await snmp("snmpget", *V2C, *FAST, target(h), oid)
        assert values(out)[oid] == "317", out
    finally:
        h.close()


async def test_v3_request_for_an_old_engine_id_goes_to_pysnmp(agent: Agent) -> None:
    """A manager that still uses the engine id of a previous agent on this port is not answered by
    the fast path (pysnmp reports unknownEngineID and the tool rediscovers)."""
    from hwsim.snmp_wire import UsmFast

    _, h = await agent("raritan", "3")
    assert h.fast is not None and isinstance(h.fast.usm, UsmFast)
    h.fast.usm.engine_id = b"\x80\x00\x00\x00\x01stale"
    rc, out = await snmp("snmpget", *V3, *FAST, target(h), "1.3.6.1.2.1.1.5.0")
    assert rc == 0 and "pdu-raritan" in out, out
    assert h.fast.answered == 0
