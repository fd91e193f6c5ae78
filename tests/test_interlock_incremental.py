"""The incremental engine against the exhaustive one (``Engine(incremental=False)``).

The incremental engine skips the rules of a GPU whose temperature reading is the one its rules
last saw (nothing tripped), reads each GPU's interlock caps from a ledger kept as instances trip,
tighten and clear, and recomputes the combined cap of only the GPUs whose inputs to it moved (and,
on the clock's full step, of those still ramping up). The exhaustive engine runs every GPU's rules
and combines every GPU from a scan of the instances at every step. Driven by the same random
sequence of full and partial steps (readings that arrive, repeat, go bad or simply age out; a
fleet budget that comes and goes; overrides; acks), the two must decide exactly the same: the
same caps, the same events with the same ids, the same instance and GPU memory, at every step.
Snapshots reuse a reading object until its value or time changes, as the store does, so the
skipping is exercised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.interlocks.config import InterlockConfig
from agent.interlocks.engine import Engine, Override
from agent.model import Quality, Reading
from tests.test_interlock_engine import DEFAULT_W, GPUS, MAX_W, MIN_W, WALL0, topology

PDUS = {"pdu-a": GPUS, "pdu-b": GPUS[2:]}
INPUTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(GPUS, ("temp_c",)),
    "cdu-1": ("supply_temp_c", "flow_lpm", "leak", "pump_fault"),
    "pdu-a": ("phase1_current_a", "phase2_current_a", "phase3_current_a"),
    "pdu-b": ("phase1_current_a", "phase2_current_a", "phase3_current_a"),
}
VALUES: dict[str, Any] = {
    "temp_c": st.one_of(st.floats(30, 62), st.floats(60, 100), st.none(), st.just(math.nan)),
    "supply_temp_c": st.one_of(st.floats(20, 34), st.floats(34, 55), st.none()),
    "flow_lpm": st.one_of(st.floats(12, 30), st.floats(0, 12), st.none()),
    "leak": st.sampled_from([0.0, 0.0, 0.0, 0.0, 1.0]),
    "pump_fault": st.sampled_from([0.0, 0.0, 0.0, 1.0]),
    **{f"phase{p}_current_a": st.one_of(st.floats(0, 12), st.floats(12, 17), st.none()) for p in (1, 2, 3)},
}


class StoreLike:
    """Readings as the store keeps them: one object per (device, metric) until a new one comes."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], Reading] = {}

    def put(self, device: str, metric: str, value: float | None, ts: float) -> None:
        q = Quality.GOOD if value is not None else Quality.ERROR
        self.latest[(device, metric)] = Reading(
            device, metric, value, ts_mono=ts, ts_wall=WALL0 + ts, quality=q
        )


NORMAL = {
    "temp_c": 50.0,
    "supply_temp_c": 30.0,
    "flow_lpm": 20.0,
    "leak": 0.0,
    "pump_fault": 0.0,
    **{f"phase{p}_current_a": 6.0 for p in (1, 2, 3)},
}


@st.composite
def sequences(draw: st.DrawFn) -> list[dict[str, Any]]:
    steps = []
    for _ in range(draw(st.integers(5, 45))):
        readings: dict[str, dict[str, float | None] | None] = {}
        for device in sorted(INPUTS):
            # Nothing new (the store keeps its reading object), the same values polled again, or
            # new ones (normal, near or past a threshold, bad).
            what = draw(st.sampled_from(["keep", "keep", "again", "again", "new"]))
            if what == "again":
                readings[device] = None
            elif what == "new":
                readings[device] = {m: draw(VALUES[m]) for m in INPUTS[device]}
        steps.append(
            {
                "dt": draw(st.sampled_from([0.05, 0.2, 0.5, 1.0, 1.0, 2.5, 6.0])),
                "readings": readings,
                # The constraints come again (a node's full answer): new objects, maybe new values.
                "limits": draw(st.sampled_from([None, None, None, MAX_W, 650.0, 550.0])),
                "full": draw(st.booleans()),
                "extra": draw(st.sets(st.sampled_from(sorted(INPUTS)), max_size=2)),
                "budget": draw(st.one_of(st.none(), st.none(), st.floats(150, 800))),
                "override": draw(st.sampled_from([None, None, "gpu_overtemp:gpu1", "sensor_stale:pdu-a"])),
                "ack": draw(st.booleans()),
            }
        )
    return steps


def _mem(eng: Engine) -> dict[str, tuple[Any, ...]]:
    return {g: (m.applied_w, m.last_raise, tuple(m.temps)) for g, m in eng.gpu_mem.items()}


def _instances(eng: Engine) -> dict[tuple[str, str], dict[str, Any]]:
    return {k: dataclasses.asdict(i) for k, i in eng.instances.items()}


def _events(d: Any) -> list[tuple[Any, ...]]:
    return [(e.kind, e.device, e.id, e.detail.get("interlock"), e.detail.get("caps_w")) for e in d.events]


@settings(max_examples=150, deadline=None)
@given(sequences(), st.sampled_from([False, True]))
def test_the_incremental_engine_decides_exactly_what_the_exhaustive_one_does(
    steps: list[dict[str, Any]], runaway: bool
) -> None:
    cfg = InterlockConfig.model_validate({"gpu_runaway": {"enabled": runaway}})
    topo = topology(
        pdus=PDUS,
        pdu_rating_a={"pdu-a": 16.0, "pdu-b": 16.0},
        stale_after_s={**dict.fromkeys(GPUS, 3.0), "cdu-1": 3.0, "pdu-a": 3.0, "pdu-b": 3.0},
    )
    inc = Engine(cfg, topo, started=0.0, initial_limits={"gpu2": 500.0})
    ref = Engine(cfg, topo, started=0.0, initial_limits={"gpu2": 500.0}, incremental=False)
    store = StoreLike()
    for g in GPUS:
        store.put(g, "min_power_limit_w", MIN_W, 0.0)
        store.put(g, "max_power_limit_w", MAX_W, 0.0)
        store.put(g, "default_power_limit_w", DEFAULT_W, 0.0)
        store.put(g, "power_w", 500.0, 0.0)
    for device, metrics in INPUTS.items():
        for m in metrics:
            store.put(device, m, NORMAL[m], 0.0)
    t = 0.0
    acked: set[str] = set()
    for n, s in enumerate(steps):
        t += s["dt"]
        batch = []
        for device, values in s["readings"].items():
            for m in INPUTS[device]:
                v = store.latest[(device, m)].value if values is None else values[m]
                store.put(device, m, v, t)
                batch.append(store.latest[(device, m)])
        limited: tuple[str, ...] = ()
        if s["limits"] is not None:
            limited = GPUS[n % 2 :: 2]
            for g in limited:
                store.put(g, "max_power_limit_w", s["limits"], t)
        inc.observe(batch)
        ref.observe(batch)
        ext = (
            {} if s["budget"] is None else {"gpu1": (s["budget"], "budget"), "gpu3": (s["budget"], "budget")}
        )
        overrides = []
        if s["override"] is not None:
            interlock, device = s["override"].split(":")
            overrides = [Override("o1", interlock, device, "test", "me", WALL0, WALL0 + t + 1.0)]
        # As the service passes it: every device with a new reading the engine reads.
        changed = None if s["full"] else {*s["readings"], *limited, *s["extra"]}
        snap = dict(store.latest)
        kw: dict[str, Any] = {"external_caps": ext, "acked": frozenset(acked), "overrides": overrides}
        a = inc.step(snap, t, WALL0 + t, changed=changed, **kw)
        b = ref.step(snap, t, WALL0 + t, changed=changed, **kw)
        where = (n, t, changed)
        assert _events(a) == _events(b), where
        assert a.actions == b.actions, where
        assert a.caps == b.caps, where
        assert _instances(inc) == _instances(ref), where
        assert _mem(inc) == _mem(ref), where
        # Everything the incremental step recomputed is what the exhaustive one gives.
        assert a.evaluated is not None and b.evaluated is not None
        assert all(b.evaluated[g] == w for g, w in a.evaluated.items()), where
        # And the ledger is a scan of the instances.
        for suppressed in (set(), {("gpu_overtemp", "gpu1"), ("sensor_stale", "pdu-a")}):
            assert {g: sorted(v) for g, v in inc.held_caps(GPUS, suppressed).items()} == {
                g: sorted(v) for g, v in inc.caps_by_gpu(suppressed).items()
            }, where
        if s["ack"]:
            acked |= {e.id for e in a.events if e.needs_ack and e.id}


def test_an_unchanged_reading_skips_the_rules_but_ageing_still_trips_sensor_stale() -> None:
    """Stale is exactly the case where nothing arrives: the full step must still find it."""
    cfg = InterlockConfig.model_validate({"gpu_runaway": {"enabled": False}})
    eng = Engine(cfg, topology(), started=0.0)
    store = StoreLike()
    for g in GPUS:
        store.put(g, "min_power_limit_w", MIN_W, 0.0)
        store.put(g, "max_power_limit_w", MAX_W, 0.0)
        store.put(g, "default_power_limit_w", DEFAULT_W, 0.0)
        store.put(g, "temp_c", 50.0, 0.0)
    for m, v in (("supply_temp_c", 30.0), ("flow_lpm", 20.0), ("leak", 0.0)):
        store.put("cdu-1", m, v, 0.0)
    for p in (1, 2, 3):
        store.put("pdu-a", f"phase{p}_current_a", 6.0, 0.0)
    d = eng.step(dict(store.latest), 0.0, WALL0)
    assert d.caps == dict.fromkeys(GPUS, DEFAULT_W) and not d.events
    # Every input but gpu2's temperature keeps arriving; gpu2's reading is the same object.
    for t in (1.0, 2.0, 3.0, 4.0):
        for key, r in list(store.latest.items()):
            if key != ("gpu2", "temp_c"):
                store.put(key[0], key[1], r.value, t)
        d = eng.step(dict(store.latest), t, WALL0 + t)
    assert [(e.kind, e.device) for e in d.events] == [("interlock_trip", "gpu2")]
    assert d.caps["gpu2"] == 0.6 * DEFAULT_W and d.caps["gpu1"] == DEFAULT_W


def test_constraints_a_rule_read_this_step_still_reach_the_combine() -> None:
    """A rule that reads a GPU's new constraints first (here sensor_stale, whose fail-safe caps
    are computed while it holds) must not hide from the combine that they moved: the GPU's cap
    follows its new maximum in the very step."""
    cfg = InterlockConfig.model_validate({"gpu_runaway": {"enabled": False}})
    inc = Engine(cfg, topology(), started=0.0)
    ref = Engine(cfg, topology(), started=0.0, incremental=False)
    store = StoreLike()
    for g in GPUS:
        store.put(g, "min_power_limit_w", MIN_W, 0.0)
        store.put(g, "max_power_limit_w", MAX_W, 0.0)
        store.put(g, "default_power_limit_w", DEFAULT_W, 0.0)
        store.put(g, "temp_c", 50.0, 0.0)
    for m, v in (("supply_temp_c", 30.0), ("flow_lpm", 20.0), ("leak", 0.0)):
        store.put("cdu-1", m, v, 0.0)
    for p in (1, 2, 3):
        store.put("pdu-a", f"phase{p}_current_a", None, 0.0)  # in error: sensor_stale at once
    for eng in (inc, ref):
        assert eng.step(dict(store.latest), 0.0, WALL0).caps["gpu0"] == 0.6 * DEFAULT_W
    store.put("gpu0", "max_power_limit_w", 400.0, 0.5)  # under the fail-safe cap
    a = inc.step(dict(store.latest), 0.5, WALL0 + 0.5, changed={"gpu0"})
    b = ref.step(dict(store.latest), 0.5, WALL0 + 0.5, changed={"gpu0"})
    assert a.caps == b.caps and a.caps["gpu0"] == 400.0
