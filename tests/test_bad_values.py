"""Values that cannot be trusted are not values: NaN, +/-Inf and readings outside a point's physical
range are ERROR readings with the reason, and the interlocks treat them as missing (fail safe).

hwsim serves them with its own encoder (``hwsim.modbus_codec``) through the ``bad-value`` fault.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.config import ModbusDevice
from agent.drivers.modbus import ModbusDriver
from agent.drivers.values import untrusted
from agent.interlocks.config import InterlockConfig
from agent.interlocks.engine import Engine, Topology
from agent.interlocks.service import InterlockService
from agent.model import Quality, Reading
from hwsim.modbus_codec import GARBAGE_WORD, encode, parse_bad_value
from hwsim.modbus_devices import ModbusHandle, start_modbus_tcp
from hwsim.state import CduState, PduState, PhaseState
from tests.agent_helpers import running_agent, until
from tests.conftest import ROOT, SimPod, start_pod, stop_pod

GPUS = ("gpu0", "gpu1")


# ------------------------------------------------------------------------------- the check
@pytest.mark.parametrize(
    ("value", "valid", "words"),
    [
        (math.nan, None, "NaN"),
        (math.inf, None, "+Inf"),
        (-math.inf, None, "-Inf"),
        (151.0, (-40.0, 150.0), "outside the physical range [-40, 150]"),
        (-41.0, (-40.0, 150.0), "outside the physical range"),
    ],
)
def test_untrusted_values_say_why(value: float, valid: tuple[float, float] | None, words: str) -> None:
    reason = untrusted(value, valid)
    assert reason is not None and words in reason


def test_trusted_values_pass() -> None:
    assert untrusted(31.4) is None
    assert untrusted(150.0, (-40.0, 150.0)) is None  # the bounds are inside
    assert untrusted(-40.0, (-40.0, 150.0)) is None


# ------------------------------------------------------------------------------- hwsim encoder
def test_hwsim_encoder_serves_what_devices_put_on_the_wire() -> None:
    def f32(words: list[int]) -> float:
        return float(struct.unpack(">f", struct.pack(">I", words[0] << 16 | words[1]))[0])

    assert math.isnan(f32(encode("float32", 1.0, math.nan)))
    assert f32(encode("float32", 1.0, math.inf)) == math.inf
    assert f32(encode("float32", 1.0, -math.inf)) == -math.inf
    assert f32(encode("float32", 1.0, 1e39)) == math.inf  # past float32: Inf, as a meter's conversion
    assert encode("int16", 0.1, math.nan) == [0x8000]  # the "no value" sentinels
    assert encode("uint16", 1.0, math.nan) == [0xFFFF]
    assert encode("uint32", 1.0, math.nan, "little") == [0xFFFF, 0xFFFF]
    assert encode("int16", 0.1, 5000.0) == [0x7FFF]  # saturated
    assert encode("int16", 0.1, -2.5) == [0xFFE7]
    assert encode("float32", 1.0, "garbage") == [GARBAGE_WORD, GARBAGE_WORD]
    assert parse_bad_value("NaN") != parse_bad_value("nan")  # NaN is NaN (never equal): parsed
    assert parse_bad_value("-inf") == -math.inf and parse_bad_value("12.5") == 12.5
    with pytest.raises(ValueError, match="nan, inf, -inf, garbage or a number"):
        parse_bad_value("banana")


# ------------------------------------------------------------------------------- driver + engine
@pytest.fixture
async def served() -> AsyncIterator[list[ModbusHandle]]:
    handles: list[ModbusHandle] = []
    yield handles
    for h in handles:
        await h.close()


def _pdu() -> PduState:
    phases = [PhaseState(i, voltage_v=230.0, current_a=12.0, power_w=2700.0) for i in (1, 2, 3)]
    return PduState(id="mpdu-1", vendor="modbus", model="m", rating_a=16.0, phases=phases, outlets=[])


def _cfg(h: ModbusHandle, dev_id: str, profile: str) -> ModbusDevice:
    return ModbusDevice(
        id=dev_id, kind="modbus", profile=profile, host="127.0.0.1", port=h.port, timeout_s=1.0, retries=0
    )


def _engine(pdu: str) -> Engine:
    topo = Topology(
        gpus=GPUS,
        loops={"cdu-1": GPUS},
        pdus={pdu: GPUS},
        pdu_rating_a={pdu: 16.0},
        min_flow_lpm={"cdu-1": 10.0},
        stale_after_s={**dict.fromkeys(GPUS, 3.0), "cdu-1": 3.0, pdu: 3.0},
    )
    return Engine(InterlockConfig(), topo, started=-100.0)


def _gpu_readings(now: float) -> list[Reading]:
    out = []
    for g in GPUS:
        for metric, value in (
            ("temp_c", 60.0),
            ("power_w", 500.0),
            ("min_power_limit_w", 200.0),
            ("max_power_limit_w", 700.0),
            ("default_power_limit_w", 700.0),
        ):
            out.append(Reading(g, metric, value, ts_mono=now, ts_wall=now))
    return out


def _cdu_readings(now: float) -> list[Reading]:
    return [
        Reading("cdu-1", m, v, ts_mono=now, ts_wall=now)
        for m, v in (("supply_temp_c", 30.0), ("flow_lpm", 20.0), ("pump_fault", 0.0), ("leak", 0.0))
    ]


async def test_nan_and_inf_phase_currents_are_errors_and_the_interlock_fails_safe(
    served: list[ModbusHandle],
) -> None:
    """The modbus-pdu profile's float32 phase currents: NaN (a meter's "no value"), +Inf, and a
    number past the physical range. Before, NaN read GOOD and pdu_phase_overcurrent could never trip."""
    state = _pdu()
    h = await start_modbus_tcp(state, profile="modbus-pdu")
    served.append(h)
    driver = ModbusDriver(_cfg(h, state.id, "modbus-pdu"))
    await driver.open()
    try:
        good = {r.metric: r for r in await driver.poll()}
        assert good["phase1_current_a"].quality is Quality.GOOD
        assert good["phase1_current_a"].value == pytest.approx(12.0)
        state.bad_values.update({"phase1_current_a": math.nan, "phase2_current_a": math.inf})
        state.bad_values["phase3_current_a"] = 5000.0  # fits a float32; no breaker carries it
        bad = {r.metric: r for r in await driver.poll()}
    finally:
        await driver.close()
    for metric, words in (
        ("phase1_current_a", "NaN"),
        ("phase2_current_a", "+Inf"),
        ("phase3_current_a", "outside"),
    ):
        r = bad[metric]
        assert r.value is None and r.quality is Quality.ERROR, r
        assert words in (r.error or ""), r
    assert bad["phase1_voltage_v"].quality is Quality.GOOD  # the rest of the block still reads

    # Through the engine: the PDU's inputs are missing -> sensor_stale caps the GPUs it feeds.
    now = 1000.0
    eng = _engine(state.id)
    snap = {r.key: r for r in [*_gpu_readings(now), *_cdu_readings(now)]}
    snap |= {
        r.key: Reading(r.device, r.metric, r.value, r.unit, now, now, r.quality, r.error)
        for r in bad.values()
    }
    decision = eng.step(snap, now, now)
    trips = [e for e in decision.events if e.kind == "interlock_trip"]
    assert [(e.detail["interlock"], e.device) for e in trips] == [("sensor_stale", state.id)], trips
    assert "NaN" in json.dumps(trips[0].detail)
    assert all(decision.caps[g] == pytest.approx(0.6 * 700.0) for g in GPUS), decision.caps


async def test_cdu_nan_garbage_and_out_of_range(served: list[ModbusHandle]) -> None:
    """An int16 temperature cannot hold NaN: the unit serves its "no value" sentinel 0x8000, which
    decodes to -3276.8 C, outside the physical range; garbage reads 0xDEAD; float32 heat NaN."""
    state = CduState(id="cdu-1", setpoint_c=30.0, supply_temp_c=31.0, return_temp_c=38.0, flow_lpm=20.0)
    h = await start_modbus_tcp(state, profile="generic-cdu")
    served.append(h)
    driver = ModbusDriver(_cfg(h, state.id, "generic-cdu"))
    await driver.open()
    try:
        state.bad_values.update(
            {"supply_temp_c": math.nan, "flow_lpm": "garbage", "heat_removed_kw": -math.inf}
        )
        bad = {r.metric: r for r in await driver.poll()}
    finally:
        await driver.close()
    assert bad["supply_temp_c"].value is None and "-3276.8 is outside" in (bad["supply_temp_c"].error or "")
    assert bad["flow_lpm"].value is None and "outside the physical range" in (bad["flow_lpm"].error or "")
    assert bad["heat_removed_kw"].value is None and "-Inf" in (bad["heat_removed_kw"].error or "")
    assert bad["return_temp_c"].value == pytest.approx(38.0)

    now = 1000.0
    eng = _engine("pdu-x")
    snap = {r.key: r for r in _gpu_readings(now)}
    snap |= {
        r.key: Reading(r.device, r.metric, r.value, r.unit, now, now, r.quality, r.error)
        for r in bad.values()
    }
    for p in (1, 2, 3):
        snap[("pdu-x", f"phase{p}_current_a")] = Reading(
            "pdu-x", f"phase{p}_current_a", 6.0, ts_mono=now, ts_wall=now
        )
    decision = eng.step(snap, now, now)
    trips = {(e.detail["interlock"], e.device) for e in decision.events if e.kind == "interlock_trip"}
    assert ("sensor_stale", "cdu-1") in trips, decision.events
    assert all(decision.caps[g] <= 0.6 * 700.0 + 0.01 for g in GPUS)


# ------------------------------------------------------------------------------- against a pod
@pytest.fixture
def pod(tmp_path_factory: pytest.TempPathFactory) -> SimPod:
    sim = start_pod(Path(tmp_path_factory.mktemp("pod", numbered=True)))
    yield sim  # type: ignore[misc]
    stop_pod(sim)


def _hwsim(pod: SimPod, *args: str) -> subprocess.CompletedProcess[str]:
    manifest = pod.run_dir / "manifest.json"
    return subprocess.run(
        [sys.executable, "-m", "hwsim.cli", "fault", *args, "--manifest", str(manifest)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )


def test_bad_value_fault_cli(pod: SimPod) -> None:
    res = _hwsim(pod, "bad-value", "--device", "cdu-1", "--point", "supply_temp_c", "--value", "nan")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["active"] is True
    res = _hwsim(pod, "bad-value", "--device", "cdu-1", "--point", "supply_temp_c", "--value", "banana")
    assert res.returncode == 1 and "nan, inf, -inf, garbage or a number" in res.stderr
    res = _hwsim(pod, "bad-value", "--device", "cdu-1", "--value", "inf")
    assert res.returncode == 1 and "needs --point" in res.stderr
    res = _hwsim(pod, "bad-value", "--device", "cdu-1", "--clear")
    assert res.returncode == 0 and json.loads(res.stdout)["active"] is False


async def test_pod_nan_and_inf_fail_safe_end_to_end(pod: SimPod, tmp_path: Path) -> None:
    """hwsim's Modbus PDU (meter-1, float32 phase currents, on the RTU line) serves NaN and the
    CDU serves Inf: the agent shows ERROR with the reason and sensor_stale caps the GPUs."""
    text = pod.agent_config(tmp_path / "state", extra="[interlocks.sensor_stale]\nfresh_hold_s = 1.0\n")
    # meter-1 feeds no GPU in the tiny pod: give it gpu0-gpu3 so its inputs protect something.
    text = text.replace('id = "meter-1"\n', 'id = "meter-1"\ngpus = ["gpu0", "gpu1", "gpu2", "gpu3"]\n', 1)
    path = tmp_path / "podagent.toml"
    path.write_text(text)
    from agent.config import load_config

    service = InterlockService(load_config(path).interlocks)
    async with running_agent(path, services=[service]) as agent:
        await until(agent, lambda: service.engine is not None, what="interlocks armed")
        pod.request(cmd="fault", name="bad-value", device="meter-1", point="phase2_current_a", value="nan")
        pod.request(cmd="fault", name="bad-value", device="cdu-1", point="supply_temp_c", value="inf")

        def errored(dev: str, metric: str) -> bool:
            r = agent.store.get(dev, metric)
            return r is not None and r.quality is Quality.ERROR

        await until(agent, lambda: errored("meter-1", "phase2_current_a"), what="meter-1 NaN as ERROR")
        await until(agent, lambda: errored("cdu-1", "supply_temp_c"), what="cdu-1 Inf as ERROR")
        meter = agent.store.get("meter-1", "phase2_current_a")
        assert meter is not None and meter.value is None and "NaN" in (meter.error or "")
        # The CDU's int16 supply register saturates +Inf to 0x7FFF: 3276.7 C, past the physical range.
        cdu = agent.store.get("cdu-1", "supply_temp_c")
        assert cdu is not None and cdu.value is None and "outside the physical range" in (cdu.error or "")

        def stale_on(dev: str) -> bool:
            st = service.status()
            return any(a["interlock"] == "sensor_stale" and a["device"] == dev for a in st["active"])

        await until(agent, lambda: stale_on("meter-1") and stale_on("cdu-1"), what="sensor_stale trips")
        caps = service.status()["caps"]
        assert {f"gpu{i}" for i in range(8)} <= set(caps), caps  # the CDU's loop: all eight GPUs
        assert all("sensor_stale" in caps[f"gpu{i}"]["by"] for i in range(4))
        await asyncio.sleep(0)
        # Cleared: fresh good values again, the trip clears.
        pod.request(cmd="fault", name="bad-value", device="meter-1", clear=True)
        pod.request(cmd="fault", name="bad-value", device="cdu-1", clear=True)
        await until(
            agent,
            lambda: not stale_on("meter-1") and not stale_on("cdu-1"),
            timeout=30,
            what="sensor_stale clears",
        )


async def test_snmp_phase_current_past_the_physical_range_is_an_error() -> None:
    """SNMP integers cannot be NaN, but a wrong map or a broken meter can read 6553.5 A: outside
    apc-rpdu2's phase current valid_range, an ERROR reading with the reason."""
    from agent.config import SnmpDevice
    from agent.drivers.snmp import SnmpDriver
    from hwsim.snmp_pdu import start_snmp_agent

    phases = [PhaseState(i, voltage_v=230.0, current_a=10.0, power_w=2300.0) for i in (1, 2, 3)]
    state = PduState(id="pdu-a", vendor="apc", model="sim", rating_a=32.0, phases=phases, outlets=[])
    h = await start_snmp_agent(state, version="2c")
    driver = SnmpDriver(
        SnmpDevice(
            id="pdu-a", kind="snmp", profile="apc-rpdu2", host="127.0.0.1", port=h.port, community="public"
        )
    )
    await driver.open()
    try:
        first = {r.metric: r for r in await driver.poll()}
        assert first["phase2_current_a"].quality is Quality.GOOD
        state.phases[1].current_a = 6553.5
        second = {r.metric: r for r in await driver.poll()}
    finally:
        await driver.close()
        h.close()
    r = second["phase2_current_a"]
    assert r.value is None and r.quality is Quality.ERROR
    assert "outside the physical range [0, 1000]" in (r.error or "")
    assert second["phase1_current_a"].value == pytest.approx(10.0)
