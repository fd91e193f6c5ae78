"""The interlock service: runs the pure engine on every new interlock input, applies its decisions.

The engine loop never awaits the network, a publisher or an actuator: it hands the desired caps to
the power limiter (a task per batch) and discrete actions to an action task, and goes on. The
actuators (agent/actuators.py) set GPU power limits (clamped, read back, verified; a refused or
failed set is an event and is retried), switch PDU outlets for ``shed`` (verified off) and write
CDU setpoints (read back).

The service uses only what it is given: the store, the event bus, the actuators, its config and
the GPUs with their staleness limits. ``run(agent)`` is the adapter that takes them from the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from agent.actuators import ActuationError, Actuators, CapResult
from agent.config import AgentConfig
from agent.events import Event, EventBus, Severity
from agent.histogram import EVALUATION_BUCKETS_S, Histogram
from agent.interlocks.config import FORCE_ONLY, INTERLOCKS, InterlockConfig
from agent.interlocks.engine import LIMIT_METRICS as ENGINE_LIMIT_METRICS
from agent.interlocks.engine import Action, Engine, Override, Topology
from agent.interlocks.urgency import must_evaluate_now
from agent.inventory import Inventory
from agent.model import Reading
from agent.state import StateStore

if TYPE_CHECKING:
    from agent.app import Agent

log = structlog.get_logger(__name__)
_LOG_LEVEL = {
    Severity.INFO: logging.INFO,
    Severity.WARNING: logging.WARNING,
    Severity.CRITICAL: logging.CRITICAL,
}

INPUT_METRICS = frozenset(
    {
        "temp_c",
        "supply_temp_c",
        "flow_lpm",
        "pump_fault",
        "tripped",
        "alarms",
        "leak",
        "phase1_current_a",
        "phase2_current_a",
        "phase3_current_a",
        "power_w",
    }
)
# A GPU's NVML constraints: not inputs of a trip, but the engine's caps are computed from them.
LIMIT_METRICS = frozenset(ENGINE_LIMIT_METRICS)
CAP_TOLERANCE_W = 1.0  # NVML limits are whole mW; anything under a watt is the same limit
CapSource = Callable[[], Mapping[str, tuple[float, str]]]  # GPU -> (cap W, why): the fleet budget...


@dataclass
class Timing:
    """One cap change, for the latency benchmark: input arrival -> decision -> set issued -> done."""

    gpu: str
    cap_w: float
    trigger_mono: float
    decided_mono: float
    issued_mono: float | None = None
    done_mono: float | None = None
    ok: bool | None = None


@dataclass
class GpuActuation:
    requested_w: float | None = None  # what we last set successfully
    in_flight_w: float | None = None  # a set submitted, not yet read back
    failing_since: float | None = None
    next_try: float = 0.0
    last_error: str | None = None


@dataclass
class _Mailbox:
    actions: list[Action] = field(default_factory=list)


class InterlockService:
    def __init__(self, config: InterlockConfig) -> None:
        self.config = config
        self.engine: Engine | None = None
        self.store: StateStore | None = None
        self.events: EventBus | None = None
        self.actuators: Actuators | None = None
        self._overrides: dict[str, Override] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._trigger_mono = 0.0
        self._mailbox = _Mailbox()
        self._mail = asyncio.Event()
        self.caps: dict[str, float] = {}
        self.actuation: dict[str, GpuActuation] = {}
        self.timings: deque[Timing] = deque(maxlen=4096)
        self.steps = 0
        self.step_durations: deque[float] = deque(maxlen=2048)
        self.step_histogram = Histogram(EVALUATION_BUCKETS_S)  # for /metrics
        self.cap_sources: list[CapSource] = []
        # The GPUs and staleness limits from the running pollers (set by run(); a reload's new
        # topology is built from them and the new inventory).
        self._inputs: Callable[[Inventory], tuple[list[str], dict[str, float]]] | None = None
        self._cdu_setpoints: dict[str, float] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._changed: set[str] = set()
        self._deferred: asyncio.TimerHandle | None = None  # a coalesced evaluation, due soon
        self.deferred_batches = 0  # batches that waited to be coalesced (for /metrics and benches)
        self.full_steps = 0
        self._last_full = 0.0
        self._full_due_s = 1.0  # the clock's full evaluation, this long after the last full one
        self._full_next = True  # overrides, acks and budgets change the picture for every GPU

    # ------------------------------------------------------------------ wiring
    async def run(self, agent: Agent) -> None:
        """The adapter: what the service uses, taken from the agent once it has polled."""
        agent.interlocks = self
        agent.status_providers["interlocks"] = self.status
        agent.metric_sources.append(self.metrics)
        await agent.ready.wait()
        self._inputs = lambda inventory: inputs_from_pollers(agent, inventory)
        gpus, stale = self._inputs(agent.inventory)
        await self.serve(
            agent.store,
            agent.events,
            agent.actuators,
            topology_from_config(agent.inventory, gpus, stale),
            cap_sources=agent.cap_sources,
        )

    async def serve(
        self,
        store: StateStore,
        events: EventBus,
        actuators: Actuators,
        topology: Topology,
        *,
        cap_sources: list[CapSource] | None = None,
    ) -> None:
        """Arm the interlocks on ``topology`` and run them until cancelled."""
        self.store, self.events, self.actuators = store, events, actuators
        if cap_sources is not None:
            self.cap_sources = cap_sources
        self.engine = self._build_engine(store, events, topology)
        unsubscribe = store.subscribe(self._on_batch)
        log.info(
            "interlocks armed",
            gpus=len(self.engine.topology.gpus),
            loops=len(self.engine.topology.loops),
            pdus=len(self.engine.topology.pdus),
        )
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                tg.create_task(self._actuate_loop(), name="interlocks.actuate")
                await self._engine_loop()
        finally:
            unsubscribe()
            if self.config.restore_defaults_on_stop:
                await self._restore_defaults()

    def apply_config(self, config: AgentConfig, inventory: Inventory) -> None:
        """A reload's new [interlocks] settings and topology (validated already): the next step
        uses them; trips in progress stay (their clear conditions now use the new thresholds)."""
        self.config = config.interlocks
        if self.engine is not None and self._inputs is not None:
            gpus, stale = self._inputs(inventory)
            topology = topology_from_config(inventory, gpus, stale)
            # GPUs come from NVML discovery: a reload that restarted the NVML poller keeps the
            # GPUs it had until that poller has polled again.
            if not topology.gpus:
                topology = dataclasses.replace(topology, gpus=self.engine.topology.gpus)
            self.engine.reconfigure(self.config, topology)
        self._full_next = True
        self._wake.set()

    def _build_engine(self, store: StateStore, events: EventBus, topo: Topology) -> Engine:
        initial = {}
        for g in topo.gpus:
            limit_r, default_r = store.get(g, "power_limit_w"), store.get(g, "default_power_limit_w")
            if limit_r and default_r and limit_r.value is not None and default_r.value is not None:
                if limit_r.value < default_r.value - CAP_TOLERANCE_W:
                    initial[g] = limit_r.value
                self.actuation[g] = GpuActuation(requested_w=limit_r.value)
        if initial:
            events.emit(
                "reconciled",
                Severity.WARNING,
                f"{len(initial)} GPU(s) found capped at start; "
                "keeping the caps still justified, ramping the rest",
                detail={"caps_w": {g: round(w, 1) for g, w in initial.items()}},
            )
        return Engine(self.config, topo, started=time.monotonic(), initial_limits=initial)

    def _on_batch(self, batch: Sequence[Reading]) -> None:
        # Cheap: runs inside StateStore.update for every batch; the engine re-evaluates only the
        # devices with new inputs or constraints (and everything at least once a second). One
        # pass over the batch; the history and the urgency look at its interlock inputs only
        # (a node's answer: ~8 of its ~50 readings).
        changed: set[str] = set()
        inputs: list[Reading] = []
        for r in batch:
            if r.metric in INPUT_METRICS:
                changed.add(r.device)
                inputs.append(r)
            elif r.metric in LIMIT_METRICS:
                changed.add(r.device)  # the engine's step must look at a GPU whose limits moved
        if not changed:
            return
        # A batch that would overwrite readings no evaluation has seen yet goes at once: every
        # reading is evaluated (a GPU's temperature history, for gpu_runaway's rate, is whole).
        overwrites = not self._changed.isdisjoint(changed)
        if self.engine is not None:
            self.engine.observe(inputs)
        self._changed |= changed
        if self._wake.is_set():
            return
        engine = self.engine
        if (
            engine is None
            or overwrites
            or must_evaluate_now(inputs, INPUT_METRICS, self.config, engine.topology, engine.busy)
        ):
            self._trigger_mono = batch[0].ts_mono  # latency is measured from the urgent batch
            self._wake.set()
            return
        # Far from every threshold, nothing tripped or timing: evaluate with what comes next.
        self.deferred_batches += 1
        if self._deferred is None:
            self._trigger_mono = self._trigger_mono or batch[0].ts_mono
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a store written outside the loop: no timer to arm, so now
                self._wake.set()
                return
            self._deferred = loop.call_later(self.config.coalesce_s, self._wake.set)

    # ------------------------------------------------------------------ engine loop
    async def _engine_loop(self) -> None:
        assert self.store is not None and self.events is not None and self.engine is not None
        store, bus, engine = self.store, self.events, self.engine
        all_gpus = frozenset(engine.topology.gpus)
        while True:
            # Hold times, ramps and staleness need a clock: a full evaluation at least every second.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self._last_full + self._full_due_s - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()
            if self._deferred is not None:
                self._deferred.cancel()  # this evaluation takes the coalesced batches with it
                self._deferred = None
            trigger = self._trigger_mono or time.monotonic()
            self._trigger_mono = 0.0
            t0 = time.monotonic()
            changed, self._changed = self._changed, set()
            # A batch with every GPU in it (the NVML poll) costs a full evaluation anyway: make it
            # one, so the once-a-second full evaluation does not repeat it.
            every_gpu = bool(all_gpus and all_gpus <= changed)
            full = t0 - self._last_full >= self._full_due_s or self._full_next or every_gpu
            if full:
                self._last_full = t0
                self._full_next = False
                self.full_steps += 1
                # After a full evaluation made by the 1 Hz NVML batch, the clock's own waits a
                # quarter of a second more for the next such batch (which makes one anyway) rather
                # than run one just before it: two full 576-GPU steps a second where one does.
                # Without such batches (or with them late) the clock's runs every second.
                self._full_due_s = 1.25 if every_gpu else 1.0
            now_wall = time.time()
            self._expire_overrides(now_wall)
            external: dict[str, tuple[float, str]] = {}
            for source in self.cap_sources:
                for g, (w, why) in source().items():
                    if g not in external or w < external[g][0]:
                        external[g] = (w, why)
            decision = engine.step(
                store.readings(),
                t0,
                now_wall,
                overrides=list(self._overrides.values()),
                external_caps=external,
                acked=frozenset(bus.acks),
                changed=None if full else changed,
            )
            decided = time.monotonic()
            self.steps += 1
            self.step_durations.append(decided - t0)
            self.step_histogram.observe(decided - t0)
            for event in decision.events:
                bus.publish(event)
                # At the event's own severity: a clear is info, a trip warning or critical (journald).
                log.log(
                    _LOG_LEVEL[event.severity],
                    event.message,
                    interlock=event.detail.get("interlock"),
                    device=event.device,
                )
            self.caps = decision.caps
            # A partial step only changed the caps of the GPUs it evaluated; the full step (at
            # least once a second) looks at every GPU again, which is when failed sets are retried.
            to_check = decision.caps if full or decision.evaluated is None else decision.evaluated
            self._dispatch_caps(to_check, trigger, decided)
            if decision.actions:
                self._mailbox.actions.extend(decision.actions)
                self._mail.set()

    # ------------------------------------------------------------------ actuation
    def _dispatch_caps(self, caps: Mapping[str, float], trigger: float, decided: float) -> None:
        """Hand every needed power-limit change to the power limiter now, without awaiting it: a
        task per batch collects the read-backs."""
        now = time.monotonic()
        batch: dict[str, float] = {}
        for gpu, cap in caps.items():
            act = self.actuation.setdefault(gpu, GpuActuation())
            target = act.in_flight_w if act.in_flight_w is not None else act.requested_w
            if (
                target is not None
                and abs(target - cap) <= CAP_TOLERANCE_W / 2
                and (act.failing_since is None or act.in_flight_w is not None)
            ):
                continue
            if act.failing_since is not None and now < act.next_try:
                continue
            act.in_flight_w = cap
            batch[gpu] = cap
        if batch:
            assert self._tg is not None and self.actuators is not None
            issued = time.monotonic()
            try:
                pending = self.actuators.power.set_caps(batch)  # the sets start here, now
            except Exception as err:  # an actuator bug is a failed action, never a dead engine
                log.exception("power limit set crashed")
                pending = _failed_caps(batch, f"{type(err).__name__}: {err}")
            self._tg.create_task(
                self._set_caps(batch, pending, trigger, decided, issued), name="interlocks.set"
            )

    async def _actuate_loop(self) -> None:
        """Discrete actions (shed, CDU setpoint), in order."""
        while True:
            await self._mail.wait()
            self._mail.clear()
            actions, self._mailbox.actions = self._mailbox.actions, []
            for action in actions:
                await self._act(action)

    async def _set_caps(
        self,
        batch: dict[str, float],
        pending: Awaitable[dict[str, CapResult]],
        trigger: float,
        decided: float,
        issued: float,
    ) -> None:
        """Collect one batch of cap changes from the power limiter; one event for the batch."""
        try:
            results = await pending
        except Exception as err:  # an actuator bug is a failed action, never a dead engine
            log.exception("power limit set crashed")
            results = {g: CapResult(None, f"{type(err).__name__}: {err}") for g in batch}
        done = time.monotonic()
        applied: dict[str, tuple[float | None, float, float | None]] = {}  # gpu: previous, cap, readback
        for gpu, cap in batch.items():
            self.actuation.setdefault(gpu, GpuActuation()).in_flight_w = None
            outcome = results.get(gpu) or CapResult(None, "no result")
            timing = Timing(gpu, cap, trigger, decided, issued, done)
            previous = self.actuation[gpu].requested_w
            if self._record(gpu, cap, outcome, timing):
                applied[gpu] = (previous, cap, outcome.readback_w)
        if applied:
            self._caps_applied_event(applied, (done - trigger) * 1000)

    def _caps_applied_event(
        self, applied: Mapping[str, tuple[float | None, float, float | None]], latency_ms: float
    ) -> None:
        """One ``cap_applied`` for a batch of GPUs (a loop's trip caps them all at once)."""
        assert self.events is not None
        gpus = sorted(applied, key=_natural)
        caps = {g: round(applied[g][1], 1) for g in gpus}
        lo, hi = min(caps.values()), max(caps.values())
        span = f"{lo:.0f} W" if lo == hi else f"{lo:.0f}-{hi:.0f} W"
        by = sorted({r for g in gpus for r in self._cap_reasons(g)})
        self.events.emit(
            "cap_applied",
            Severity.INFO,
            f"power limit of {len(gpus)} GPU(s) set to {span}"
            + (f" ({', '.join(by)})" if by else " (released)")
            + (f": {gpus[0]}" if len(gpus) == 1 else f": {gpus[0]}..{gpus[-1]}"),
            device=gpus[0] if len(gpus) == 1 else None,
            detail={
                "gpus": gpus,
                "caps_w": caps,
                "previous_w": {g: None if (p := applied[g][0]) is None else round(p, 1) for g in gpus},
                "readback_w": {g: None if (r := applied[g][2]) is None else round(r, 1) for g in gpus},
                "by": by,
                "latency_ms": round(latency_ms, 1),
            },
        )

    def _record(self, gpu: str, cap: float, outcome: CapResult, timing: Timing) -> bool:
        """Note one GPU's outcome; a failure is an event once per failure streak. True if applied."""
        assert self.events is not None
        events = self.events
        act = self.actuation.setdefault(gpu, GpuActuation())
        error = outcome.error
        timing.ok = error is None
        self.timings.append(timing)
        if error is None:
            act.requested_w = outcome.readback_w if outcome.readback_w is not None else cap
            if act.failing_since is not None:
                events.emit(
                    "actuation_recovered",
                    Severity.INFO,
                    f"{gpu}: power limit set to {cap:.0f} W after earlier failures",
                    device=gpu,
                    detail={"cap_w": round(cap, 1)},
                )
            act.failing_since = None
            act.last_error = None
            return True
        first = act.failing_since is None
        act.failing_since = act.failing_since or time.monotonic()
        act.next_try = time.monotonic() + self.config.retry_s
        if first or error != act.last_error:
            events.emit(
                "actuation_failed",
                Severity.CRITICAL,
                f"{gpu}: could not set power limit {cap:.0f} W: {error} "
                f"(retrying every {self.config.retry_s:g} s)",
                device=gpu,
                detail={"cap_w": round(cap, 1), "error": error, "by": self._cap_reasons(gpu)},
            )
        act.last_error = error
        return False

    async def _act(self, action: Action) -> None:
        assert self.actuators is not None and self.events is not None and self.store is not None
        acts = self.actuators
        try:
            if action.kind == "outlet_off":
                await acts.outlets.switch_off(action.device, int(action.value), reason=action.reason)
            elif action.kind == "cdu_setpoint":
                current = self.store.value(action.device, "setpoint_c")
                if current is not None:
                    self._cdu_setpoints.setdefault(action.device, current)
                await acts.points.write(
                    action.device, "setpoint_c", float(action.value), reason=action.reason
                )
            elif action.kind == "cdu_setpoint_restore" and action.device in self._cdu_setpoints:
                value = self._cdu_setpoints.pop(action.device)
                await acts.points.write(action.device, "setpoint_c", value, reason=action.reason)
        except ActuationError:
            return  # the actuator reported it (actuation_failed, critical)
        self.events.emit(
            "action",
            Severity.WARNING,
            f"{action.device}: {action.kind} {action.value} ({action.reason})",
            device=action.device,
            detail={
                "action": action.kind,
                "value": action.value,
                "reason": action.reason,
                "trip_event": action.event_id,
            },
        )

    async def _restore_defaults(self) -> None:
        if self.store is None or self.actuators is None:
            return
        defaults = {
            g: d for g in self.caps if (d := self.store.value(g, "default_power_limit_w")) is not None
        }
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await self.actuators.power.set_caps(defaults)
        log.info("power limits restored to defaults on stop", gpus=len(defaults))

    def _cap_reasons(self, gpu: str) -> list[str]:
        if self.engine is None:
            return []
        suppressed = {(o.interlock, o.device) for o in self._overrides.values()}
        return sorted({name for _, name in self.engine.caps_of((gpu,), suppressed).get(gpu, [])})

    # ------------------------------------------------------------------ overrides
    def add_override(
        self, interlock: str, device: str, *, duration_s: float, reason: str, by: str, force: bool = False
    ) -> dict[str, Any]:
        if interlock not in INTERLOCKS:
            raise ValueError(f"unknown interlock {interlock!r} (known: {', '.join(INTERLOCKS)})")
        if not reason.strip():
            raise ValueError("an override needs a reason")
        if not 0 < duration_s <= self.config.max_override_s:
            raise ValueError(
                f"duration must be between 0 and {self.config.max_override_s:g} s (got {duration_s:g})"
            )
        if interlock in FORCE_ONLY and not force:
            raise ValueError(f"{interlock} can only be overridden with force")
        known = self._known_devices()
        if device not in known:
            raise ValueError(f"unknown device {device!r} for interlocks")
        now = time.time()
        ov = Override(
            id=f"ov-{next(self._ids)}",
            interlock=interlock,
            device=device,
            reason=reason.strip(),
            by=by,
            created_wall=now,
            expires_wall=now + duration_s,
            forced=force,
        )
        self._overrides[ov.id] = ov
        assert self.events is not None
        self.events.emit(
            "override_set",
            Severity.WARNING,
            f"{interlock} on {device} overridden by {by} for {duration_s:.0f} s: {reason}",
            device=device,
            detail=ov.to_dict(),
        )
        self._full_next = True
        self._wake.set()
        return ov.to_dict()

    def clear_override(self, override_id: str, *, by: str) -> dict[str, Any]:
        ov = self._overrides.pop(override_id)  # KeyError: unknown id
        assert self.events is not None
        self.events.emit(
            "override_cleared",
            Severity.INFO,
            f"override {ov.id} ({ov.interlock} on {ov.device}) cleared by {by}",
            device=ov.device,
            detail={**ov.to_dict(), "cleared_by": by},
        )
        self._full_next = True
        self._wake.set()
        return ov.to_dict()

    def overrides(self) -> list[dict[str, Any]]:
        return [o.to_dict() for o in self._overrides.values()]

    def _expire_overrides(self, now_wall: float) -> None:
        for ov in [o for o in self._overrides.values() if o.expires_wall <= now_wall]:
            del self._overrides[ov.id]
            if self.events is not None:
                self.events.emit(
                    "override_expired",
                    Severity.INFO,
                    f"override {ov.id} ({ov.interlock} on {ov.device}) expired",
                    device=ov.device,
                    detail=ov.to_dict(),
                )

    def _known_devices(self) -> set[str]:
        if self.engine is None:
            return set()
        t = self.engine.topology
        return set(t.gpus) | set(t.loops) | set(t.pdus)

    # ------------------------------------------------------------------ views
    def status(self) -> dict[str, Any]:
        if self.engine is None:
            return {"armed": False, "active": [], "caps": {}, "overrides": self.overrides()}
        suppressed = {(o.interlock, o.device) for o in self._overrides.values()}
        active = []
        for inst in self.engine.active():
            active.append(
                {
                    "id": inst.trip_event,
                    "interlock": inst.interlock,
                    "device": inst.device,
                    "since_wall": time.time() - (time.monotonic() - (inst.tripped_since or time.monotonic())),
                    "cap_w": min(inst.caps.values()) if inst.caps else None,
                    "gpus": list(inst.gpus),
                    "overridden": (inst.interlock, inst.device) in suppressed,
                    "detail": {k: v for k, v in inst.detail.items() if not k.startswith("_")},
                }
            )
        caps = {}
        by_gpu = self.engine.caps_by_gpu(suppressed)
        for gpu, cap in self.caps.items():
            default = self.store.value(gpu, "default_power_limit_w") if self.store else None
            if default is None:
                continue
            reasons = sorted({n for _, n in by_gpu.get(gpu, [])})
            if cap >= default - CAP_TOLERANCE_W and not reasons:
                continue
            act = self.actuation.get(gpu)
            lowest = min((w for w, _ in by_gpu.get(gpu, [])), default=default)
            caps[gpu] = {
                "cap_w": round(cap, 1),
                "default_w": default,
                "by": reasons,
                "applied_w": None if act is None or act.requested_w is None else round(act.requested_w, 1),
                "state": "capped" if reasons and cap <= lowest + CAP_TOLERANCE_W else "ramping",
                "error": None if act is None else act.last_error,
            }
        return {
            "armed": True,
            "active": active,
            "caps": caps,
            "overrides": self.overrides(),
            "config_hash": config_hash(self.config),
        }

    def metrics(self) -> list[tuple[str, list[tuple[str, str]], float, str]]:
        out: list[tuple[str, list[tuple[str, str]], float, str]] = []
        if self.engine is None:
            return out
        for inst in self.engine.instances.values():
            if inst.tripped:
                out.append(
                    (
                        "podagent_interlock_active",
                        [("interlock", inst.interlock), ("device", inst.device)],
                        1.0,
                        "1 while the interlock is tripped on the device.",
                    )
                )
        for gpu, cap in self.caps.items():
            out.append(
                (
                    "podagent_gpu_power_cap_watts",
                    [("device", gpu)],
                    round(cap, 1),
                    "The power cap the interlocks (and budget) ask for this GPU.",
                )
            )
        out.append(
            (
                "podagent_interlock_overrides_active",
                [],
                float(len(self._overrides)),
                "Interlock overrides in force.",
            )
        )
        out.append(
            ("podagent_interlock_evaluations_total", [], float(self.steps), "Interlock engine evaluations.")
        )
        out.append(
            (
                "podagent_interlock_full_evaluations_total",
                [],
                float(self.full_steps),
                "Interlock engine evaluations of every rule and GPU (the rest are partial).",
            )
        )
        out.append(
            (
                "podagent_interlock_coalesced_batches_total",
                [],
                float(self.deferred_batches),
                "Input batches far from every threshold that waited to be evaluated with later ones.",
            )
        )
        hist = self.step_histogram
        name = "podagent_interlock_evaluation_duration_seconds"
        help_ = "Duration of one interlock engine evaluation."
        for bound, count in hist.cumulative():
            le = "+Inf" if math.isinf(bound) else repr(bound)
            out.append((f"{name}_bucket", [("le", le)], float(count), help_))
        out.append((f"{name}_sum", [], hist.sum, help_))
        out.append((f"{name}_count", [], float(hist.count), help_))
        failing = sum(1 for a in self.actuation.values() if a.failing_since is not None)
        out.append(
            (
                "podagent_actuation_failing_gpus",
                [],
                float(failing),
                "GPUs whose power limit could not be set.",
            )
        )
        return out


async def _failed_caps(batch: Mapping[str, float], error: str) -> dict[str, CapResult]:
    return {g: CapResult(None, error) for g in batch}


def config_hash(cfg: InterlockConfig) -> str:
    import hashlib

    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def _natural(name: str) -> tuple[str, int]:
    head = name.rstrip("0123456789")
    tail = name[len(head) :]
    return head, int(tail) if tail else -1


def inputs_from_pollers(agent: Agent, inventory: Inventory) -> tuple[list[str], dict[str, float]]:
    """The GPUs (in natural order) and every input's staleness limit, from the agent's pollers."""
    gpus: list[str] = []
    stale: dict[str, float] = {}
    for poller in agent.pollers.values():
        limit = poller.cfg.poll_interval_s * poller.cfg.stale_after_polls
        if poller.cfg.kind in ("nvml", "node"):  # type: ignore[attr-defined]
            # The GPUs found, and those the config says a node has: a node down at start has its
            # GPUs protected (sensor_stale) from the first step.
            entry = inventory.devices.get(poller.cfg.id)
            expected = set(entry.gpus) if entry is not None and entry.driver == "node" else set()
            for g in sorted(set(poller.sub_devices) | expected, key=_natural):
                gpus.append(g)
                stale[g] = limit
        else:
            stale[poller.cfg.id] = limit
    return gpus, stale


def topology_from_config(inventory: Inventory, gpus: Sequence[str], stale: Mapping[str, float]) -> Topology:
    """The engine's topology from the pod's inventory, limited to the GPUs actually found."""
    known = set(gpus)
    loops = {k: tuple(g for g in v if g in known) for k, v in inventory.loops.items()}
    alarms: dict[str, tuple[str, ...]] = {}
    cooled: dict[str, tuple[str, ...]] = {}
    for entry in inventory.devices.values():
        if entry.role not in COOLING_KINDS:
            continue
        found = tuple(m for m in ALARM_METRICS if entry.point(m) is not None)
        if found:
            alarms[entry.id] = found
            # A CDU cools its loop; a chiller's facility water reaches every loop (no map says which).
            cooled[entry.id] = loops.get(entry.id) or tuple(
                g for g in gpus if any(g in v for v in loops.values())
            )
    return Topology(
        gpus=tuple(gpus),
        loops=loops,
        pdus={k: tuple(g for g in v if g in known) for k, v in inventory.pdus.items()},
        pdu_rating_a=dict(inventory.pdu_rating_a),
        min_flow_lpm=dict(inventory.min_flow_lpm),
        stale_after_s=dict(stale),
        outlet_gpus={k: dict(v) for k, v in inventory.outlet_gpus.items()},
        alarm_metrics=alarms,
        cooled_gpus=cooled,
    )


COOLING_KINDS = frozenset({"cdu", "chiller"})
# A cooling device's own word that something is wrong (profile metrics): raised when non-zero.
ALARM_METRICS = ("tripped", "pump_fault", "alarms")


def build_service(config: AgentConfig) -> InterlockService | None:
    return InterlockService(config.interlocks) if config.interlocks.enabled else None


__all__ = ["Event", "InterlockService", "build_service", "topology_from_config"]
