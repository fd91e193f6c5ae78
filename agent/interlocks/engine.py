"""The interlock engine: a deterministic function of (state snapshot, time, config, overrides, budget).

``Engine.step(snapshot, now, ...)`` reads nothing else: no clock, no I/O, no randomness. It keeps its own
memory (when a condition began, hold timers, the ramp) in the Engine object, so a sequence of steps
with the same inputs always gives the same caps and events. The service calls it on every new
reading of an input and on a 1 s tick (for hold times and ramps).

Rules (design.md; every number is config):
- gpu_overtemp / gpu_runaway: per GPU; cap that GPU.
- coolant_supply_high / coolant_flow_low / coolant_leak: per CDU; cap every GPU on its loop.
- pdu_phase_overcurrent: per PDU; cap the GPUs it feeds, tightening until under clear_pct.
- sensor_stale: per input device; a fail-safe cap on the GPUs that input protects.
- coolant_escalation: the ladder above a loop's coolant caps (escalation.py): deeper caps, then
  minimum caps, then shed (if enabled), while the supply temperature still rises or is critical.
- cooling_alarm: a CDU's or chiller's own trip / fault / alarm word, an event the moment it reads.
- shed (off by default): coolant critical after caps -> switch off the hottest servers' outlets.
The lowest cap wins (interlocks, external caps such as the fleet budget); overrides suppress one
interlock on one device. A cap rises only by the ramp: +release_step of the default every interval.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

from agent.events import Event, Severity
from agent.interlocks import escalation
from agent.interlocks.config import GpuOvertemp, GpuRunaway, InterlockConfig, SensorStale
from agent.interlocks.types import (
    Action,
    Decision,
    GpuLimits,
    GpuMemory,
    Instance,
    Override,
    Snapshot,
    Topology,
)
from agent.model import Quality, Reading


def _overtemp_detail(ot: GpuOvertemp, temp: float) -> dict[str, Any]:
    return {
        "inputs": {"temp_c": round(temp, 2)},
        "thresholds": {
            "trip_c": ot.trip_c,
            "clear_c": ot.clear_c,
            "clear_hold_s": ot.clear_hold_s,
            "cap_pct": ot.cap_pct,
        },
    }


def _runaway_detail(ra: GpuRunaway, temp: float, rate: float | None) -> dict[str, Any]:
    return {
        "inputs": {"temp_c": round(temp, 2), "rate_c_per_s": None if rate is None else round(rate, 2)},
        "thresholds": {
            "rate_c_per_s": ra.rate_c_per_s,
            "window_s": ra.window_s,
            "min_temp_c": ra.min_temp_c,
            "clear_c": ra.clear_c,
            "cap_pct": ra.cap_pct,
        },
    }


def _stale_detail(
    st: SensorStale, stale_after_s: float | None, metrics: Sequence[str], reasons: dict[str, str]
) -> dict[str, Any]:
    return {
        "inputs": reasons or dict.fromkeys(metrics, "fresh"),
        "thresholds": {
            "stale_after_s": stale_after_s,
            "fresh_hold_s": st.fresh_hold_s,
            "cap_pct": st.cap_pct,
        },
    }


# A GPU's NVML constraints (min, max, default), in GpuLimits' order.
LIMIT_METRICS = ("min_power_limit_w", "max_power_limit_w", "default_power_limit_w")
_LimitsMemo = dict[str, tuple[tuple["Reading | None", ...], "GpuLimits | None"]]


class _LazyLimits(dict[str, "GpuLimits | None"]):
    """A GPU's NVML constraints, read from the snapshot the first time a rule asks this step.

    ``memo`` carries the answer across steps for as long as the snapshot holds the very same
    (immutable) readings: the constraints are re-read every few polls, the engine runs ~40 times a
    second, and the answer depends on those three readings alone."""

    def __init__(self, snap: Snapshot, memo: _LimitsMemo | None = None) -> None:
        super().__init__()
        self._snap = snap
        self._memo: _LimitsMemo = {} if memo is None else memo

    def __missing__(self, gpu: str) -> GpuLimits | None:
        get = self._snap.get
        key = (get((gpu, LIMIT_METRICS[0])), get((gpu, LIMIT_METRICS[1])), get((gpu, LIMIT_METRICS[2])))
        known = self._memo.get(gpu)
        if known is not None and known[0][0] is key[0] and known[0][1] is key[1] and known[0][2] is key[2]:
            value = known[1]
        else:
            value = Engine._limits(key)
            if value is None and known is not None:
                # A GPU's constraints do not change when its driver goes silent (a dead node agent,
                # NVML unreachable): keep the last known ones, so sensor_stale can still name the
                # fail-safe cap it holds.
                value = known[1]
            self._memo[gpu] = (key, value)
        self[gpu] = value
        return value

    def get(self, gpu: str, default: object = None) -> GpuLimits | None:
        return self[gpu]


class Engine:
    def __init__(
        self,
        config: InterlockConfig,
        topology: Topology,
        *,
        started: float,
        initial_limits: Mapping[str, float] | None = None,
        incremental: bool = True,
    ) -> None:
        self.config = config
        # False: every step walks every GPU in scope (no skipping of unchanged idle GPUs, the
        # combine over every GPU from a scan of the instances). The property tests hold the
        # incremental engine to exactly what this exhaustive one decides.
        self.incremental = incremental
        self.topology = topology
        self.started = started
        self.instances: dict[tuple[str, str], Instance] = {}
        # Indexes over the instances, so an evaluation touches only what it evaluates: the
        # instances that may cap a GPU (its group, or caps it holds), and those of a device.
        self._covering: dict[str, list[Instance]] = {}
        self._of_device: dict[str, list[Instance]] = {}
        self._gpu_pos: dict[str, int] = {g: i for i, g in enumerate(topology.gpus)}
        self._other_inputs: set[str] | None = None  # the stale-rule inputs that are not a GPU's own
        self.gpu_mem: dict[str, GpuMemory] = {g: GpuMemory() for g in topology.gpus}
        # Reconcile after a restart: a GPU already below its default keeps that cap until the ramp
        # (or a still-justified interlock) decides otherwise.
        for gpu, limit in (initial_limits or {}).items():
            if gpu in self.gpu_mem:
                self.gpu_mem[gpu].applied_w = limit
                self.gpu_mem[gpu].last_raise = started  # the first raise waits one release interval
        self._seq = 0
        self._transitions: list[Instance] = []
        self._inputs: list[tuple[str, tuple[str, ...], tuple[str, ...]]] | None = None
        self.last_caps: dict[str, float] = {}
        self._limits_memo: _LimitsMemo = {}
        self._leak_shed_for: dict[str, str | None] = {}  # CDU -> the leak trip its shed answered
        self._input_pos: dict[str, int] | None = None  # stale-rule input -> its place in topology order
        self._step_limits: _LazyLimits = _LazyLimits({})
        self._supply_hist: dict[str, deque[tuple[float, float]]] = {}  # CDU -> (ts, supply C)
        self._rising: dict[str, bool] = {}  # CDU -> its supply still rises under caps
        self._extra_events: list[Event] = []
        self._now_wall = 0.0
        # The caps ledger: every instance's caps in force (its caps while tripped), kept per GPU, so
        # the combine reads a GPU's interlock caps without scanning instances, and a step knows the
        # GPUs whose caps moved (``_dirty``). Synced from the instances a step touched (_touched).
        self._held: dict[tuple[str, str], dict[str, float]] = {}
        self._gpu_caps: dict[str, dict[tuple[str, str], float]] = {}
        self._touched: list[Instance] = []
        self._dirty: set[str] = set(topology.gpus)  # GPUs whose combined cap must be recomputed
        self._ramping: set[str] = set()  # GPUs under their desired cap: the clock releases them
        self._combined_limits: dict[str, GpuLimits] = {}  # the constraints each GPU was combined on
        self._last_external: dict[str, float] = {}
        self._last_suppressed: set[tuple[str, str]] = set()
        self._seen_temp: dict[str, Reading | None] = {}  # GPU -> the temp reading its rules last saw
        self._gpu_tripped: set[str] = set()  # GPUs with gpu_overtemp / gpu_runaway tripped
        self._supply_high: list[Instance] = []  # the coolant_supply_high instances (setpoint actions)

    def reconfigure(self, config: InterlockConfig, topology: Topology) -> None:
        """New thresholds and topology (a config reload). Instances and GPU memory stay: a trip in
        progress is not forgotten by a reload; the next step evaluates with the new settings."""
        self.config = config
        self.topology = topology
        for gpu in topology.gpus:
            self.gpu_mem.setdefault(gpu, GpuMemory())
        self._inputs = None
        self._input_pos = None
        self._other_inputs = None
        self._gpu_pos = {g: i for i, g in enumerate(topology.gpus)}
        # New thresholds or GPUs: every GPU's rules and combined cap are looked at again.
        self._dirty.update(topology.gpus)
        self._seen_temp.clear()
        # A trip in progress now protects its device's new group; the indexes follow.
        self._covering, self._of_device, self._supply_high = {}, {}, []
        stale_groups = {dev: gpus for dev, _, gpus in self._stale_inputs()}
        for inst in self.instances.values():
            inst.gpus = self._group(inst.interlock, inst.device, inst.gpus, stale_groups)
            self._index(inst)

    def _group(
        self, interlock: str, device: str, old: tuple[str, ...], stale_groups: Mapping[str, tuple[str, ...]]
    ) -> tuple[str, ...]:
        """The GPUs ``interlock`` on ``device`` protects in the present topology."""
        topo = self.topology
        if interlock in ("gpu_overtemp", "gpu_runaway"):
            return (device,)
        if interlock == "pdu_phase_overcurrent":
            return tuple(topo.pdus.get(device, old))
        if interlock == "cooling_alarm":
            return tuple(topo.cooled_gpus.get(device, old))
        if interlock == "sensor_stale":
            return stale_groups.get(device, old)
        return tuple(topo.loops.get(device, old))  # the coolant rules, the ladder and shed

    def _index(self, inst: Instance) -> None:
        self._of_device.setdefault(inst.device, []).append(inst)
        if inst.interlock == "coolant_supply_high":
            self._supply_high.append(inst)
        for g in {*inst.gpus, *inst.caps}:
            self._covering.setdefault(g, []).append(inst)

    def observe(self, batch: Iterable[Reading]) -> None:
        """Record the histories the rates are computed from (a GPU's temperature for
        gpu_runaway, a loop's supply for the ladder) as readings arrive: a reading replaced in
        the store before an evaluation saw it (coalescing, a busy loop) still counts."""
        mems, loops = self.gpu_mem, self.topology.loops
        for r in batch:
            metric, v = r.metric, r.value
            if metric == "temp_c":
                mem = mems.get(r.device)
                if mem is None or v is None or r.quality is not Quality.GOOD or not math.isfinite(v):
                    continue
                if not mem.temps or mem.temps[-1][0] < r.ts_mono:
                    mem.temps.append((r.ts_mono, v))
            elif metric == "supply_temp_c" and r.device in loops:
                if v is None or r.quality is not Quality.GOOD or not math.isfinite(v):
                    continue
                hist = self._supply_hist.setdefault(r.device, deque(maxlen=256))
                if not hist or hist[-1][0] < r.ts_mono:
                    hist.append((r.ts_mono, v))

    def busy(self, device: str) -> bool:
        """True while any interlock on ``device`` is tripped or has a timer running (a sustain,
        a clear hold, a ladder rung): its next readings must be evaluated at once."""
        return any(
            i.tripped_since is not None or i.cond_since is not None or i.clear_since is not None or i.stage
            for i in self._of_device.get(device, ())
        )

    # ------------------------------------------------------------------ helpers
    def _event_id(self, now_wall: float) -> str:
        self._seq += 1
        return f"il-{int(now_wall * 1000):x}-{self._seq}"

    def _instance(self, interlock: str, device: str, gpus: Sequence[str]) -> Instance:
        key = (interlock, device)
        inst = self.instances.get(key)
        if inst is None:
            inst = self.instances[key] = Instance(interlock=interlock, device=device, gpus=tuple(gpus))
            self._index(inst)
        return inst

    def _fresh(
        self, snap: Snapshot, device: str, metric: str, now: float, stale_device: str | None = None
    ) -> float | None:
        r = snap.get((device, metric))
        if r is None or r.value is None or r.quality is not Quality.GOOD or not math.isfinite(r.value):
            return None  # NaN / Inf (a sensor's "absent", a decoding gone wrong) is missing: fail safe
        limit = self.topology.stale_after_s.get(stale_device or device)
        if limit is not None and now - r.ts_mono > limit:
            return None
        return r.value

    @staticmethod
    def _limits(readings: tuple[Reading | None, ...]) -> GpuLimits | None:
        """GpuLimits from the (min, max, default) readings (``LIMIT_METRICS``); None if any is missing."""
        lo, hi, default = (
            None if r is None or r.value is None or not math.isfinite(r.value) else r.value for r in readings
        )
        if lo is None or hi is None or default is None:
            return None
        return GpuLimits(min_w=lo, max_w=hi, default_w=default)

    # ------------------------------------------------------------------ the step
    def step(
        self,
        snap: Snapshot,
        now: float,
        now_wall: float,
        *,
        overrides: Sequence[Override] = (),
        external_caps: Mapping[str, tuple[float, str]] | None = None,
        acked: frozenset[str] | set[str] = frozenset(),
        changed: Collection[str] | None = None,
    ) -> Decision:
        """One evaluation. ``changed``: the devices with new readings since the last step; the rules
        of other devices are left as they were (a cheap step for one PDU's poll in a 576-GPU pod).
        None evaluates everything: the caller does that at least every second, for hold times,
        ramps and staleness, which move with time alone.

        Either way the step recomputes the combined cap of only the GPUs whose inputs to it moved
        (an instance's caps, the GPU's constraints, its external cap, an override), and on a full
        step also of the GPUs still ramping up; the rules of a GPU whose temperature reading is
        the one its rules last saw, with nothing tripped, are not run again (they would decide
        nothing: same reading, same history; ageing only makes it missing, which decides nothing
        for an idle GPU either). A partial step lowers caps at once but never raises one: the
        release ramp is the clock's, on the full step. ``incremental=False`` does the same
        without skipping anything: the property tests compare the two."""
        cfg = self.config
        events: list[Event] = []
        actions: list[Action] = []
        suppressed = {(o.interlock, o.device) for o in overrides if o.expires_wall > now_wall}
        limits = self._step_limits = _LazyLimits(snap, self._limits_memo)
        topo = self.topology
        gpus: Sequence[str] = topo.gpus
        loops, pdus = topo.loops, topo.pdus
        full = changed is None
        ch: set[str] = set()
        if changed is not None:
            ch = set(changed)
            pos = self._gpu_pos
            gpus = sorted((g for g in ch if g in pos), key=pos.__getitem__)
            loops = {c: g for c, g in topo.loops.items() if c in ch}
            pdus = {p: g for p, g in topo.pdus.items() if p in ch}
        self._transitions = []
        self._extra_events = []
        self._now_wall = now_wall
        if cfg.enabled:
            self._gpu_rules(snap, now, limits, gpus)
            self._loop_rules(snap, now, acked, loops)
            self._escalation_rule(snap, now, limits, loops, suppressed)
            self._alarm_rule(snap, now, None if full else ch)
            self._pdu_rule(snap, now, limits, pdus)
            if full:
                self._stale_rule(snap, now, None)
            else:
                self._partial_stale(snap, now, ch)
        self._sync_ledger()
        if suppressed != self._last_suppressed:  # an override began or ended: its caps count again
            for key in suppressed ^ self._last_suppressed:
                self._dirty.update(self._held.get(key, ()))
            self._last_suppressed = suppressed
        external = external_caps or {}
        self._external_moved(external)
        events.extend(self._extra_events)

        # Transitions -> events (and shed actions), then caps.
        for inst in self._transitions:
            was = inst.detail.pop("_transition", None)
            if was == "trip":
                inst.trip_event = self._event_id(now_wall)
                events.append(self._trip_event(inst, now_wall, suppressed))
            elif was == "clear":
                events.append(
                    Event(
                        kind="interlock_clear",
                        severity=Severity.INFO,
                        message=f"{inst.interlock} cleared on {inst.device}",
                        device=inst.device,
                        detail={"interlock": inst.interlock, "trip_event": inst.trip_event, **inst.detail},
                        id=self._event_id(now_wall),
                        ts_wall=now_wall,
                    )
                )
                inst.trip_event = None
        if cfg.shed.enabled or (cfg.coolant_leak.enabled and cfg.coolant_leak.shed):
            self._shed(snap, now, now_wall, suppressed, acked, events, actions)
        self._setpoint_actions(now_wall, actions)

        evaluated = self._combine(now, limits, suppressed, external, full, gpus)
        self.last_caps.update(evaluated)
        if full:  # every GPU's cap is what a recomputation would give: report them all
            last = self.last_caps
            evaluated = {g: last[g] for g in topo.gpus if g in last}
        return Decision(caps=dict(self.last_caps), events=events, actions=actions, evaluated=evaluated)

    # ------------------------------------------------------------------ the caps ledger
    def _sync_ledger(self) -> None:
        """Bring the ledger up to the instances this step touched: a GPU whose caps in force
        changed (a trip, a tightening, a clear, a rung) is marked for the combine."""
        touched, self._touched = self._touched, []
        held, per_gpu, dirty = self._held, self._gpu_caps, self._dirty
        for inst in touched:
            key = (inst.interlock, inst.device)
            caps = inst.caps if inst.tripped_since is not None else {}
            old = held.get(key, {})
            if old == caps:
                continue
            for g in old.keys() | caps.keys():
                w = caps.get(g)
                if w is not None and w == old.get(g):
                    continue
                dirty.add(g)
                if w is None:
                    mine = per_gpu.get(g)
                    if mine is not None:
                        mine.pop(key, None)
                else:
                    per_gpu.setdefault(g, {})[key] = w
            if caps:
                held[key] = dict(caps)
            else:
                held.pop(key, None)

    def held_caps(
        self, gpus: Collection[str], suppressed: set[tuple[str, str]]
    ) -> dict[str, list[tuple[float, str]]]:
        """``caps_by_gpu`` for some GPUs, from the ledger (for tests and views)."""
        out: dict[str, list[tuple[float, str]]] = {}
        for g in gpus:
            for key, w in self._gpu_caps.get(g, {}).items():
                if key not in suppressed:
                    out.setdefault(g, []).append((w, key[0]))
        return out

    def _external_moved(self, external: Mapping[str, tuple[float, str]]) -> None:
        """Mark the GPUs whose external cap (the fleet budget...) appeared, moved or went."""
        last, dirty = self._last_external, self._dirty
        if not external and not last:
            return
        now_ext = {g: w for g, (w, _) in external.items()}
        if now_ext == last:
            return
        for g in now_ext.keys() | last.keys():
            if now_ext.get(g) != last.get(g):
                dirty.add(g)
        self._last_external = now_ext

    def _partial_stale(self, snap: Snapshot, now: float, changed: set[str]) -> None:
        """A partial step's stale checks: the changed inputs, every input that is not a GPU's own
        (a few dozen CDUs and PDUs: the checks a full step would make of them, cheap), and the
        own input of every GPU whose cap the step recomputes, so that cap is the one a full step
        at this instant would give. A stale trip of a CDU or PDU marks its GPUs: their own
        inputs are checked in a second pass (a GPU's own input protects that GPU only, so it
        ends there), and the trips come out in the order a single pass would give."""
        self._sync_ledger()
        inputs = self._stale_inputs()
        if self._input_pos is None:
            self._input_pos = {device: i for i, (device, _, _) in enumerate(inputs)}
        gpu_pos = self._gpu_pos
        scope = changed | self._non_gpu_inputs()
        scope.update(g for g in self._dirty if g in gpu_pos)
        first = len(self._transitions)
        self._stale_rule(snap, now, scope)
        self._sync_ledger()
        more = {g for g in self._dirty if g in gpu_pos and g not in scope}
        if more:
            self._stale_rule(snap, now, more)
            pos = self._input_pos
            self._transitions[first:] = sorted(self._transitions[first:], key=lambda i: pos[i.device])

    def _non_gpu_inputs(self) -> set[str]:
        if self._other_inputs is None:
            self._other_inputs = set(self.topology.loops) | set(self.topology.pdus)
        return self._other_inputs

    def _trip_event(self, inst: Instance, now_wall: float, suppressed: set[tuple[str, str]]) -> Event:
        critical = inst.interlock in ("coolant_leak", "coolant_flow_low", "shed", "cooling_alarm")
        overridden = (inst.interlock, inst.device) in suppressed
        return Event(
            kind="interlock_trip",
            severity=Severity.CRITICAL if critical else Severity.WARNING,
            message=(
                f"{inst.interlock} tripped on {inst.device}"
                + (f": capping {len(inst.gpus)} GPU(s)" if inst.caps else "")
                + (" (overridden: no cap applied)" if overridden else "")
            ),
            device=inst.device,
            detail={
                "interlock": inst.interlock,
                "gpus": list(inst.gpus),
                "caps_w": {g: round(w, 1) for g, w in inst.caps.items()},
                "overridden": overridden,
                **inst.detail,
            },
            needs_ack=inst.interlock in ("coolant_leak", "shed", "cooling_alarm"),
            id=inst.trip_event or self._event_id(now_wall),
            ts_wall=now_wall,
        )

    # ------------------------------------------------------------------ generic trip/clear
    def _update(
        self,
        inst: Instance,
        now: float,
        *,
        trip_now: bool,
        cond: bool,
        sustain_s: float,
        clear_cond: bool,
        clear_hold_s: float,
        caps: Mapping[str, float] | Callable[[], Mapping[str, float]] | None,
        detail: dict[str, Any] | Callable[[], dict[str, Any]],
        extra_clear_ok: bool = True,
    ) -> None:
        """The shared state machine: trip on (cond sustained for sustain_s) or trip_now; clear after
        clear_cond held for clear_hold_s. While tripped, caps never rise (only tighten).

        ``detail`` (the inputs and thresholds that explain a trip or clear) may be a function: it
        is built only on a transition, not for each of 576 GPUs at every evaluation; ``caps`` too
        may be a function: they matter only to a trip and to a tripped instance."""
        if inst.tripped_since is None and not (cond or trip_now):
            inst.cond_since = None  # idle, and stays so: nothing else to decide
            return
        self._touched.append(inst)  # its caps in force may change: the ledger looks
        if callable(caps):
            caps = caps()
        if not inst.tripped:
            inst.cond_since = (
                (inst.cond_since if inst.cond_since is not None else now) if cond or trip_now else None
            )
            if trip_now or (cond and inst.cond_since is not None and now - inst.cond_since >= sustain_s):
                inst.tripped_since = now
                inst.clear_since = None
                inst.caps = dict(caps or {})
                inst.detail = {**(detail() if callable(detail) else detail), "_transition": "trip"}
                self._transitions.append(inst)
            return
        # Tripped: tighten caps only, never raise them.
        if caps:
            for g, w in caps.items():
                inst.caps[g] = min(inst.caps.get(g, w), w)
        if clear_cond and extra_clear_ok:
            inst.clear_since = inst.clear_since if inst.clear_since is not None else now
            if now - inst.clear_since >= clear_hold_s:
                inst.detail = {
                    "tripped_for_s": round(now - (inst.tripped_since or now), 1),
                    **(detail() if callable(detail) else detail),
                    "_transition": "clear",
                }
                self._transitions.append(inst)
                inst.tripped_since = None
                inst.cond_since = None
                inst.clear_since = None
                inst.caps = {}
                inst.shed_done = False
        else:
            inst.clear_since = None

    @staticmethod
    def _pct_cap(limits: GpuLimits | None, pct: float) -> float | None:
        if limits is None:
            return None
        return max(limits.min_w, min(limits.max_w, limits.default_w * pct / 100.0))

    def _loop_caps(self, gpus: Sequence[str], pct: float) -> dict[str, float]:
        """``pct`` of each GPU's default limit (the GPUs whose constraints are known)."""
        limits = self._step_limits
        return {g: c for g in gpus if (c := self._pct_cap(limits[g], pct)) is not None}

    def _loop_minimums(self, gpus: Sequence[str]) -> dict[str, float]:
        limits = self._step_limits
        return {g: lim.min_w for g in gpus if (lim := limits[g]) is not None}

    # ------------------------------------------------------------------ rules
    def _gpu_rules(
        self, snap: Snapshot, now: float, limits: Mapping[str, GpuLimits | None], gpus: Sequence[str]
    ) -> None:
        ot, ra = self.config.gpu_overtemp, self.config.gpu_runaway
        seen, tripped, skip = self._seen_temp, self._gpu_tripped, self.incremental
        for gpu in gpus:
            r = snap.get((gpu, "temp_c"))
            if skip and gpu not in tripped and gpu in seen:
                # Nothing tripped and the very reading its rules last saw: they would decide the
                # same (nothing), as the rate's history moves only with a new reading; ageing
                # only makes the reading missing, which decides nothing for an idle GPU.
                prev = seen[gpu]
                if prev is r or prev == r:
                    continue
            seen[gpu] = r
            temp = self._fresh(snap, gpu, "temp_c", now)
            mem = self.gpu_mem[gpu]
            if temp is not None and r is not None and (not mem.temps or mem.temps[-1][0] < r.ts_mono):
                mem.temps.append((r.ts_mono, temp))
            if ot.enabled:
                inst = self._instance("gpu_overtemp", gpu, (gpu,))
                if temp is not None and inst.tripped_since is None and temp < ot.trip_c:
                    inst.cond_since = None  # what _update decides for an idle GPU far from a trip
                elif temp is not None:
                    cap = self._pct_cap(limits.get(gpu), ot.cap_pct)
                    self._update(
                        inst,
                        now,
                        trip_now=temp >= ot.trip_c,
                        cond=False,
                        sustain_s=0.0,
                        clear_cond=temp <= ot.clear_c,
                        clear_hold_s=ot.clear_hold_s,
                        caps={gpu: cap} if cap is not None else None,
                        detail=partial(_overtemp_detail, ot, temp),
                    )
            if ra.enabled:
                inst = self._instance("gpu_runaway", gpu, (gpu,))
                if temp is not None and inst.tripped_since is None and temp < ra.min_temp_c:
                    inst.cond_since = None  # under min_temp_c no rate trips: the rate is not needed
                elif temp is not None:
                    rate = self._rate(mem.temps, ra.window_s)
                    cap = self._pct_cap(limits.get(gpu), ra.cap_pct)
                    self._update(
                        inst,
                        now,
                        trip_now=rate is not None and rate >= ra.rate_c_per_s and temp >= ra.min_temp_c,
                        cond=False,
                        sustain_s=0.0,
                        clear_cond=temp <= ra.clear_c,
                        clear_hold_s=ra.clear_hold_s,
                        caps={gpu: cap} if cap is not None else None,
                        detail=partial(_runaway_detail, ra, temp, rate),
                    )
            a, b = self.instances.get(("gpu_overtemp", gpu)), self.instances.get(("gpu_runaway", gpu))
            if (a is not None and a.tripped) or (b is not None and b.tripped):
                tripped.add(gpu)
            else:
                tripped.discard(gpu)

    @staticmethod
    def _rate(temps: deque[tuple[float, float]], window_s: float) -> float | None:
        """Average slope over the last window_s of samples (C/s); None without enough history."""
        if len(temps) < 2:
            return None
        t_last, v_last = temps[-1]
        first = None
        for t, v in temps:
            if t_last - t <= window_s + 1e-6:
                first = (t, v)
                break
        if first is None:
            return None
        span = t_last - first[0]
        if span < 0.6 * window_s:
            return None
        return (v_last - first[1]) / span

    def _loop_rules(
        self,
        snap: Snapshot,
        now: float,
        acked: frozenset[str] | set[str],
        loops: Mapping[str, tuple[str, ...]],
    ) -> None:
        cfg = self.config
        for cdu, gpus in loops.items():
            supply = self._fresh(snap, cdu, "supply_temp_c", now)
            sh = cfg.coolant_supply_high
            if sh.enabled and supply is not None:
                self._update(
                    self._instance("coolant_supply_high", cdu, gpus),
                    now,
                    trip_now=False,
                    cond=supply >= sh.trip_c,
                    sustain_s=sh.sustain_s,
                    clear_cond=supply <= sh.clear_c,
                    clear_hold_s=sh.clear_hold_s,
                    caps=partial(self._loop_caps, gpus, sh.cap_pct),
                    detail={
                        "inputs": {"supply_temp_c": round(supply, 2)},
                        "thresholds": {
                            "trip_c": sh.trip_c,
                            "sustain_s": sh.sustain_s,
                            "clear_c": sh.clear_c,
                            "clear_hold_s": sh.clear_hold_s,
                            "cap_pct": sh.cap_pct,
                        },
                    },
                )
            fl = cfg.coolant_flow_low
            flow = self._fresh(snap, cdu, "flow_lpm", now)
            fault = self._fresh(snap, cdu, "pump_fault", now)
            min_flow = self.topology.min_flow_lpm.get(cdu, fl.min_flow_lpm)
            if fl.enabled and flow is not None:
                bad = flow < min_flow or bool(fault)
                self._update(
                    self._instance("coolant_flow_low", cdu, gpus),
                    now,
                    trip_now=False,
                    cond=bad,
                    sustain_s=fl.sustain_s,
                    clear_cond=not bad,
                    clear_hold_s=fl.clear_hold_s,
                    caps=partial(self._loop_caps, gpus, fl.cap_pct),
                    detail={
                        "inputs": {"flow_lpm": round(flow, 2), "pump_fault": fault},
                        "thresholds": {
                            "min_flow_lpm": min_flow,
                            "sustain_s": fl.sustain_s,
                            "clear_hold_s": fl.clear_hold_s,
                            "cap_pct": fl.cap_pct,
                        },
                    },
                )
            lk = cfg.coolant_leak
            leak = self._fresh(snap, cdu, "leak", now)
            if lk.enabled and leak is not None:
                inst = self._instance("coolant_leak", cdu, gpus)
                self._update(
                    inst,
                    now,
                    trip_now=bool(leak),
                    cond=False,
                    sustain_s=0.0,
                    clear_cond=not leak,
                    clear_hold_s=0.0,
                    caps=partial(self._loop_minimums, gpus),
                    extra_clear_ok=inst.trip_event is not None and inst.trip_event in acked,
                    detail={
                        "inputs": {"leak": leak},
                        "thresholds": {"cap": "minimum limit", "clears": "dry detector and manual ack"},
                    },
                )

    def _escalation_rule(
        self,
        snap: Snapshot,
        now: float,
        limits: Mapping[str, GpuLimits | None],
        loops: Mapping[str, tuple[str, ...]],
        suppressed: set[tuple[str, str]],
    ) -> None:
        """The ladder above each loop's coolant caps (escalation.py); one event per rung."""
        esc = self.config.coolant_escalation
        if not esc.enabled:
            return
        for cdu, gpus in loops.items():
            r = snap.get((cdu, "supply_temp_c"))
            supply = self._fresh(snap, cdu, "supply_temp_c", now)
            hist = self._supply_hist.setdefault(cdu, deque(maxlen=256))
            if supply is not None and r is not None and (not hist or hist[-1][0] < r.ts_mono):
                hist.append((r.ts_mono, supply))
            while hist and hist[-1][0] - hist[0][0] > 2 * esc.rise_window_s:
                hist.popleft()
            base = [
                i
                for n in ("coolant_supply_high", "coolant_flow_low")
                if (i := self.instances.get((n, cdu))) is not None
                and i.tripped
                and (n, cdu) not in suppressed
            ]
            caps_since = min((i.tripped_since or now for i in base), default=None)
            rise = escalation.rise_over(hist, esc.rise_window_s)
            self._rising[cdu] = rise is not None and rise >= esc.rise_c
            inst = self._instance("coolant_escalation", cdu, gpus)
            was = inst.stage
            outcome = escalation.step_ladder(
                inst,
                esc,
                now=now,
                supply_c=supply,
                rise_c=rise,
                caps_since=caps_since,
                gpus=gpus,
                limits=limits,
            )
            if outcome is not None or inst.tripped_since is not None:
                self._touched.append(inst)
            if outcome == "climb":
                inst.trip_event = self._event_id(self._now_wall)
                self._extra_events.append(
                    Event(
                        kind="interlock_escalation",
                        severity=Severity.CRITICAL,
                        message=f"coolant_escalation on {cdu}: stage {inst.stage} "
                        f"({inst.detail['action']}, {len(inst.caps)} GPU(s)): supply "
                        f"{supply} C {inst.detail['why']} with caps in force",
                        device=cdu,
                        needs_ack=True,
                        id=inst.trip_event,
                        ts_wall=self._now_wall,
                        detail={
                            "interlock": "coolant_escalation",
                            "from_stage": was,
                            "gpus": list(gpus),
                            "caps_w": {g: round(w, 1) for g, w in inst.caps.items()},
                            "base_trips": [i.trip_event for i in base],
                            **inst.detail,
                        },
                    )
                )
            elif outcome == "clear":
                self._extra_events.append(
                    Event(
                        kind="interlock_clear",
                        severity=Severity.INFO,
                        message=f"coolant_escalation cleared on {cdu} (coolant caps released)",
                        device=cdu,
                        detail={
                            "interlock": "coolant_escalation",
                            "from_stage": was,
                            "trip_event": inst.trip_event,
                            "gpus": list(gpus),
                        },
                        id=self._event_id(self._now_wall),
                        ts_wall=self._now_wall,
                    )
                )
                inst.trip_event = None

    def _alarm_rule(self, snap: Snapshot, now: float, changed: set[str] | None) -> None:
        """A cooling device's own trip/fault/alarm word: an event at once, and when it reads 0."""
        if not self.config.cooling_alarm.enabled:
            return
        for dev, metrics in self.topology.alarm_metrics.items():
            if changed is not None and dev not in changed:
                continue
            values = {m: self._fresh(snap, dev, m, now) for m in metrics}
            known = {m: v for m, v in values.items() if v is not None}
            if not known:
                continue  # unread or stale: sensor_stale's business, not an alarm's
            raised = {m: v for m, v in known.items() if v}
            gpus = self.topology.cooled_gpus.get(dev, ())
            inst = self._instance("cooling_alarm", dev, gpus)
            self._update(
                inst,
                now,
                trip_now=bool(raised),
                cond=False,
                sustain_s=0.0,
                clear_cond=not raised and len(known) == len(metrics),
                clear_hold_s=0.0,
                caps=None,
                detail={
                    "inputs": {m: (int(v) if float(v).is_integer() else v) for m, v in known.items()},
                    "raised": sorted(raised),
                    "thresholds": {"raised_when": "non-zero"},
                },
            )

    def _pdu_rule(
        self,
        snap: Snapshot,
        now: float,
        limits: Mapping[str, GpuLimits | None],
        pdus: Mapping[str, tuple[str, ...]],
    ) -> None:
        oc = self.config.pdu_phase_overcurrent
        if not oc.enabled:
            return
        for pdu, gpus in pdus.items():
            rating = self.topology.pdu_rating_a.get(pdu, oc.default_rating_a or 0.0)
            if not rating:
                continue
            currents = [self._fresh(snap, pdu, f"phase{p}_current_a", now) for p in (1, 2, 3)]
            known = [c for c in currents if c is not None]
            if not known:
                continue
            worst = max(known)
            pct = 100.0 * worst / rating
            inst = self._instance("pdu_phase_overcurrent", pdu, gpus)
            caps: dict[str, float] = {}
            if not inst.tripped and pct >= oc.trip_pct:
                # Aim for target_pct: scale each GPU's present draw by target/actual.
                scale = oc.target_pct / pct if pct > 0 else 1.0
                for g in gpus:
                    lim = limits.get(g)
                    # The GPU's draw now where NVML gives it (power_w is a 1 s average).
                    power = self._fresh(snap, g, "power_instant_w", now, stale_device=g)
                    if power is None:
                        power = self._fresh(snap, g, "power_w", now, stale_device=g)
                    if lim is None:
                        continue
                    base = power if power is not None else lim.default_w
                    caps[g] = max(lim.min_w, min(lim.default_w, base * scale))
            elif pct >= oc.clear_pct and now - inst.last_tighten >= oc.tighten_interval_s:
                for g in gpus:
                    lim = limits.get(g)
                    if lim is None or g not in inst.caps:
                        continue
                    caps[g] = max(lim.min_w, inst.caps[g] - lim.default_w * oc.tighten_step_pct / 100.0)
                inst.last_tighten = now
            self._update(
                inst,
                now,
                trip_now=pct >= oc.immediate_pct,
                cond=pct >= oc.trip_pct,
                sustain_s=oc.sustain_s,
                clear_cond=pct < oc.clear_pct,
                clear_hold_s=oc.clear_hold_s,
                caps=caps,
                detail={
                    "inputs": {
                        "phase_current_a": [None if c is None else round(c, 2) for c in currents],
                        "worst_pct_of_rating": round(pct, 1),
                        "rating_a": rating,
                    },
                    "thresholds": {
                        "trip_pct": oc.trip_pct,
                        "sustain_s": oc.sustain_s,
                        "immediate_pct": oc.immediate_pct,
                        "clear_pct": oc.clear_pct,
                        "clear_hold_s": oc.clear_hold_s,
                    },
                },
            )
            if inst.tripped and inst.detail.get("_transition") == "trip":
                inst.last_tighten = now

    def _stale_inputs(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """(device, metrics, GPUs protected) for every interlock input."""
        if self._inputs is not None:
            return self._inputs
        out: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
        for gpu in self.topology.gpus:
            out.append((gpu, ("temp_c",), (gpu,)))
        for cdu, gpus in self.topology.loops.items():
            out.append((cdu, ("supply_temp_c", "flow_lpm"), gpus))
        for pdu, gpus in self.topology.pdus.items():
            out.append((pdu, ("phase1_current_a", "phase2_current_a", "phase3_current_a"), gpus))
        self._inputs = out
        return out

    def _stale_rule(self, snap: Snapshot, now: float, changed: set[str] | None) -> None:
        st = self.config.sensor_stale
        if not st.enabled:
            return
        in_grace = now - self.started < st.startup_grace_s
        inputs = self._stale_inputs()
        if changed is not None:
            # Only the changed inputs, in topology order (events come out in a stable order).
            if self._input_pos is None:
                self._input_pos = {device: i for i, (device, _, _) in enumerate(inputs)}
            pos = self._input_pos
            inputs = [inputs[i] for i in sorted(pos[d] for d in changed if d in pos)]
        get, limits, good = snap.get, self.topology.stale_after_s, Quality.GOOD
        for device, metrics, gpus in inputs:
            limit = limits.get(device)
            missing = []
            for m in metrics:  # _fresh(), inlined: this runs for each of ~600 inputs per full step
                r = get((device, m))
                v = None if r is None else r.value
                if (
                    v is None
                    or r is None
                    or r.quality is not good
                    or not math.isfinite(v)
                    or (limit is not None and now - r.ts_mono > limit)
                ):
                    missing.append(m)
            inst = self._instance("sensor_stale", device, gpus)
            if not missing and inst.tripped_since is None:
                inst.cond_since = None  # fresh and idle: what _update would decide
                continue
            # Right after start, an input that has simply not arrived yet is not (yet) stale.
            stale = any(not (in_grace and snap.get((device, m)) is None) for m in missing)
            # The caps matter only to a trip or a tripped instance (they never loosen one).
            caps = (
                {g: c for g in gpus if (c := self._pct_cap(self._step_limits[g], st.cap_pct)) is not None}
                if stale or inst.tripped
                else None
            )
            reasons = {}
            for m in missing:
                r = snap.get((device, m))
                reasons[m] = (
                    "never received"
                    if r is None
                    else (r.error or str(r.quality))
                    if r.quality is not Quality.GOOD or r.value is None
                    else f"not a number ({r.value})"
                    if not math.isfinite(r.value)
                    else f"{now - r.ts_mono:.1f} s old"
                )
            self._update(
                inst,
                now,
                trip_now=stale,
                cond=False,
                sustain_s=0.0,
                clear_cond=not missing,
                clear_hold_s=st.fresh_hold_s,
                caps=caps,
                detail=partial(_stale_detail, st, self.topology.stale_after_s.get(device), metrics, reasons),
            )

    def _shed(
        self,
        snap: Snapshot,
        now: float,
        now_wall: float,
        suppressed: set[tuple[str, str]],
        acked: frozenset[str] | set[str],
        events: list[Event],
        actions: list[Action],
    ) -> None:
        """Manual clear only: a shed stays until a person acknowledges its event (and the outlets
        stay off until a person switches them on: restoring power is a human decision)."""
        sh = self.config.shed
        for cdu, gpus in self.topology.loops.items():
            done = self.instances.get(("shed", cdu))
            if done is not None and done.shed_done and done.trip_event in acked:
                done.shed_done = False
                done.tripped_since = None
                done.trip_event = None
            capped = [
                i
                for i in (
                    self.instances.get((n, cdu))
                    for n in ("coolant_supply_high", "coolant_flow_low", "coolant_leak")
                )
                if i and i.tripped
            ]
            supply = self._fresh(snap, cdu, "supply_temp_c", now)
            inst = self._instance("shed", cdu, gpus)
            leak = self.instances.get(("coolant_leak", cdu))
            if (
                self.config.coolant_leak.shed
                and leak is not None
                and leak.tripped
                and self._leak_shed_for.get(cdu) != leak.trip_event  # once per leak trip
                and not inst.shed_done
                and ("shed", cdu) not in suppressed
            ):
                self._leak_shed_for[cdu] = leak.trip_event
                self._shed_wet_zone(cdu, gpus, inst, now, now_wall, events, actions)
                continue
            if not sh.enabled:
                continue
            if not capped or supply is None or inst.shed_done or ("shed", cdu) in suppressed:
                continue
            since = min(i.tripped_since or now for i in capped)
            # design.md's shed: critical supply after_caps_s after the caps; or the ladder's last
            # rung: minimum caps held stage_hold_s and the supply still rising.
            esc, esc_cfg = self.instances.get(("coolant_escalation", cdu)), self.config.coolant_escalation
            ladder = (
                esc is not None
                and esc.stage >= escalation.TOP_RUNG
                and esc.stage_since is not None
                and now - esc.stage_since >= esc_cfg.stage_hold_s
                and self._rising.get(cdu, False)
            )
            if not ladder and (supply < sh.critical_c or now - since < sh.after_caps_s):
                continue
            hottest = sorted(
                gpus, key=lambda g: -(self._fresh(snap, g, "temp_c", now, stale_device=g) or -1e9)
            )
            chosen: list[tuple[str, int]] = []
            servers_done: list[tuple[str, ...]] = []
            for g in hottest:
                for pdu, outlets in self.topology.outlet_gpus.items():
                    for outlet, og in outlets.items():
                        if g in og and (pdu, outlet) not in chosen:
                            if og not in servers_done and len(servers_done) >= sh.servers:
                                continue
                            chosen.append((pdu, outlet))
                            if og not in servers_done:
                                servers_done.append(og)
                if len(servers_done) >= sh.servers:
                    break
            self._shed_outlets(
                cdu,
                inst,
                chosen,
                now,
                now_wall,
                events,
                actions,
                reason=f"shed: {cdu} supply {supply:.1f} C",
                message=f"shed on {cdu}: supply {supply:.1f} C >= {sh.critical_c} C "
                f"{now - since:.0f} s after caps; switching off {len(chosen)} outlet(s)",
                detail={
                    "cause": "coolant_escalation" if ladder else "supply_critical",
                    "inputs": {
                        "supply_temp_c": round(supply, 2),
                        "still_rising": self._rising.get(cdu, False),
                    },
                    "thresholds": {"critical_c": sh.critical_c, "after_caps_s": sh.after_caps_s},
                    "servers": [list(s) for s in servers_done],
                },
            )

    def _shed_wet_zone(
        self,
        cdu: str,
        gpus: tuple[str, ...],
        inst: Instance,
        now: float,
        now_wall: float,
        events: list[Event],
        actions: list[Action],
    ) -> None:
        """coolant_leak with ``shed = true``: water on the loop, so every server the loop cools is
        switched off at once (the caps are not enough near live power). Manual clear, as a shed."""
        on_loop = set(gpus)
        chosen = [
            (pdu, outlet)
            for pdu, outlets in self.topology.outlet_gpus.items()
            for outlet, og in outlets.items()
            if on_loop.intersection(og)
        ]
        self._shed_outlets(
            cdu,
            inst,
            chosen,
            now,
            now_wall,
            events,
            actions,
            reason=f"shed: leak on {cdu}",
            message=f"shed on {cdu}: coolant leak; switching off {len(chosen)} outlet(s) on the loop",
            detail={
                "cause": "coolant_leak",
                "inputs": {"leak": 1},
                "thresholds": {"coolant_leak.shed": True},
            },
        )

    def _shed_outlets(
        self,
        cdu: str,
        inst: Instance,
        chosen: list[tuple[str, int]],
        now: float,
        now_wall: float,
        events: list[Event],
        actions: list[Action],
        *,
        reason: str,
        message: str,
        detail: dict[str, Any],
    ) -> None:
        """Both sheds: the outlets off (in order), one critical event a person must acknowledge."""
        inst.shed_done = True
        inst.tripped_since = now
        inst.trip_event = self._event_id(now_wall)
        for pdu, outlet in chosen:
            actions.append(Action("outlet_off", pdu, outlet, reason, inst.trip_event))
        events.append(
            Event(
                kind="interlock_trip",
                severity=Severity.CRITICAL,
                message=message,
                device=cdu,
                needs_ack=True,
                id=inst.trip_event,
                ts_wall=now_wall,
                detail={
                    "interlock": "shed",
                    **detail,
                    "outlets": [{"pdu": p, "outlet": o} for p, o in chosen],
                },
            )
        )

    def _setpoint_actions(self, now_wall: float, actions: list[Action]) -> None:
        sp = self.config.coolant_supply_high.setpoint_on_trip_c
        if sp is None:
            return
        for inst in self._supply_high:  # not a walk over every instance, every step
            cdu = inst.device
            if inst.tripped and not inst.setpoint_lowered:
                actions.append(
                    Action("cdu_setpoint", cdu, sp, "coolant_supply_high tripped", inst.trip_event or "")
                )
                inst.setpoint_lowered = True
            elif not inst.tripped and inst.setpoint_lowered:
                actions.append(Action("cdu_setpoint_restore", cdu, 0, "coolant_supply_high cleared", ""))
                inst.setpoint_lowered = False

    # ------------------------------------------------------------------ combine + ramp
    def caps_by_gpu(self, suppressed: set[tuple[str, str]]) -> dict[str, list[tuple[float, str]]]:
        out: dict[str, list[tuple[float, str]]] = {}
        for inst in self.instances.values():
            if inst.tripped_since is None or (inst.interlock, inst.device) in suppressed:
                continue  # (tripped_since, not .tripped: this runs over every instance, every step)
            for g, w in inst.caps.items():
                out.setdefault(g, []).append((w, inst.interlock))
        return out

    def caps_of(
        self, gpus: Collection[str], suppressed: set[tuple[str, str]]
    ) -> dict[str, list[tuple[float, str]]]:
        """``caps_by_gpu`` for some GPUs, from the index (the instances whose group or caps hold
        each GPU): the same lists, in a cost proportional to those GPUs."""
        out: dict[str, list[tuple[float, str]]] = {}
        for g in gpus:
            for inst in self._covering.get(g, ()):
                if inst.tripped_since is None or (inst.interlock, inst.device) in suppressed:
                    continue
                w = inst.caps.get(g)
                if w is not None:
                    out.setdefault(g, []).append((w, inst.interlock))
        return out

    def _combine(
        self,
        now: float,
        limits: _LazyLimits,
        suppressed: set[tuple[str, str]],
        external: Mapping[str, tuple[float, str]],
        full: bool,
        changed_gpus: Sequence[str],
    ) -> dict[str, float]:
        """Each GPU's cap: the lowest of its interlock caps, its external cap and its default,
        clamped to its constraints; lowered at once, raised only by the ramp (on a full step).

        Incremental: only the GPUs whose combined cap may have moved are recomputed: those the
        ledger, an override or an external cap marked, those whose constraints changed (every
        GPU's are looked at on a full step, the changed GPUs' on a partial one, and those a rule
        read this step), and on a full step those still ramping up. Any other GPU's recomputation
        would give its last cap again, with nothing to update."""
        pos = self._gpu_pos
        by_gpu: dict[str, list[tuple[float, str]]] | None = None
        if not self.incremental:
            gpus: Sequence[str] = self.topology.gpus
            by_gpu = self.caps_by_gpu(suppressed)
        else:
            todo = self._dirty
            combined, memo = self._combined_limits, self._limits_memo
            get = limits._snap.get
            m0, m1, m2 = LIMIT_METRICS
            for g in self.topology.gpus if full else changed_gpus:
                known = memo.get(g)
                if (
                    known is None
                    or known[0][0] is not get((g, m0))
                    or known[0][1] is not get((g, m1))
                    or known[0][2] is not get((g, m2))
                ) and limits[g] != combined.get(g):
                    todo.add(g)
            for g, lim in limits.items():  # the constraints a rule read this step
                last = combined.get(g)
                if lim is not last and lim != last:  # (the memo gives the same object back)
                    todo.add(g)
            if full:
                todo |= self._ramping
            gpus = sorted((g for g in todo if g in pos), key=pos.__getitem__)
        self._dirty = set()
        held = self._gpu_caps
        ramping = self._ramping
        step_pct = self.config.release_step_pct
        interval = self.config.release_interval_s
        out: dict[str, float] = {}
        for gpu in gpus:
            lim = limits[gpu]
            mem = self.gpu_mem[gpu]
            if lim is None:
                continue  # constraints unknown (GPU never read): nothing safe to ask for
            self._combined_limits[gpu] = lim
            desired = lim.default_w
            if by_gpu is not None:
                for w, _ in by_gpu.get(gpu, ()):
                    desired = min(desired, w)
            else:
                mine = held.get(gpu)
                if mine:
                    if suppressed:
                        for key, w in mine.items():
                            if key not in suppressed and w < desired:
                                desired = w
                    else:
                        desired = min(desired, *mine.values())
            if gpu in external:
                desired = min(desired, external[gpu][0])
            desired = max(lim.min_w, min(lim.max_w, desired))
            applied = mem.applied_w if mem.applied_w is not None else lim.default_w
            applied = max(lim.min_w, min(lim.max_w, applied))
            if desired < applied:
                applied = desired  # lower at once
                mem.last_raise = now
            elif desired > applied and full and now - mem.last_raise >= interval:
                applied = min(desired, applied + lim.default_w * step_pct / 100.0)  # ramped release
                mem.last_raise = now
            mem.applied_w = applied
            if applied < desired:
                ramping.add(gpu)
            else:
                ramping.discard(gpu)
            out[gpu] = applied
        return out

    # ------------------------------------------------------------------ views
    def active(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.tripped]


__all__ = [
    "Action",
    "Decision",
    "Engine",
    "GpuLimits",
    "GpuMemory",
    "Instance",
    "Override",
    "Snapshot",
    "Topology",
]
