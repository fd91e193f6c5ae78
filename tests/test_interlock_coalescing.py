"""The indexed and coalesced engine against a full evaluation of every batch.

Coalescing lets a batch far from every threshold wait (agent/interlocks/urgency.py). It is safe
only if such a batch could not have changed anything: these properties show that evaluating it
gives no event, no action and no change to any interlock's state, and that evaluating only the
urgent batches (plus the clock's full step) gives the very events of evaluating every batch, with
caps never above theirs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.interlocks.config import InterlockConfig
from agent.interlocks.engine import Engine
from agent.interlocks.service import INPUT_METRICS
from agent.interlocks.urgency import far_from_thresholds, must_evaluate_now
from agent.model import Quality, Reading
from tests.test_interlock_engine import GPUS, WALL0, Pod, drive, engine, scenarios, topology

CFG = InterlockConfig()
TOPO = topology()


def reading(device: str, metric: str, value: float | None, ts: float = 0.0) -> Reading:
    quality = Quality.GOOD if value is not None else Quality.ERROR
    return Reading(device, metric, value, ts_mono=ts, ts_wall=WALL0 + ts, quality=quality)


def urgent(batch: list[Reading], eng: Engine | None = None, cfg: InterlockConfig = CFG) -> bool:
    busy = eng.busy if eng is not None else (lambda _d: False)
    return must_evaluate_now(batch, INPUT_METRICS, cfg, TOPO, busy)


# ------------------------------------------------------------------------------------ urgency
def test_values_near_or_past_a_threshold_are_urgent_far_ones_wait() -> None:
    # 10% margin: runaway's min_temp_c 70 -> under 63 C waits; supply trip 40 -> under 36 C.
    assert not urgent([reading("gpu0", "temp_c", 62.9)])
    assert urgent([reading("gpu0", "temp_c", 63.0)])
    assert urgent([reading("gpu0", "temp_c", 95.0)])
    assert not urgent([reading("cdu-1", "supply_temp_c", 35.9)])
    assert urgent([reading("cdu-1", "supply_temp_c", 36.0)])
    assert not urgent([reading("cdu-1", "flow_lpm", 11.2)])  # the device's own min_flow 10
    assert urgent([reading("cdu-1", "flow_lpm", 11.0)])
    assert not urgent([reading("pdu-a", "phase1_current_a", 11.5)])  # 71.9% of 16 A (trip 80%)
    assert urgent([reading("pdu-a", "phase1_current_a", 11.6)])
    assert not urgent([reading("cdu-1", "leak", 0.0)])
    assert urgent([reading("cdu-1", "leak", 1.0)])
    assert not urgent([reading("gpu0", "power_w", 900.0)])  # read only when its PDU trips


def test_missing_bad_and_non_finite_inputs_are_urgent() -> None:
    for bad in (None, math.nan, math.inf, -math.inf):
        assert urgent([reading("gpu0", "temp_c", bad)]), bad
    stale_quality = reading("gpu0", "temp_c", 40.0)._replace(quality=Quality.STALE)
    assert urgent([stale_quality])


def test_a_busy_device_and_a_disabled_coalescing_are_urgent() -> None:
    eng, pod = engine(), Pod()
    pod.set("gpu1", "temp_c", 90.0)
    pod.touch(0.0)
    eng.step(pod.snapshot(), 0.0, WALL0)
    assert eng.busy("gpu1") and not eng.busy("gpu0")
    assert urgent([reading("gpu1", "temp_c", 40.0)], eng)  # tripped: its clear hold is timing
    assert not urgent([reading("gpu0", "temp_c", 40.0)], eng)
    off = InterlockConfig.model_validate({"coalesce_s": 0})
    assert urgent([reading("gpu0", "temp_c", 40.0)], cfg=off)


def test_non_inputs_never_make_a_batch_urgent() -> None:
    assert not urgent([reading("gpu0", "min_power_limit_w", None), reading("gpu0", "temp_c", 40.0)])


# ------------------------------------------------------------------------------------ the index
def _state(eng: Engine) -> dict[tuple[str, str], dict[str, Any]]:
    return {k: dataclasses.asdict(i) for k, i in eng.instances.items()}


@settings(max_examples=25, deadline=None)
@given(scenarios())
def test_the_index_gives_the_caps_of_a_scan_of_every_instance(steps: list[dict[str, Any]]) -> None:
    for eng, _d, _ in drive(steps):
        for inst in eng.instances.values():
            assert set(inst.caps) <= set(inst.gpus), inst
        for suppressed in (set(), {("gpu_overtemp", "gpu1"), ("coolant_supply_high", "cdu-1")}):
            scan = eng.caps_by_gpu(suppressed)
            indexed = eng.caps_of(GPUS, suppressed)
            assert {g: sorted(v) for g, v in indexed.items()} == {g: sorted(v) for g, v in scan.items()}


def test_a_reload_regroups_the_trips_in_progress() -> None:
    eng, pod = engine(), Pod()
    pod.set("cdu-1", "leak", 1.0)
    pod.touch(0.0)
    eng.step(pod.snapshot(), 0.0, WALL0)
    assert ("coolant_leak", "cdu-1") in {(i.interlock, i.device) for i in eng.active()}
    eng.reconfigure(CFG, topology(loops={"cdu-1": GPUS[:2]}))
    leak = eng.instances[("coolant_leak", "cdu-1")]
    assert leak.gpus == GPUS[:2]
    # The caps it held on gpu2/gpu3 still count until it clears: nothing loosens on a reload.
    assert eng.caps_of(("gpu3",), set())["gpu3"] == eng.caps_by_gpu(set())["gpu3"]
    assert {g: sorted(v) for g, v in eng.caps_of(GPUS, set()).items()} == {
        g: sorted(v) for g, v in eng.caps_by_gpu(set()).items()
    }


# ------------------------------------------------------------------------------------ coalescing
_FAR = {
    "temp_c": st.floats(20, 62.9),
    "supply_temp_c": st.floats(15, 35.9),
    "flow_lpm": st.floats(11.2, 30),
    "leak": st.just(0.0),
    "phase1_current_a": st.floats(0, 11.5),
    "phase2_current_a": st.floats(0, 11.5),
    "phase3_current_a": st.floats(0, 11.5),
}
_DEVICE_METRICS = {
    **dict.fromkeys(GPUS, ("temp_c",)),
    "cdu-1": ("supply_temp_c", "flow_lpm", "leak"),
    "pdu-a": ("phase1_current_a", "phase2_current_a", "phase3_current_a"),
}


@settings(max_examples=25, deadline=None)
@given(scenarios(), st.data())
def test_a_batch_far_from_every_threshold_changes_nothing(
    steps: list[dict[str, Any]], data: st.DataObject
) -> None:
    """What a waiting batch would have done had it been evaluated at once: nothing (a ramp step
    at most) beyond what the clock's full step at that instant does anyway."""
    from tests.test_interlock_engine import _LAST_SNAPSHOT

    for n, (eng, _d, _) in enumerate(drive(steps)):
        if n % 4 != 3:
            continue  # every 4th state: a deep copy and two steps each, on a busy machine
        snap, t = dict(_LAST_SNAPSHOT[0]), _LAST_SNAPSHOT[1] + 0.05
        device = data.draw(st.sampled_from(sorted(_DEVICE_METRICS)))
        batch = [reading(device, m, data.draw(_FAR[m]), t) for m in _DEVICE_METRICS[device]]
        if urgent(batch, eng):
            continue  # the device is busy: its batch is evaluated at once
        assert all(far_from_thresholds(r, CFG, TOPO) for r in batch)
        probe = copy.deepcopy(eng)
        # The clock's full step at t first: what mere ageing trips (a silent input going stale)
        # is its to find, with or without the batch. Then the batch, at the same instant.
        probe.step(snap, t, WALL0 + t)
        snap.update({r.key: r for r in batch})
        before, caps_before = _state(probe), dict(probe.last_caps)
        d = probe.step(snap, t, WALL0 + t, changed={device})
        assert d.events == [] and d.actions == []
        after = _state(probe)
        assert {k: v for k, v in after.items() if k in before} == before
        assert not any(probe.instances[k].tripped for k in after.keys() - before.keys())
        for gpu, cap in (d.evaluated or {}).items():
            assert cap >= caps_before.get(gpu, cap) - 1e-9  # only a ramped release, never a new cap


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[float, str, dict[str, float | None]]]:
    """Per-device batches at increasing times: mostly far values, some near, past or bad."""
    out = []
    t = 0.0
    for _ in range(draw(st.integers(10, 80))):
        t += draw(st.sampled_from([0.03, 0.1, 0.25, 0.5]))
        device = draw(st.sampled_from(sorted(_DEVICE_METRICS)))
        values: dict[str, float | None] = {}
        for m in _DEVICE_METRICS[device]:
            values[m] = draw(
                st.one_of(_FAR[m], _FAR[m], _FAR[m], st.none(), st.just(math.nan), st.floats(0, 110))
            )
        if device == "cdu-1":
            values["leak"] = draw(st.sampled_from([0.0, 0.0, 0.0, 1.0]))
        out.append((t, device, values))
    return out


def _events(d: Any) -> list[tuple[Any, ...]]:
    return [(e.kind, e.device, e.detail.get("interlock"), e.ts_wall) for e in d.events]


@settings(max_examples=25, deadline=None)
@given(batches(), st.sampled_from([0.1, 0.2, 0.5]))
def test_coalesced_evaluation_gives_the_events_of_evaluating_every_batch(
    seq: list[tuple[float, str, dict[str, float | None]]], window: float
) -> None:
    """Engine A evaluates every batch (and a full step each second); engine B does what the
    service does: urgent batches at once, a batch that would overwrite one not yet evaluated at
    once, the others within ``window``, and the full step each second. Same events, at the same
    times; B's caps never above A's (B may only release a ramp step a little later).

    The clock's full steps fall at the same instants for both (each whole second): a sustain or
    a hold that ends between two readings is found by the first evaluation after it ends, so two
    engines whose clocks ran at different phases would trip at different instants for that
    reason alone (a flow low sustained 2 s from 2.64 s, read missing at 4.73 s: a full step at
    4.70 s trips it, one at 4.75 s does not), which says nothing about coalescing."""
    cfg = InterlockConfig.model_validate({"coalesce_s": window})
    # Time alone makes an input stale, and only a full step (each second, in both) is bound to
    # see it: here readings never age, so the comparison is exact; a bad reading is still stale.
    topo = topology(stale_after_s={})
    a, b, pod = Engine(cfg, topo, started=0.0), Engine(cfg, topo, started=0.0), Pod()
    pod.touch(0.0)
    ev_a, ev_b = _events(a.step(pod.snapshot(), 0.0, WALL0)), _events(b.step(pod.snapshot(), 0.0, WALL0))
    next_full = 1.0
    pending: set[str] = set()
    pending_since: float | None = None

    def step_b(now: float, full: bool) -> None:
        nonlocal pending, pending_since
        changed = None if full else pending
        ev_b.extend(_events(b.step(pod.snapshot(), now, WALL0 + now, changed=changed)))
        pending, pending_since = set(), None

    for t, device, values in seq:
        # The clock: B's coalesced evaluation whose window ended first, then the full steps due.
        while True:
            due = pending_since + window if pending_since is not None else math.inf
            if due <= t and due < next_full:
                step_b(due, False)
            elif next_full <= t:
                if due <= next_full:
                    step_b(due, False)
                step_b(next_full, True)
                ev_a.extend(_events(a.step(pod.snapshot(), next_full, WALL0 + next_full)))
                next_full += 1.0
            else:
                break
        # Every GPU's constraints and the GPUs' draw stay fresh (the NVML poll's slow metrics).
        for g in GPUS:
            for m in ("min_power_limit_w", "max_power_limit_w", "default_power_limit_w", "power_w"):
                pod.ts[(g, m)] = t
        batch = [reading(device, m, v, t) for m, v in values.items()]
        now_urgent = urgent(batch, b, cfg) or device in pending
        for m, v in values.items():
            pod.set(device, m, v, t)
        a.observe(batch)  # as the service does with every batch, as it arrives
        b.observe(batch)
        ev_a.extend(_events(a.step(pod.snapshot(), t, WALL0 + t, changed={device})))
        pending.add(device)
        if now_urgent:
            step_b(t, False)
        elif pending_since is None:
            pending_since = t
        for gpu, cap in b.last_caps.items():
            assert cap <= a.last_caps.get(gpu, math.inf) + 1e-9, (gpu, t)
    assert ev_b == ev_a
