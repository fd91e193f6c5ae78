"""The interlocks end to end: an hwsim fault -> the agent's readings -> the engine -> NVML power limits,
asserted on the simulator's truth (the physics' ``power_limit_w``, temperatures, phase currents).

Agent-side hold times are wall-clock, so the tests shorten them in ``[interlocks]``; where the physics
needs simulated minutes (a chiller trip) the pod runs faster (``speed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.app import Agent
from agent.config import load_config
from agent.events import Event
from agent.interlocks.service import InterlockService
from hwsim.podspec import POD_DIR
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod, start_pod, stop_pod

DEFAULT_W = 700.0  # tiny's H100s: default = max limit 700 W, min 200 W
STEP_W = 70.0  # release ramp: 10% of the default limit per step

# Design defaults except the hold times (wall-clock: kept short so the tests stay short).
INTERLOCKS = """
[interlocks]
release_interval_s = 1.0
[interlocks.gpu_overtemp]
clear_hold_s = 2.0
[interlocks.gpu_runaway]
clear_hold_s = 3.0
[interlocks.coolant_supply_high]
sustain_s = 1.0
clear_hold_s = 2.0
[interlocks.pdu_phase_overcurrent]
sustain_s = 2.0
clear_hold_s = 2.0
tighten_interval_s = 2.0
[interlocks.sensor_stale]
fresh_hold_s = 2.0
"""


# ---------------------------------------------------------------------------------- truth
@dataclass(frozen=True)
class Sample:
    t: float
    limits: list[float]  # per GPU index: the physics' power_limit_w
    temps: list[float]
    supply_c: float  # cdu-1 supply
    phase_a: dict[str, list[float]]  # PDU id -> phase currents


class Truth:
    """Samples the simulator's state (control socket) at ~10 Hz in a thread, for the whole test."""

    def __init__(self, pod: SimPod) -> None:
        self.pod = pod
        self.samples: list[Sample] = []
        self._new = asyncio.Event()

    def _sample(self) -> Sample:
        st = self.pod.state()
        return Sample(
            t=time.monotonic(),
            limits=[g["power_limit_w"] for g in st["gpus"]],
            temps=[g["temp_c"] for g in st["gpus"]],
            supply_c=st["cdus"][0]["supply_temp_c"],
            phase_a={p["id"]: [ph["current_a"] for ph in p["phases"]] for p in st["pdus"]},
        )

    async def run(self) -> None:
        while True:
            self.samples.append(await asyncio.to_thread(self._sample))
            self._new.set()
            await asyncio.sleep(0.1)

    @property
    def last(self) -> Sample:
        return self.samples[-1]

    async def until(self, predicate: Callable[[Sample], bool], *, within: float, what: str) -> Sample:
        """The first sample (from now on) for which predicate holds."""
        seen = len(self.samples)
        try:
            async with asyncio.timeout(within):
                while True:
                    for s in self.samples[seen:]:
                        if predicate(s):
                            return s
                    seen = len(self.samples)
                    self._new.clear()
                    await self._new.wait()
        except TimeoutError:
            last = self.samples[-1] if self.samples else None
            raise AssertionError(
                f"simulator: timed out after {within} s waiting for {what}; last: {last}"
            ) from None


@contextlib.asynccontextmanager
async def armed(
    pod: SimPod, tmp_path: Path, *, extra: str = ""
) -> AsyncIterator[tuple[Agent, InterlockService, Truth]]:
    """The agent with interlocks against ``pod``, and a sampler of the pod's truth."""
    path = tmp_path / "podagent.toml"
    path.write_text(pod.agent_config(tmp_path / "state", extra=INTERLOCKS + extra))
    service = InterlockService(load_config(path).interlocks)
    truth = Truth(pod)
    async with running_agent(path, services=[service]) as agent:
        sampler = asyncio.create_task(truth.run(), name="truth")
        try:
            await truth.until(lambda s: True, within=5, what="a first sample")
            # On a busy machine an input can be a poll late right after the start (a sensor_stale
            # trip and its ramp): each test starts from a quiet pod, with nothing capped.
            await until(
                agent,
                lambda: (st := service.status())["armed"] and not st["active"] and not st["caps"],
                timeout=60,
                what="a quiet pod: no interlock active, no cap",
            )
            yield agent, service, truth
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler


@contextlib.contextmanager
def pod_running(tmp_path: Path, pod: str = "tiny", *, speed: float = 1.0) -> Iterator[SimPod]:
    sim = start_pod(tmp_path / "pod", pod, speed=speed)
    try:
        yield sim
    finally:
        stop_pod(sim)


# ---------------------------------------------------------------------------------- agent side
def events(
    agent: Agent, kind: str, *, interlock: str | None = None, device: str | None = None
) -> list[Event]:
    return [
        e
        for e in agent.events.recent(limit=2000)
        if e.kind == kind
        and (interlock is None or e.detail.get("interlock") == interlock)
        and (device is None or e.device == device)
    ]


async def event(
    agent: Agent, kind: str, *, within: float, interlock: str | None = None, device: str | None = None
) -> Event:
    """Wait for an event on the bus (past or future)."""
    got = asyncio.get_running_loop().create_future()

    def match(e: Event) -> bool:
        return (
            e.kind == kind
            and (interlock is None or e.detail.get("interlock") == interlock)
            and (device is None or e.device == device)
        )

    def on_event(e: Event) -> None:
        if match(e) and not got.done():
            got.set_result(e)

    unsubscribe = agent.events.subscribe(on_event)
    try:
        for e in agent.events.recent(limit=2000):
            if match(e):
                return e
        async with asyncio.timeout(within):
            result: Event = await got
            return result
    except TimeoutError:
        raise AssertionError(f"no {kind} event ({interlock} on {device}) within {within} s") from None
    finally:
        unsubscribe()


def assert_trip_detail(trip: Event, inputs: set[str], thresholds: dict[str, Any]) -> None:
    """Every trip says what it saw and what it compared against."""
    detail = trip.detail
    assert set(detail["inputs"]) >= inputs, detail
    for key, value in thresholds.items():
        assert detail["thresholds"][key] == value, (key, detail["thresholds"])


def assert_audited(state_dir: Path, interlock: str, device: str, gpu: str) -> None:
    lines = [json.loads(line) for line in (state_dir / "audit.jsonl").read_text().splitlines()]

    def has(kind: str, dev: str, **detail: Any) -> bool:
        return any(
            e["kind"] == kind
            and e["device"] == dev
            and all(e["detail"].get(k) == v for k, v in detail.items())
            for e in lines
        )

    assert has("interlock_trip", device, interlock=interlock), "trip not in the audit log"
    assert any(e["kind"] == "cap_applied" and gpu in e["detail"]["gpus"] for e in lines), (
        "cap_applied not in the audit log"
    )
    assert has("interlock_clear", device, interlock=interlock), "clear not in the audit log"


def assert_ramp(truth: Truth, gpu: int, cap_w: float) -> None:
    """The physics saw the cap, then +10% of the default every release interval, up to the default."""
    seq: list[float] = []
    for s in truth.samples:
        w = s.limits[gpu]
        if not seq:
            if abs(w - cap_w) <= 1.0:
                seq.append(w)
        elif abs(w - seq[-1]) > 0.5:
            seq.append(w)
    steps = math.ceil((DEFAULT_W - cap_w) / STEP_W - 0.01)
    expected = [min(DEFAULT_W, cap_w + k * STEP_W) for k in range(steps + 1)]
    assert len(seq) == len(expected) and all(abs(a - b) <= 1.0 for a, b in zip(seq, expected, strict=True)), (
        f"gpu{gpu} power_limit_w in the physics went {seq}, expected the ramp {expected}"
    )


# ---------------------------------------------------------------------------------- tests
async def test_gpu_runaway_caps_only_that_gpu_then_ramps_back(tmp_path: Path) -> None:
    with pod_running(tmp_path) as pod:
        pod.request(cmd="workload", profile="steady", level=0.95)
        async with armed(pod, tmp_path) as (agent, service, truth):
            cap = 0.6 * DEFAULT_W
            pod.fault("gpu-runaway", "gpu3")
            trip = await event(agent, "interlock_trip", device="gpu3", within=20)
            assert trip.detail["interlock"] in ("gpu_runaway", "gpu_overtemp")
            if trip.detail["interlock"] == "gpu_runaway":
                assert_trip_detail(
                    trip,
                    {"temp_c", "rate_c_per_s"},
                    {"rate_c_per_s": 3.0, "window_s": 3.0, "min_temp_c": 70.0, "cap_pct": 60.0},
                )
                assert (
                    trip.detail["inputs"]["rate_c_per_s"] >= 3.0 and trip.detail["inputs"]["temp_c"] >= 70.0
                )
            else:
                assert_trip_detail(trip, {"temp_c"}, {"trip_c": 87.0, "clear_c": 80.0, "cap_pct": 60.0})
                assert trip.detail["inputs"]["temp_c"] >= 87.0
            assert trip.detail["gpus"] == ["gpu3"] and trip.detail["caps_w"] == {"gpu3": cap}
            capped = await truth.until(lambda s: abs(s.limits[3] - cap) <= 1, within=5, what="gpu3 capped")
            hottest = max(truth.samples[-1].temps[3], capped.temps[3])
            status = service.status()
            assert set(status["caps"]) == {"gpu3"}
            assert status["caps"]["gpu3"]["by"] == [trip.detail["interlock"]]
            assert status["caps"]["gpu3"]["applied_w"] == cap
            # The fault goes before the release: a ramp under a still-failed cold plate would re-trip.
            pod.fault("gpu-runaway", "gpu3", clear=True)
            clear = await event(
                agent, "interlock_clear", interlock=trip.detail["interlock"], device="gpu3", within=20
            )
            assert clear.detail["inputs"]["temp_c"] <= 80.0
            await truth.until(lambda s: s.limits[3] == DEFAULT_W, within=15, what="gpu3 back to default")
            assert truth.last.temps[3] < hottest  # the capped GPU cooled down
            # Only gpu3 was ever touched, in the physics as in the agent's actions.
            assert all(s.limits[i] == DEFAULT_W for s in truth.samples for i in range(8) if i != 3)
            assert {g for e in events(agent, "cap_applied") for g in e.detail["gpus"]} == {"gpu3"}
            assert not [e for e in events(agent, "interlock_trip") if e.device != "gpu3"]
            assert_ramp(truth, 3, cap)
            assert_audited(tmp_path / "state", trip.detail["interlock"], "gpu3", "gpu3")


async def test_chiller_trip_caps_the_loop_temperatures_recover(tmp_path: Path) -> None:
    # The chiller trip needs ~60 s of simulated time to push the CDU supply past 40 C: run at 6x.
    with pod_running(tmp_path, speed=6.0) as pod:
        pod.request(cmd="workload", profile="steady", level=0.9)
        async with armed(pod, tmp_path) as (agent, _service, truth):
            cap = 0.5 * DEFAULT_W
            pod.fault("chiller-trip", "chiller-1")
            trip = await event(
                agent, "interlock_trip", interlock="coolant_supply_high", device="cdu-1", within=40
            )
            assert_trip_detail(
                trip, {"supply_temp_c"}, {"trip_c": 40.0, "sustain_s": 1.0, "clear_c": 35.0, "cap_pct": 50.0}
            )
            assert trip.detail["inputs"]["supply_temp_c"] >= 40.0
            assert sorted(trip.detail["gpus"]) == [f"gpu{i}" for i in range(8)]
            capped = await truth.until(
                lambda s: all(abs(w - cap) <= 1 for w in s.limits),
                within=5,
                what="every GPU on cdu-1 capped to 50%",
            )
            before = [s for s in truth.samples if capped.t - 3 <= s.t < capped.t - 0.5]
            rise_before = (before[-1].supply_c - before[0].supply_c) / (before[-1].t - before[0].t)
            # Capped, the GPUs stop heating up and the loop gets less heat (with no chiller it still warms).
            later = await truth.until(lambda s: s.t >= capped.t + 3, within=6, what="3 s after the cap")
            assert max(later.temps) < max(capped.temps) - 3
            after = [s for s in truth.samples if later.t - 2.5 <= s.t <= later.t]
            rise_after = (after[-1].supply_c - after[0].supply_c) / (after[-1].t - after[0].t)
            assert rise_after < 0.8 * rise_before, (rise_before, rise_after)
            pod.fault("chiller-trip", "chiller-1", clear=True)
            await truth.until(lambda s: s.supply_c <= 35.0, within=20, what="supply back under 35 C")
            clear = await event(
                agent, "interlock_clear", interlock="coolant_supply_high", device="cdu-1", within=10
            )
            assert clear.detail["inputs"]["supply_temp_c"] <= 35.0
            await truth.until(lambda s: all(w == DEFAULT_W for w in s.limits), within=15, what="limits back")
            assert truth.last.supply_c < 34.0 and max(truth.last.temps) < max(capped.temps)
            for i in range(8):
                assert_ramp(truth, i, cap)
            assert_audited(tmp_path / "state", "coolant_supply_high", "cdu-1", "gpu0")


async def test_pdu_overload_brings_phase_current_under_75_pct(tmp_path: Path) -> None:
    # tiny's 16 A PDUs cannot be overloaded: a failed-over feed carries at most 8 x 700 W + base
    # = 7.9 kW = 11.8 A per phase (73.5%). Same pod with 13 A breakers: the failover is a real 90%.
    rating = 13.0
    spec = (POD_DIR / "tiny.toml").read_text().replace("rating_a = 16.0", f"rating_a = {rating}")
    assert spec.count(f"rating_a = {rating}") == 2
    pod_file = tmp_path / "tiny-13a.toml"
    pod_file.write_text(spec)
    with pod_running(tmp_path, str(pod_file)) as pod:
        pod.request(cmd="workload", profile="steady", level=1.0)
        async with armed(pod, tmp_path) as (agent, service, truth):
            assert max(truth.last.phase_a["pdu-a"]) < 0.6 * rating  # both feeds share the load
            pod.fault("pdu-overload", "pdu-a")
            over = await truth.until(
                lambda s: max(s.phase_a["pdu-a"]) >= 0.8 * rating, within=5, what="pdu-a over 80%"
            )
            trip = await event(
                agent, "interlock_trip", interlock="pdu_phase_overcurrent", device="pdu-a", within=15
            )
            assert trip.detail["inputs"]["worst_pct_of_rating"] >= 80.0
            assert trip.detail["inputs"]["rating_a"] == rating
            assert max(trip.detail["inputs"]["phase_current_a"]) >= 0.8 * rating
            assert_trip_detail(
                trip,
                {"phase_current_a"},
                {"trip_pct": 80.0, "immediate_pct": 95.0, "clear_pct": 75.0, "sustain_s": 2.0},
            )
            assert sorted(trip.detail["gpus"]) == [f"gpu{i}" for i in range(8)]
            under = await truth.until(
                lambda s: max(s.phase_a["pdu-a"]) < 0.75 * rating and max(s.limits) < DEFAULT_W,
                within=20,
                what="pdu-a phase current under 75% of its rating",
            )
            assert under.t > over.t
            lowest = min(min(s.limits) for s in truth.samples)
            assert "pdu_phase_overcurrent" in service.status()["caps"]["gpu0"]["by"]
            pod.fault("pdu-overload", "pdu-a", clear=True)
            await event(
                agent, "interlock_clear", interlock="pdu_phase_overcurrent", device="pdu-a", within=15
            )
            await truth.until(lambda s: all(w == DEFAULT_W for w in s.limits), within=20, what="limits back")
            # The overload never came back while the caps released (the partner feed is back).
            ramp = [s for s in truth.samples if s.t > under.t]
            assert all(max(s.phase_a["pdu-a"]) < 0.75 * rating for s in ramp)
            for i in range(8):
                assert_ramp(truth, i, lowest)
            assert_audited(tmp_path / "state", "pdu_phase_overcurrent", "pdu-a", "gpu0")


async def test_snmp_timeout_puts_fail_safe_cap_on_that_pdus_gpus(tmp_path: Path) -> None:
    with pod_running(tmp_path) as pod:
        pod.request(cmd="workload", profile="steady", level=0.8)
        async with armed(pod, tmp_path) as (agent, _service, truth):
            cap = 0.6 * DEFAULT_W
            pod.fault("snmp-timeout", "pdu-a")
            trip = await event(agent, "interlock_trip", interlock="sensor_stale", device="pdu-a", within=15)
            assert_trip_detail(
                trip,
                {"phase1_current_a", "phase2_current_a", "phase3_current_a"},
                {"stale_after_s": 3.0, "fresh_hold_s": 2.0, "cap_pct": 60.0},
            )
            assert sorted(trip.detail["gpus"]) == [f"gpu{i}" for i in range(8)]
            assert all(v != "fresh" for v in trip.detail["inputs"].values()), trip.detail["inputs"]
            await truth.until(
                lambda s: all(abs(w - cap) <= 1 for w in s.limits),
                within=5,
                what="pdu-a's GPUs at the fail-safe cap",
            )
            # Only pdu-a went stale: the other PDU has no trip.
            assert not events(agent, "interlock_trip", device="pdu-b")
            pod.fault("snmp-timeout", "pdu-a", clear=True)
            clear = await event(agent, "interlock_clear", interlock="sensor_stale", device="pdu-a", within=20)
            assert all(v == "fresh" for v in clear.detail["inputs"].values()), clear.detail["inputs"]
            await truth.until(lambda s: all(w == DEFAULT_W for w in s.limits), within=15, what="limits back")
            for i in range(8):
                assert_ramp(truth, i, cap)
            assert_audited(tmp_path / "state", "sensor_stale", "pdu-a", "gpu0")


async def test_coolant_leak_with_shed_caps_to_minimum_and_switches_the_loop_off(tmp_path: Path) -> None:
    with pod_running(tmp_path) as pod:
        async with armed(pod, tmp_path, extra="[interlocks.coolant_leak]\nshed = true\n") as (
            agent,
            service,
            truth,
        ):
            loop_gpus = set(next(iter(service.engine.topology.loops.values())))  # type: ignore[union-attr]
            wet = {
                (pdu, int(outlet))
                for pdu, outlets in service.engine.topology.outlet_gpus.items()  # type: ignore[union-attr]
                for outlet, gpus in outlets.items()
                if loop_gpus.intersection(gpus)
            }
            assert wet, "the tiny pod's PDUs feed the loop's servers"
            pod.fault("coolant-leak", "cdu-1")
            trip = await event(agent, "interlock_trip", interlock="coolant_leak", device="cdu-1", within=20)
            assert trip.needs_ack and trip.detail["inputs"] == {"leak": 1.0}
            shed = await event(agent, "interlock_trip", interlock="shed", device="cdu-1", within=10)
            assert shed.detail["cause"] == "coolant_leak"
            assert {(o["pdu"], int(o["outlet"])) for o in shed.detail["outlets"]} == wet

            def outlets_off() -> bool:
                st = pod.state()
                state = {(p["id"], o["index"]): o["on"] for p in st["pdus"] for o in p["outlets"]}
                return all(state[k] is False for k in wet)

            async with asyncio.timeout(15):
                while not await asyncio.to_thread(outlets_off):
                    await asyncio.sleep(0.2)
            # Every GPU on the loop is capped to its minimum as well (the caps come first).
            await truth.until(
                lambda s: all(s.limits[int(g[3:])] <= 200.0 + 1 for g in loop_gpus),
                within=10,
                what="min caps",
            )


async def test_chiller_trip_with_no_recovery_climbs_the_ladder(tmp_path: Path) -> None:
    # Thresholds, not sleeps, make it quick: a short rise window and hold, the pod at 6x speed.
    ladder = (
        "[interlocks.coolant_escalation]\n"
        "rise_window_s = 4.0\nrise_c = 0.2\nstage_hold_s = 3.0\ncritical_c = 80.0\n"
    )
    with pod_running(tmp_path, speed=6.0) as pod:
        pod.request(cmd="workload", profile="steady", level=0.9)
        async with armed(pod, tmp_path, extra=ladder) as (agent, _service, truth):
            try:
                pod.fault("chiller-trip", "chiller-1")
                alarm = await event(
                    agent, "interlock_trip", interlock="cooling_alarm", device="chiller-1", within=10
                )
                assert alarm.severity.value == "critical" and alarm.needs_ack
                assert alarm.detail["inputs"]["tripped"] == 1 and "tripped" in alarm.detail["raised"]
                # The device's own trip is reported before any temperature has moved far.
                assert not events(agent, "interlock_trip", interlock="coolant_supply_high")
                trip = await event(
                    agent, "interlock_trip", interlock="coolant_supply_high", device="cdu-1", within=40
                )
                climbs = await escalations(agent, "cdu-1", 2, within=60)
                stage1, stage2 = climbs[0], climbs[1]
                assert [stage1.detail["stage"], stage2.detail["stage"]] == [1, 2]
                for climb in (stage1, stage2):
                    assert climb.severity.value == "critical" and climb.needs_ack
                    assert climb.detail["inputs"]["rise_c"] >= 0.2
                    assert climb.detail["inputs"]["supply_temp_c"] >= trip.detail["inputs"]["supply_temp_c"]
                    assert trip.id in climb.detail["base_trips"]
                    assert sorted(climb.detail["gpus"]) == [f"gpu{i}" for i in range(8)]
                assert set(stage2.detail["caps_w"].values()) == {200.0}  # tiny's H100 minimum
                await truth.until(
                    lambda s: all(abs(w - 200.0) <= 1 for w in s.limits), within=10, what="minimum caps"
                )
                # One trip event for the loop, one cap_applied per batch (not one per GPU).
                assert len(events(agent, "interlock_trip", interlock="coolant_supply_high")) == 1
                applied = events(agent, "cap_applied")
                assert any(len(e.detail["gpus"]) == 8 for e in applied)
                assert len(applied) <= 6, [e.message for e in applied]
            finally:
                pod.fault("chiller-trip", "chiller-1", clear=True)


async def escalations(agent: Agent, device: str, n: int, *, within: float) -> list[Event]:
    """Until ``n`` ladder climbs on ``device`` are on the bus (awaited on the bus, no polling)."""
    more = asyncio.Event()
    unsubscribe = agent.events.subscribe(lambda e: more.set())
    try:
        async with asyncio.timeout(within):
            while len(found := events(agent, "interlock_escalation", device=device)) < n:
                more.clear()
                await more.wait()
    except TimeoutError:
        raise AssertionError(f"{len(events(agent, 'interlock_escalation'))} of {n} climbs") from None
    finally:
        unsubscribe()
    return found
