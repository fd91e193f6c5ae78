"""The pure interlock engine, rule by rule, and its invariants under random input sequences."""

from __future__ import annotations

import itertools
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.interlocks.config import InterlockConfig
from agent.interlocks.engine import Engine, Override, Topology
from agent.model import Quality, Reading

GPUS = ("gpu0", "gpu1", "gpu2", "gpu3")
MIN_W, MAX_W, DEFAULT_W = 200.0, 700.0, 700.0
WALL0 = 1_800_000_000.0


def topology(**kw: Any) -> Topology:
    base: dict[str, Any] = {
        "gpus": GPUS,
        "loops": {"cdu-1": GPUS},
        "pdus": {"pdu-a": GPUS},
        "pdu_rating_a": {"pdu-a": 16.0},
        "min_flow_lpm": {"cdu-1": 10.0},
        "stale_after_s": {**dict.fromkeys(GPUS, 3.0), "cdu-1": 3.0, "pdu-a": 3.0},
    }
    base.update(kw)
    return Topology(**base)


class Pod:
    """A hand-built snapshot: every interlock input fresh and normal unless a test changes it."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], float | None] = {}
        self.ts: dict[tuple[str, str], float] = {}
        for g in GPUS:
            self.set(g, "temp_c", 60.0)
            self.set(g, "power_w", 500.0)
            self.set(g, "min_power_limit_w", MIN_W)
            self.set(g, "max_power_limit_w", MAX_W)
            self.set(g, "default_power_limit_w", DEFAULT_W)
        self.set("cdu-1", "supply_temp_c", 30.0)
        self.set("cdu-1", "flow_lpm", 20.0)
        self.set("cdu-1", "pump_fault", 0.0)
        self.set("cdu-1", "leak", 0.0)
        for p in (1, 2, 3):
            self.set("pdu-a", f"phase{p}_current_a", 6.0)

    def set(self, device: str, metric: str, value: float | None, ts: float = 0.0) -> None:
        self.values[(device, metric)] = value
        self.ts[(device, metric)] = ts

    def touch(self, now: float) -> None:
        """Every reading freshly polled at `now`."""
        for k in self.ts:
            self.ts[k] = now

    def snapshot(self) -> dict[tuple[str, str], Reading]:
        return {
            k: Reading(
                k[0],
                k[1],
                v,
                ts_mono=self.ts[k],
                ts_wall=WALL0 + self.ts[k],
                quality=Quality.GOOD if v is not None else Quality.ERROR,
            )
            for k, v in self.values.items()
        }


# Step changes of temperature in these tests would also (rightly) trip gpu_runaway: tests of other
# rules switch it off so each test sees one rule.
NO_RUNAWAY = InterlockConfig.model_validate({"gpu_runaway": {"enabled": False}})


def engine(cfg: InterlockConfig | None = None, **kw: Any) -> Engine:
    return Engine(cfg or InterlockConfig(), topology(**kw.pop("topo", {})), started=0.0, **kw)


def run(eng: Engine, pod: Pod, t0: float, t1: float, dt: float = 1.0, **kw: Any) -> dict[str, float]:
    """Step once per dt from t0 to t1 (inclusive), inputs refreshed each step; returns the last caps."""
    caps: dict[str, float] = {}
    t = t0
    while t <= t1 + 1e-9:
        pod.touch(t)
        caps = eng.step(pod.snapshot(), t, WALL0 + t, **kw).caps
        t += dt
    return caps


def trips(eng: Engine) -> set[tuple[str, str]]:
    return {(i.interlock, i.device) for i in eng.active()}


# ------------------------------------------------------------------------------------ per rule
def test_quiet_pod_no_caps() -> None:
    eng, pod = engine(), Pod()
    caps = run(eng, pod, 0, 60)
    assert caps == dict.fromkeys(GPUS, DEFAULT_W)
    assert not trips(eng)


def test_overtemp_trips_at_threshold_not_just_under() -> None:
    eng, pod = engine(NO_RUNAWAY), Pod()
    run(eng, pod, 0, 20)
    pod.set("gpu1", "temp_c", 86.9)
    caps = run(eng, pod, 21, 30)
    assert not trips(eng) and caps["gpu1"] == DEFAULT_W
    pod.set("gpu1", "temp_c", 87.0)
    pod.touch(31)
    d = eng.step(pod.snapshot(), 31, WALL0 + 31)
    assert trips(eng) == {("gpu_overtemp", "gpu1")}
    assert d.caps["gpu1"] == 0.6 * DEFAULT_W and d.caps["gpu0"] == DEFAULT_W
    (event,) = [e for e in d.events if e.kind == "interlock_trip"]
    assert event.detail["inputs"] == {"temp_c": 87.0}
    assert event.detail["thresholds"]["trip_c"] == 87.0 and event.detail["caps_w"] == {"gpu1": 420.0}


def test_overtemp_hysteresis_and_hold_time_then_ramped_release() -> None:
    eng, pod = engine(NO_RUNAWAY), Pod()
    run(eng, pod, 0, 20)
    pod.set("gpu2", "temp_c", 90.0)
    run(eng, pod, 21, 21)
    pod.set("gpu2", "temp_c", 82.0)  # below trip, above clear: stays tripped however long
    caps = run(eng, pod, 22, 120)
    assert ("gpu_overtemp", "gpu2") in trips(eng) and caps["gpu2"] == 420.0
    pod.set("gpu2", "temp_c", 79.0)
    caps = run(eng, pod, 121, 150)  # 30 s at <= 80 C: holds until the hold time is over
    assert ("gpu_overtemp", "gpu2") in trips(eng) and caps["gpu2"] == 420.0
    caps = run(eng, pod, 151, 151)
    assert not trips(eng)
    # Ramped release: +10% of default (70 W) every 5 s, never a jump.
    seen = [caps["gpu2"]]
    for t in range(152, 200):
        pod.touch(t)
        seen.append(eng.step(pod.snapshot(), t, WALL0 + t).caps["gpu2"])
    steps = [b - a for a, b in itertools.pairwise(seen) if b != a]
    assert steps and all(abs(s - 70.0) < 1e-6 or 0 < s < 70.0 for s in steps)
    assert seen[-1] == DEFAULT_W


def test_hold_resets_if_temperature_rises_again() -> None:
    eng, pod = engine(NO_RUNAWAY), Pod()
    pod.set("gpu0", "temp_c", 88.0)
    run(eng, pod, 0, 0)
    pod.set("gpu0", "temp_c", 79.0)
    run(eng, pod, 1, 20)
    pod.set("gpu0", "temp_c", 81.0)  # back above clear before 30 s: the hold restarts
    run(eng, pod, 21, 21)
    pod.set("gpu0", "temp_c", 79.0)
    run(eng, pod, 22, 50)
    assert ("gpu_overtemp", "gpu0") in trips(eng)
    run(eng, pod, 51, 52)
    assert ("gpu_overtemp", "gpu0") not in trips(eng)


def test_runaway_needs_rate_over_window_and_minimum_temperature() -> None:
    eng, pod = engine(), Pod()
    temps = [60, 63.5, 67, 70.5, 74]  # 3.5 C/s
    for t, v in enumerate(temps):
        pod.set("gpu3", "temp_c", v)
        run(eng, pod, t, t)
    assert ("gpu_runaway", "gpu3") in trips(eng)
    # Same rate below 70 C: nothing.
    eng2, pod2 = engine(), Pod()
    for t, v in enumerate([40, 43.5, 47, 50.5, 54]):
        pod2.set("gpu3", "temp_c", v)
        run(eng2, pod2, t, t)
    assert not trips(eng2)
    # Just under the rate at high temperature: nothing.
    eng3, pod3 = engine(), Pod()
    for t, v in enumerate([70, 72.9, 75.8, 78.7, 81.6]):
        pod3.set("gpu3", "temp_c", v)
        run(eng3, pod3, t, t)
    assert not trips(eng3)


def test_coolant_supply_high_sustain_and_loop_wide_cap() -> None:
    eng, pod = engine(), Pod()
    run(eng, pod, 0, 10)
    pod.set("cdu-1", "supply_temp_c", 40.5)
    run(eng, pod, 11, 15)  # 4 s of 5
    assert not trips(eng)
    caps = run(eng, pod, 16, 16)
    assert ("coolant_supply_high", "cdu-1") in trips(eng)
    assert all(caps[g] == 350.0 for g in GPUS)
    pod.set("cdu-1", "supply_temp_c", 36.0)  # between clear and trip: holds
    run(eng, pod, 17, 200)
    assert ("coolant_supply_high", "cdu-1") in trips(eng)
    pod.set("cdu-1", "supply_temp_c", 35.0)
    run(eng, pod, 201, 260)
    assert ("coolant_supply_high", "cdu-1") in trips(eng)
    run(eng, pod, 261, 262)
    assert not trips(eng)


def test_flow_low_or_pump_fault() -> None:
    eng, pod = engine(), Pod()
    pod.set("cdu-1", "pump_fault", 1.0)
    caps = run(eng, pod, 0, 3)
    assert ("coolant_flow_low", "cdu-1") in trips(eng) and caps["gpu0"] == 0.4 * DEFAULT_W
    pod.set("cdu-1", "pump_fault", 0.0)
    pod.set("cdu-1", "flow_lpm", 9.9)  # still low: stays
    run(eng, pod, 4, 100)
    assert ("coolant_flow_low", "cdu-1") in trips(eng)


def test_leak_caps_to_minimum_and_clears_only_after_dry_and_ack() -> None:
    eng, pod = engine(), Pod()
    pod.set("cdu-1", "leak", 1.0)
    pod.touch(0)
    d = eng.step(pod.snapshot(), 0, WALL0)
    assert all(d.caps[g] == MIN_W for g in GPUS)
    (trip,) = [e for e in d.events if e.kind == "interlock_trip"]
    assert trip.needs_ack and trip.severity == "critical"
    pod.set("cdu-1", "leak", 0.0)
    run(eng, pod, 1, 100)  # dry, but nobody acknowledged
    assert ("coolant_leak", "cdu-1") in trips(eng)
    run(eng, pod, 101, 101, acked={trip.id})
    assert ("coolant_leak", "cdu-1") not in trips(eng)


def test_pdu_overcurrent_sustained_immediate_and_tightening() -> None:
    eng, pod = engine(), Pod()
    pod.set("pdu-a", "phase2_current_a", 13.0)  # 81%
    run(eng, pod, 0, 9)
    assert not trips(eng)
    caps = run(eng, pod, 10, 10)
    assert ("pdu_phase_overcurrent", "pdu-a") in trips(eng)
    first = caps["gpu0"]
    assert first < 500.0  # aimed below the present draw
    caps = run(eng, pod, 11, 25)  # still >= 75%: tightens every 5 s
    assert caps["gpu0"] < first
    pod.set("pdu-a", "phase2_current_a", 11.9)  # 74%: holds 60 s then clears
    run(eng, pod, 26, 85)
    assert ("pdu_phase_overcurrent", "pdu-a") in trips(eng)
    run(eng, pod, 86, 87)
    assert not trips(eng)
    eng2, pod2 = engine(), Pod()
    pod2.set("pdu-a", "phase1_current_a", 15.3)  # 95.6%: at once
    run(eng2, pod2, 0, 0)
    assert ("pdu_phase_overcurrent", "pdu-a") in trips(eng2)


def test_stale_input_applies_fail_safe_and_needs_fresh_hold() -> None:
    eng, pod = engine(), Pod()
    run(eng, pod, 0, 20)
    # The PDU stops answering: its readings age past 3 s.
    t = 21.0
    stale_at = None
    for t in range(21, 30):
        for k in list(pod.ts):
            pod.ts[k] = t if k[0] != "pdu-a" else 20.0
        d = eng.step(pod.snapshot(), t, WALL0 + t)
        if ("sensor_stale", "pdu-a") in trips(eng) and stale_at is None:
            stale_at = t
            assert all(d.caps[g] == 0.6 * DEFAULT_W for g in GPUS)
    assert stale_at == 24  # older than 3 s
    run(eng, pod, 30, 39)  # fresh again, but not for 10 s yet
    assert ("sensor_stale", "pdu-a") in trips(eng)
    run(eng, pod, 40, 41)
    assert ("sensor_stale", "pdu-a") not in trips(eng)


def test_error_quality_is_stale_and_startup_grace() -> None:
    eng, pod = engine(), Pod()
    del pod.values[("cdu-1", "supply_temp_c")]
    del pod.ts[("cdu-1", "supply_temp_c")]
    run(eng, pod, 0, 10)  # never received, within the 15 s grace
    assert not trips(eng)
    run(eng, pod, 11, 16)
    assert ("sensor_stale", "cdu-1") in trips(eng)
    eng2, pod2 = engine(), Pod()
    pod2.set("gpu1", "temp_c", None)  # NVML error: value None, quality ERROR
    run(eng2, pod2, 0, 0)
    assert ("sensor_stale", "gpu1") in trips(eng2)


def test_lowest_cap_wins_and_external_caps_combine() -> None:
    eng, pod = engine(NO_RUNAWAY), Pod()
    pod.set("gpu0", "temp_c", 90.0)  # 60% = 420 W
    pod.set("cdu-1", "pump_fault", 1.0)  # 40% = 280 W on every GPU
    caps = run(eng, pod, 0, 3, external_caps={"gpu0": (250.0, "budget"), "gpu1": (600.0, "budget")})
    assert caps["gpu0"] == 250.0 and caps["gpu1"] == 280.0 and caps["gpu2"] == 280.0


def test_cap_never_below_min_constraint() -> None:
    eng, pod = engine(), Pod()
    caps = run(eng, pod, 0, 1, external_caps={"gpu0": (5.0, "budget")})
    assert caps["gpu0"] == MIN_W


def test_override_suppresses_one_interlock_on_one_device_until_expiry() -> None:
    eng, pod = engine(NO_RUNAWAY), Pod()
    pod.set("gpu0", "temp_c", 90.0)
    pod.set("gpu1", "temp_c", 90.0)
    ov = Override("ov-1", "gpu_overtemp", "gpu0", "burn-in test", "tech", WALL0, WALL0 + 30)
    caps = run(eng, pod, 0, 10, overrides=[ov])
    assert caps["gpu0"] == DEFAULT_W and caps["gpu1"] == 420.0
    caps = run(eng, pod, 31, 31, overrides=[ov])  # expired: the cap applies again
    assert caps["gpu0"] == 420.0


def test_reconcile_keeps_justified_cap_and_ramps_the_rest() -> None:
    pod = Pod()
    pod.set("gpu0", "temp_c", 90.0)
    eng = engine(NO_RUNAWAY, initial_limits={"gpu0": 300.0, "gpu1": 300.0})
    caps = run(eng, pod, 0, 0)
    assert caps["gpu0"] == 300.0  # already capped lower than overtemp's 420: nothing rises at once
    assert caps["gpu1"] == 300.0
    caps = run(eng, pod, 1, 60)
    assert caps["gpu0"] == 420.0 and caps["gpu1"] == DEFAULT_W


def test_shed_switches_off_hottest_server_when_enabled() -> None:
    cfg = InterlockConfig.model_validate({"shed": {"enabled": True, "after_caps_s": 30}})
    outlets = {"pdu-a": {1: ("gpu0", "gpu1"), 2: ("gpu2", "gpu3")}}
    eng, pod = engine(cfg, topo={"outlet_gpus": outlets}), Pod()
    pod.set("cdu-1", "supply_temp_c", 52.0)
    pod.set("gpu2", "temp_c", 95.0)
    actions = []
    for t in range(45):
        pod.touch(t)
        actions += eng.step(pod.snapshot(), t, WALL0 + t).actions
    assert [(a.kind, a.device, a.value) for a in actions] == [("outlet_off", "pdu-a", 2)]


def test_disabled_shed_never_acts() -> None:
    eng, pod = engine(topo={"outlet_gpus": {"pdu-a": {1: GPUS}}}), Pod()
    pod.set("cdu-1", "supply_temp_c", 60.0)
    actions = []
    for t in range(120):
        pod.touch(t)
        actions += eng.step(pod.snapshot(), t, WALL0 + t).actions
    assert actions == []


# ------------------------------------------------------------------------------------ properties
@st.composite
def scenarios(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(5, 60))
    steps = []
    for _ in range(n):
        steps.append(
            {
                "dt": draw(st.sampled_from([0.2, 1.0, 3.0, 7.0])),
                "temps": draw(st.lists(st.one_of(st.none(), st.floats(20, 110)), min_size=4, max_size=4)),
                "supply": draw(st.one_of(st.none(), st.floats(15, 60))),
                "flow": draw(st.one_of(st.none(), st.floats(0, 30))),
                "leak": draw(st.sampled_from([0.0, 0.0, 0.0, 1.0])),
                "phase": draw(st.one_of(st.none(), st.floats(0, 20))),
                "stale_pdu": draw(st.booleans()),
                "budget": draw(st.one_of(st.none(), st.floats(0, 1000))),
                "ack": draw(st.booleans()),
            }
        )
    return steps


def drive(steps: list[dict[str, Any]]):  # type: ignore[no-untyped-def]
    eng, pod = engine(), Pod()
    t = 0.0
    acked: set[str] = set()
    for s in steps:
        t += s["dt"]
        for i, g in enumerate(GPUS):
            pod.set(g, "temp_c", s["temps"][i], t)
        pod.set("cdu-1", "supply_temp_c", s["supply"], t)
        pod.set("cdu-1", "flow_lpm", s["flow"], t)
        pod.set("cdu-1", "leak", s["leak"], t)
        for p in (1, 2, 3):
            pod.set("pdu-a", f"phase{p}_current_a", s["phase"], 0.0 if s["stale_pdu"] else t)
        for g in GPUS:
            for m in ("min_power_limit_w", "max_power_limit_w", "default_power_limit_w", "power_w"):
                pod.ts[(g, m)] = t
        before = {k: dict(i.caps) for k, i in eng.instances.items() if i.tripped}
        ext = {} if s["budget"] is None else {"gpu1": (s["budget"], "budget")}
        snap = pod.snapshot()
        d = eng.step(snap, t, WALL0 + t, external_caps=ext, acked=acked)
        _LAST_SNAPSHOT[:] = [snap, t]
        if s["ack"]:
            acked |= {e.id for e in d.events if e.needs_ack}
        yield eng, d, before


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_caps_always_within_constraints(steps: list[dict[str, Any]]) -> None:
    for _eng, d, _ in drive(steps):
        for cap in d.caps.values():
            assert MIN_W <= cap <= MAX_W


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_a_cap_never_rises_while_its_interlock_holds(steps: list[dict[str, Any]]) -> None:
    for eng, _d, before in drive(steps):
        for key, caps in before.items():
            inst = eng.instances[key]
            if not inst.tripped:
                continue
            for gpu, w in inst.caps.items():
                assert w <= caps.get(gpu, w) + 1e-9, (key, gpu)


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_applied_cap_never_above_lowest_active_cap_and_rises_only_by_ramp(
    steps: list[dict[str, Any]],
) -> None:
    last: dict[str, float] = {}
    for eng, d, _ in drive(steps):
        active = eng.caps_by_gpu(set())
        for gpu, cap in d.caps.items():
            lowest = min((w for w, _ in active.get(gpu, [])), default=MAX_W)
            assert cap <= max(lowest, MIN_W) + 1e-9
            if gpu in last and cap > last[gpu]:
                assert cap - last[gpu] <= 0.1 * DEFAULT_W + 1e-9
            last[gpu] = cap


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_engine_is_deterministic(steps: list[dict[str, Any]]) -> None:
    a = [(d.caps, [(e.kind, e.device) for e in d.events]) for _, d, _ in drive(steps)]
    b = [(d.caps, [(e.kind, e.device) for e in d.events]) for _, d, _ in drive(steps)]
    assert a == b


def test_every_trip_event_explains_itself() -> None:
    eng, pod = engine(NO_RUNAWAY), Pod()
    pod.set("gpu0", "temp_c", 95.0)
    pod.set("cdu-1", "pump_fault", 1.0)
    pod.set("pdu-a", "phase1_current_a", 15.5)
    events = []
    for t in range(5):
        pod.touch(t)
        events += eng.step(pod.snapshot(), t, WALL0 + t).events
    tripped = {e.detail["interlock"] for e in events if e.kind == "interlock_trip"}
    assert {"gpu_overtemp", "coolant_flow_low", "pdu_phase_overcurrent"} <= tripped
    for e in events:
        if e.kind == "interlock_trip":
            assert e.detail["inputs"] and e.detail["thresholds"], e


# ------------------------------------------------------------------------------ scale helpers
def test_partial_step_reports_the_gpus_it_evaluated() -> None:
    eng, pod = engine(NO_RUNAWAY), Pod()
    run(eng, pod, 0, 20)
    pod.set("gpu1", "temp_c", 90.0)
    pod.touch(21)
    d = eng.step(pod.snapshot(), 21, WALL0 + 21, changed={"gpu1"})
    assert d.evaluated == {"gpu1": 0.6 * DEFAULT_W}  # what the service dispatches
    assert d.caps == {**dict.fromkeys(GPUS, DEFAULT_W), "gpu1": 0.6 * DEFAULT_W}
    full = eng.step(pod.snapshot(), 21.5, WALL0 + 21.5)
    assert full.evaluated == full.caps and set(full.caps) == set(GPUS)


def test_new_constraint_readings_take_effect_at_once() -> None:
    """The engine memoizes a GPU's limits per reading: a new reading must never be hidden."""
    eng, pod = engine(NO_RUNAWAY), Pod()
    run(eng, pod, 0, 20)
    pod.set("gpu1", "temp_c", 90.0)
    caps = run(eng, pod, 21, 22)
    assert caps["gpu1"] == 0.6 * DEFAULT_W
    # The driver re-reads the constraints: a lower default (an admin lowered it) and max.
    pod.set("gpu1", "default_power_limit_w", 500.0)
    pod.set("gpu2", "max_power_limit_w", 600.0)
    caps = run(eng, pod, 23, 23)
    assert caps["gpu1"] == 0.6 * 500.0  # tighter: applied at once
    assert caps["gpu2"] == 600.0  # clamped into the new [min, max]


def test_leak_with_shed_switches_off_every_server_on_the_loop_once() -> None:
    cfg = InterlockConfig.model_validate({"coolant_leak": {"shed": True}})
    outlets = {"pdu-a": {1: ("gpu0", "gpu1"), 2: ("gpu2", "gpu3"), 3: ("gpu9",)}}  # gpu9: not on it
    eng, pod = engine(cfg, topo={"outlet_gpus": outlets}), Pod()
    run(eng, pod, 0, 5)
    pod.set("cdu-1", "leak", 1.0)
    actions, events = [], []
    for t in range(6, 30):
        pod.touch(t)
        d = eng.step(pod.snapshot(), t, WALL0 + t)
        actions += d.actions
        events += d.events
    assert sorted((a.kind, a.device, a.value) for a in actions) == [
        ("outlet_off", "pdu-a", 1),
        ("outlet_off", "pdu-a", 2),
    ]
    (shed,) = [e for e in events if e.detail.get("interlock") == "shed"]
    assert shed.needs_ack and shed.severity == "critical" and shed.detail["cause"] == "coolant_leak"
    # Acknowledging the shed while the loop is still wet does not switch anything off again.
    for t in range(30, 40):
        pod.touch(t)
        assert not eng.step(pod.snapshot(), t, WALL0 + t, acked={shed.id}).actions


def test_leak_without_shed_only_caps() -> None:
    eng, pod = engine(topo={"outlet_gpus": {"pdu-a": {1: GPUS}}}), Pod()
    pod.set("cdu-1", "leak", 1.0)
    actions = []
    for t in range(30):
        pod.touch(t)
        actions += eng.step(pod.snapshot(), t, WALL0 + t).actions
    assert actions == [] and ("coolant_leak", "cdu-1") in trips(eng)


# ------------------------------------------------------------------------------ escalation ladder
ESCALATE = InterlockConfig.model_validate(
    {
        "gpu_runaway": {"enabled": False},
        "gpu_overtemp": {"enabled": False},
        "coolant_escalation": {"rise_window_s": 10.0, "rise_c": 1.0, "stage_hold_s": 10.0},
    }
)


def test_ladder_climbs_while_the_supply_still_rises_under_caps() -> None:
    eng, pod = engine(ESCALATE), Pod()
    run(eng, pod, 0, 10)
    events: list[Any] = []
    t, supply = 11.0, 41.0
    caps: dict[str, float] = {}
    while t <= 80:  # the chiller is gone: the supply climbs 0.2 C/s whatever the caps do
        pod.set("cdu-1", "supply_temp_c", supply)
        pod.touch(t)
        d = eng.step(pod.snapshot(), t, WALL0 + t)
        events += d.events
        caps = d.caps
        t, supply = t + 1.0, supply + 0.2
    trip = next(
        e for e in events if e.kind == "interlock_trip" and e.detail["interlock"] == "coolant_supply_high"
    )
    climbs = [e for e in events if e.kind == "interlock_escalation"]
    assert [e.detail["stage"] for e in climbs] == [1, 2]
    for e in climbs:
        assert e.severity.value == "critical" and e.needs_ack and e.device == "cdu-1"
        assert e.detail["gpus"] == list(GPUS) and set(e.detail["caps_w"]) == set(GPUS)
        assert e.detail["inputs"]["rise_c"] >= 1.0 and e.detail["thresholds"]["stage_hold_s"] == 10.0
        assert trip.id in e.detail["base_trips"]
    assert climbs[0].detail["caps_w"]["gpu0"] == 0.3 * DEFAULT_W
    assert climbs[1].detail["caps_w"]["gpu0"] == MIN_W
    # Each rung waited its hold after the one before.
    assert climbs[1].ts_wall - climbs[0].ts_wall >= 10.0
    assert caps == dict.fromkeys(GPUS, MIN_W)
    # One event per trip, each listing every GPU it capped: no event per GPU.
    assert len([e for e in events if e.kind == "interlock_trip"]) == 1


def test_ladder_stays_put_when_the_caps_hold_the_supply_and_clears_with_them() -> None:
    eng, pod = engine(ESCALATE), Pod()
    run(eng, pod, 0, 10)
    pod.set("cdu-1", "supply_temp_c", 41.0)
    caps = run(eng, pod, 11, 60)
    assert caps == dict.fromkeys(GPUS, 0.5 * DEFAULT_W)  # caps in force, supply flat: no climb
    assert ("coolant_escalation", "cdu-1") not in trips(eng)
    pod.set("cdu-1", "supply_temp_c", 46.0)  # past critical_c (45): a climb without a rise
    pod.touch(61)
    d = eng.step(pod.snapshot(), 61, WALL0 + 61)
    (climb,) = [e for e in d.events if e.kind == "interlock_escalation"]
    assert climb.detail["stage"] == 1 and "critical" in climb.detail["why"]
    pod.set("cdu-1", "supply_temp_c", 30.0)
    events: list[Any] = []
    for t in range(62, 140):
        pod.touch(t)
        events += eng.step(pod.snapshot(), t, WALL0 + t).events
    cleared = [e.detail["interlock"] for e in events if e.kind == "interlock_clear"]
    assert "coolant_supply_high" in cleared and "coolant_escalation" in cleared


def test_ladder_ends_in_shed_when_enabled() -> None:
    cfg = ESCALATE.model_copy(update={"shed": ESCALATE.shed.model_copy(update={"enabled": True})})
    eng = engine(cfg, topo={"outlet_gpus": {"pdu-a": {1: ("gpu0", "gpu1"), 2: ("gpu2", "gpu3")}}})
    pod = Pod()
    run(eng, pod, 0, 10)
    actions, events = [], []
    t, supply = 11.0, 41.0
    while t <= 90:  # stays under shed.critical_c (50 C) until late: the ladder sheds first
        pod.set("cdu-1", "supply_temp_c", min(supply, 49.0))
        pod.touch(t)
        d = eng.step(pod.snapshot(), t, WALL0 + t)
        actions += d.actions
        events += d.events
        t, supply = t + 1.0, supply + 0.2
    sheds = [e for e in events if e.kind == "interlock_trip" and e.detail["interlock"] == "shed"]
    assert len(sheds) == 1 and sheds[0].needs_ack
    assert [a.kind for a in actions] == ["outlet_off"]


def test_a_chiller_trip_is_an_event_at_once_and_clears_when_it_reads_zero() -> None:
    topo = {"alarm_metrics": {"chiller-1": ("tripped", "alarms")}, "cooled_gpus": {"chiller-1": GPUS}}
    eng, pod = engine(NO_RUNAWAY, topo=topo), Pod()
    pod.set("chiller-1", "tripped", 0.0)
    pod.set("chiller-1", "alarms", 0.0)
    run(eng, pod, 0, 5)
    pod.set("chiller-1", "tripped", 1.0)
    pod.set("chiller-1", "alarms", 1.0)
    pod.touch(6)
    d = eng.step(pod.snapshot(), 6, WALL0 + 6, changed={"chiller-1"})
    (trip,) = d.events
    assert trip.kind == "interlock_trip" and trip.detail["interlock"] == "cooling_alarm"
    assert trip.severity.value == "critical" and trip.needs_ack
    assert trip.detail["inputs"] == {"tripped": 1, "alarms": 1} and trip.detail["raised"] == [
        "alarms",
        "tripped",
    ]
    assert trip.detail["gpus"] == list(GPUS)
    assert d.caps == dict.fromkeys(GPUS, DEFAULT_W)  # an event, not (yet) a cap: the ladder caps
    assert not [e for e in run_events(eng, pod, 7, 12) if e.kind == "interlock_trip"]  # once
    pod.set("chiller-1", "tripped", 0.0)
    pod.set("chiller-1", "alarms", 0.0)
    assert [e.kind for e in run_events(eng, pod, 13, 14)] == ["interlock_clear"]


def run_events(eng: Engine, pod: Pod, t0: int, t1: int) -> list[Any]:
    out: list[Any] = []
    for t in range(t0, t1 + 1):
        pod.touch(t)
        out += eng.step(pod.snapshot(), t, WALL0 + t).events
    return out


# ------------------------------------------------------------------------------ more properties
INPUTS = [
    *((g, "temp_c") for g in GPUS),
    *(
        (g, m)
        for g in GPUS
        for m in ("min_power_limit_w", "max_power_limit_w", "default_power_limit_w", "power_w")
    ),
    ("cdu-1", "supply_temp_c"),
    ("cdu-1", "flow_lpm"),
    ("cdu-1", "pump_fault"),
    ("cdu-1", "leak"),
    *(("pdu-a", f"phase{p}_current_a") for p in (1, 2, 3)),
]
DEVICES = (*GPUS, "cdu-1", "pdu-a")


@settings(max_examples=40, deadline=None)
@given(scenarios(), st.data())
def test_a_partial_step_gives_the_caps_of_a_full_step(
    steps: list[dict[str, Any]], data: st.DataObject
) -> None:
    """The service evaluates only the devices with new readings; on the same inputs (and the same
    engine memory) that gives the very caps a full evaluation gives for every GPU it evaluates,
    but for a release: a partial step lowers at once and leaves the ramp's rises to the clock's
    full step, so where the full step raises a cap the partial one keeps the cap it had."""
    import copy

    for eng, _d, _ in drive(steps):
        pod_changed = data.draw(st.sets(st.sampled_from(DEVICES), min_size=1))
        snap = dict(_LAST_SNAPSHOT[0])
        t = _LAST_SNAPSHOT[1] + 0.1
        for (dev, metric), r in list(snap.items()):
            if dev in pod_changed and r.value is not None and metric in ("temp_c", "supply_temp_c"):
                snap[(dev, metric)] = r._replace(value=r.value + 0.5, ts_mono=t)
        full, part = copy.deepcopy(eng), copy.deepcopy(eng)
        a = full.step(snap, t, WALL0 + t)
        b = part.step(snap, t, WALL0 + t, changed=pod_changed)
        assert b.evaluated is not None
        for gpu, cap in b.evaluated.items():
            prev = eng.last_caps.get(gpu)
            if prev is not None and a.caps[gpu] > prev:
                assert cap == prev, (gpu, pod_changed)  # a release: the clock's to make
            else:
                assert cap == a.caps[gpu], (gpu, pod_changed)


_LAST_SNAPSHOT: list[Any] = [{}, 0.0]


@settings(max_examples=40, deadline=None)
@given(scenarios(), st.sampled_from(INPUTS), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nan_and_inf_in_any_input_never_give_a_higher_cap_than_a_missing_input(
    steps: list[dict[str, Any]], key: tuple[str, str], bad: float
) -> None:
    import copy

    for eng, _d, _ in drive(steps):
        snap, t = dict(_LAST_SNAPSHOT[0]), _LAST_SNAPSHOT[1] + 0.1
        r = snap.get(key)
        if r is None:
            continue
        with_bad = {**snap, key: r._replace(value=bad, quality=Quality.GOOD, ts_mono=t)}
        missing = {**snap, key: r._replace(value=None, quality=Quality.ERROR, ts_mono=t)}
        a = copy.deepcopy(eng).step(with_bad, t, WALL0 + t)
        b = copy.deepcopy(eng).step(missing, t, WALL0 + t)
        for gpu, cap in a.caps.items():
            assert math.isfinite(cap)
            assert cap <= b.caps[gpu] + 1e-9, (key, bad, gpu)


def test_pdu_overcurrent_scales_the_instantaneous_draw_where_nvml_gives_it() -> None:
    # power_w is NVML's 1 s average; power_instant_w (NVML_FI_DEV_POWER_INSTANT) is the draw now.
    eng, pod = engine(), Pod()
    for g in GPUS:
        pod.set(g, "power_instant_w", 600.0)
    pod.set("pdu-a", "phase1_current_a", 15.3)  # at once
    caps = run(eng, pod, 0, 0)
    eng2, pod2 = engine(), Pod()  # the same without the field: the average is used
    pod2.set("pdu-a", "phase1_current_a", 15.3)
    caps2 = run(eng2, pod2, 0, 0)
    assert abs(caps["gpu0"] - caps2["gpu0"] * 600.0 / 500.0) < 1e-6
