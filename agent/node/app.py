"""The node agent: this server's GPUs through NVML, its local rules, the controller's leases.

One TaskGroup: the NVML poller (the controller's own ``Poller`` and ``NvmlDriver``), the safety
loop (the controller's interlock ``Engine`` on this server's GPUs, with the lease and the fail-safe
as external caps: the lowest cap wins) and the pod-network server. The safety loop runs on every
new NVML reading and at least once a second; it never waits on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import math
import os
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from agent import __version__
from agent.drivers.base import DriverError
from agent.drivers.nvml import NvmlDriver
from agent.drivers.smoothing import GpuSettingsAsk, GpuSettingsOutcome
from agent.events import Event
from agent.interlocks.engine import Engine, Topology
from agent.model import Reading
from agent.node.config import NodeConfig
from agent.node.lean import release_startup_memory
from agent.node.lease import LeaseState, Transition
from agent.node.protocol import ALWAYS_SENT, CapRequest
from agent.poller import Poller
from agent.sdnotify import Notifier
from agent.state import StateStore

log = structlog.get_logger("podagent.node")

CAP_TOLERANCE_W = 1.0  # NVML limits are whole mW; under a watt is the same limit
RETRY_S = 2.0


@dataclass
class NodeEvent:
    kind: str  # controller_lost, controller_back, interlock_trip, interlock_clear, cap_failed, rejected
    message: str
    ts_wall: float
    detail: dict[str, object]


class NodeAgent:
    def __init__(self, cfg: NodeConfig, *, key: bytes, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.key = key
        self.hostname = cfg.node.resolved_hostname()
        self.boot_id = os.urandom(6).hex()
        self.nvml_cfg = cfg.nvml.device()
        self.store = StateStore()
        self.driver = NvmlDriver(self.nvml_cfg)
        self.poller = Poller(self.nvml_cfg, self.driver, self.store)
        self.started = time.monotonic()
        self.lease = LeaseState(lost_after_s=cfg.controller_lost_after_s, started=self.started)
        self.engine: Engine | None = None
        self.gpus: list[str] = []  # local device ids gpu0.., in index order
        self.applied: dict[str, float] = {}  # GPU -> limit read back after our last set
        self.caps: dict[str, float] = {}  # GPU -> what the engine asks for now
        self.cap_reasons: dict[str, str] = {}
        self._failing: dict[str, tuple[float, str]] = {}  # GPU -> (next try, error)
        self.events: deque[NodeEvent] = deque(maxlen=256)
        self.counters: dict[str, int] = {"interlock_trips": 0, "cap_sets": 0, "cap_failures": 0}
        self.rejected: dict[str, int] = {}
        self.ready = asyncio.Event()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.notifier = notifier or Notifier()
        self.set_latency_s: deque[float] = deque(maxlen=4096)  # lease received -> NVML set read back
        self._nvml_read_mono = 0.0  # when the last NVML temperatures arrived
        # GPU settings the controller asked (op "settings"): the filler floors in force (W), and
        # the refusals already told (GPU, what, reason): a refusal is an event once, not a loop.
        self.filler_w: dict[str, float] = {}
        self._refusals: set[tuple[str, str, str]] = set()
        self._filler_release: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        from agent.node.server import NodeServer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._stop.set)
        if self.cfg.nvml.library == "hwsim":
            # The simulator's fake shows one simulated server's GPUs per process (as NVML on it).
            importlib.import_module("hwsim.nvml").set_server(self.cfg.nvml.hwsim_server)
        log.info("podagent node starting", version=__version__, node=self.cfg.node.id, host=self.hostname)
        server = NodeServer(self)
        unsubscribe = self.store.subscribe(self._on_batch)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.poller.run(), name="node.poll")
                await server.start()
                tg.create_task(self._safety_loop(), name="node.safety")
                stop = tg.create_task(self._stop.wait(), name="node.stop")
                await stop
                raise _Shutdown
        except* _Shutdown:
            pass
        finally:
            unsubscribe()
            await server.close()
            self.notifier.send("STOPPING=1")
            self.notifier.close()
            log.info("podagent node stopped", node=self.cfg.node.id)

    def stop(self) -> None:
        self._stop.set()

    def _on_batch(self, batch: Sequence[Reading]) -> None:
        if any(r.metric == "temp_c" for r in batch):
            self._nvml_read_mono = time.monotonic()
            self._wake.set()

    async def _fresh_readings(self) -> None:
        """Before answering a controller poll: one NVML read if the last is older than
        ``fresh_on_poll_s`` (the driver's errors stay in the store, as the schedule's do)."""
        limit = self.cfg.nvml.fresh_on_poll_s
        if time.monotonic() - self._nvml_read_mono <= limit:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poller.budget_s):
                await self.poller.poll_once()

    # ------------------------------------------------------------------ safety loop
    def _build_engine(self) -> Engine:
        self.gpus = sorted(self.poller.sub_devices, key=lambda d: int(d.removeprefix("gpu")))
        limit = self.nvml_cfg.poll_interval_s * self.nvml_cfg.stale_after_polls
        topo = Topology(
            gpus=tuple(self.gpus),
            loops={},
            pdus={},
            pdu_rating_a={},
            min_flow_lpm={},
            stale_after_s=dict.fromkeys(self.gpus, limit),
        )
        initial: dict[str, float] = {}
        for g in self.gpus:
            now_w = self.store.value(g, "power_limit_w")
            default = self.store.value(g, "default_power_limit_w")
            if now_w is None:
                continue
            self.applied[g] = now_w
            # Until the controller's first decision, every GPU keeps the limit it has now.
            self.lease.held[g] = now_w
            if default is not None and now_w < default - CAP_TOLERANCE_W:
                initial[g] = now_w
        if initial:
            self._event(
                "reconciled",
                f"{len(initial)} GPU(s) found capped at start; holding until the controller decides",
                caps_w={g: round(w, 1) for g, w in initial.items()},
            )
        return Engine(self.cfg.interlocks, topo, started=time.monotonic(), initial_limits=initial)

    async def _safety_loop(self) -> None:
        await self.poller.first_cycle.wait()
        while not self.poller.sub_devices:  # noqa: ASYNC110  (NVML not up yet: no GPUs to guard)
            await asyncio.sleep(self.nvml_cfg.poll_interval_s)
        self.engine = self._build_engine()
        log.info("node interlocks armed", gpus=len(self.gpus), mode=self.lease.mode)
        release_startup_memory()
        self.ready.set()
        self.notifier.send("READY=1")
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, self.cfg.controller_lost_after_s / 4)):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.step()
            except Exception:  # a bug here must not end the node's safety loop
                log.exception("node safety step failed", node=self.cfg.node.id)

    def failsafe_caps(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for g in self.gpus:
            lo, hi, default = (
                self.store.value(g, m)
                for m in ("min_power_limit_w", "max_power_limit_w", "default_power_limit_w")
            )
            if lo is None or hi is None or default is None:
                continue
            out[g] = max(lo, min(hi, default * self.cfg.failsafe_cap_pct / 100.0))
        return out

    async def step(self) -> dict[str, float]:
        """One evaluation and the NVML sets it needs, read back; returns the limits now."""
        engine = self.engine
        if engine is None:
            return {}
        async with self._lock:
            now = time.monotonic()
            transition = self.lease.update(now)
            if transition is not None:
                self._on_transition(transition)
            external = self.lease.external_caps(self.failsafe_caps())
            decision = engine.step(self.store.readings(), now, time.time(), external_caps=external)
            for ev in decision.events:
                self._engine_event(ev)
            self.caps = decision.caps
            self.cap_reasons = {g: why for g, (_, why) in external.items()}
            todo: dict[str, float] = {}
            for g, cap in decision.caps.items():
                have = self.applied.get(g)
                if have is not None and abs(have - cap) <= CAP_TOLERANCE_W / 2:
                    continue
                failing = self._failing.get(g)
                if failing is not None and now < failing[0]:
                    continue
                todo[g] = cap
            if todo:
                await self._set(todo)
            return dict(self.applied)

    async def _set(self, todo: Mapping[str, float]) -> None:
        try:
            results: Mapping[str, float | DriverError] = await self.driver.set_power_limits(todo)
        except (DriverError, TimeoutError) as err:
            reason = getattr(err, "reason", None) or "timed out"
            results = {g: DriverError(g, reason) for g in todo}
        now = time.monotonic()
        set_now: list[Reading] = []
        for g, cap in todo.items():
            outcome = results.get(g, DriverError(g, "no result"))
            if isinstance(outcome, DriverError):
                self.counters["cap_failures"] += 1
                before = self._failing.get(g)
                self._failing[g] = (now + RETRY_S, outcome.reason)
                if before is None or before[1] != outcome.reason:
                    self._event("cap_failed", f"{g}: could not set {cap:.0f} W: {outcome.reason}", gpu=g)
                continue
            if g in self._failing:
                del self._failing[g]
                self._event("cap_recovered", f"{g}: power limit set to {cap:.0f} W after failures", gpu=g)
            previous = self.applied.get(g)
            self.applied[g] = outcome
            self.counters["cap_sets"] += 1
            # The limit read back is the GPU's limit now: report it (the controller reconciles its
            # engine on it after a restart), not the last scheduled NVML read's value.
            set_now.append(Reading(g, "power_limit_w", outcome, "W"))
            log.info(
                "node cap applied",
                gpu=g,
                previous_w=None if previous is None else round(previous, 1),
                cap_w=round(cap, 1),
                readback_w=round(outcome, 1),
                by=self.cap_reasons.get(g, "interlock"),
                mode=self.lease.mode,
            )
        if set_now:
            self.store.update(set_now)

    # ------------------------------------------------------------------ leases (server side)
    async def on_request(self, req: CapRequest) -> dict[str, float]:
        """A valid request from the controller: take its lease; a ``caps`` request is applied now."""
        t0 = time.monotonic()
        gpus = self.lease_gpus()
        caps = None if req.caps is None else {f"gpu{i}": w for i, w in req.caps.items() if f"gpu{i}" in gpus}
        self.lease.accept(caps, expires_wall=req.expires_at_ms / 1000, now=t0, lease_id=req.lease_id)
        if req.op == "settings":
            return dict(self.applied)
        if req.op != "caps":
            if self.engine is not None:
                await self._fresh_readings()
            self._wake.set()
            return dict(self.applied)
        applied = await self.step()
        self.set_latency_s.append(time.monotonic() - t0)
        return applied

    async def on_settings(self, asks: Mapping[int, GpuSettingsAsk]) -> dict[str, dict[str, object]]:
        """The controller's GPU settings (smoothing, filler floor), applied and read back; per
        local index what the GPU did (the answer's ``settings``). A refusal (NOT_SUPPORTED on an
        H100) is answered every time it is asked and told as an event once."""
        gpus = self.lease_gpus()
        by_device = {f"gpu{i}": a for i, a in asks.items() if f"gpu{i}" in gpus}
        results = await self.driver.set_gpu_settings(by_device) if by_device else {}
        out: dict[str, dict[str, object]] = {}
        for index in asks:
            gpu = f"gpu{index}"
            result = results.get(gpu)
            if result is None:
                out[str(index)] = {"smoothing_error": "no such GPU on this node"}
                continue
            if result.filler_w is not None:
                self.filler_w[gpu] = result.filler_w
            failures = (
                ("smoothing", result.smoothing_error),
                ("filler", result.filler_error),
                ("workload_profile", result.workload_error),
            )
            for what, reason in failures:
                if reason is not None and (gpu, what, reason) not in self._refusals:
                    self._refusals.add((gpu, what, reason))
                    self._event(f"{what}_refused", f"{gpu}: {what} not set: {reason}", gpu=gpu, reason=reason)
            out[str(index)] = settings_json(result)
        return out

    async def _release_fillers(self) -> None:
        """The controller is gone: no filler floor burns power on its behalf (the GPUs' smoothing
        is the firmware's and stays; the fail-safe caps bound the draw anyway)."""
        on = {g: GpuSettingsAsk(filler_w=0.0) for g, w in self.filler_w.items() if w > 0.0}
        if not on:
            return
        results = await self.driver.set_gpu_settings(on)
        for gpu, result in results.items():
            if result.filler_w is not None:
                self.filler_w[gpu] = result.filler_w
        self._event("filler_released", f"filler floors off on {len(on)} GPU(s): controller lost")

    def lease_gpus(self) -> set[str]:
        return set(self.gpus) if self.gpus else set(self.poller.sub_devices)

    def on_rejected(self, reason: str, detail: str, peer: str) -> None:
        n = self.rejected.get(reason, 0) + 1
        self.rejected[reason] = n
        if n == 1:  # once per reason; the counter tells the rest
            self._event("rejected", f"refused a request ({reason}): {detail}", reason=reason, peer=peer)

    # ------------------------------------------------------------------ events
    def _on_transition(self, t: Transition) -> None:
        if t.mode == "failsafe":
            self._event(
                "controller_lost",
                f"no valid request from the controller for {t.silent_for_s:.1f} s: "
                f"fail-safe cap {self.cfg.failsafe_cap_pct:g}% on {len(self.gpus)} GPU(s)",
                silent_for_s=round(t.silent_for_s, 1),
            )
            if any(w > 0.0 for w in self.filler_w.values()):
                self._filler_release = asyncio.get_running_loop().create_task(
                    self._release_fillers(), name="node.filler_release"
                )
        elif t.previous == "failsafe":
            self._event("controller_back", "the controller is back: its leases take over (ramped)")
        elif t.mode == "controller":
            log.info("node under the controller", node=self.cfg.node.id)

    def _engine_event(self, ev: Event) -> None:
        if ev.kind == "interlock_trip":
            self.counters["interlock_trips"] += 1
        self.events.append(NodeEvent(ev.kind, ev.message, ev.ts_wall, dict(ev.detail)))
        log.warning(ev.message, kind=ev.kind, interlock=ev.detail.get("interlock"), gpu=ev.device)

    def _event(self, kind: str, message: str, **detail: object) -> None:
        self.events.append(NodeEvent(kind, message, time.time(), dict(detail)))
        level = log.info if kind in ("controller_back", "cap_recovered", "reconciled") else log.warning
        level(message, kind=kind, node=self.cfg.node.id, **detail)

    # ------------------------------------------------------------------ views
    def status_readings(self) -> dict[str, float]:
        """The node's own metrics (the controller stores them under the node's device id)."""
        mode: Literal["hold", "controller", "failsafe"] = self.lease.mode
        out = {
            "controller_lost": 1.0 if mode == "failsafe" else 0.0,
            "lease_hold": 1.0 if mode == "hold" else 0.0,
            "failsafe_entered_total": float(self.lease.failsafe_entered),
            "rejected_total": float(sum(self.rejected.values())),
            "interlock_trips_total": float(self.counters["interlock_trips"]),
            "cap_failures_total": float(self.counters["cap_failures"]),
            "stale_leases_total": float(self.lease.stale_leases),
            "uptime_s": time.monotonic() - self.started,
        }
        for reason, n in self.rejected.items():
            out[f"rejected_{reason}_total"] = float(n)
        return out

    def gpu_report(
        self,
        since: Mapping[tuple[str, str], tuple[object, ...]] | None = None,
        record: dict[tuple[str, str], tuple[object, ...]] | None = None,
    ) -> list[dict[str, object]]:
        """Every GPU's readings as [value, quality, error, age]. With ``since`` (what was sent
        last on this connection), only the readings that changed and those in ALWAYS_SENT, and no
        info; ``record`` gets what is sent."""
        now = time.monotonic()
        info = self.driver.device_info() if since is None else {}
        out: list[dict[str, object]] = []
        for g in self.gpus or sorted(self.poller.sub_devices):
            readings: dict[str, list[object]] = {}
            for metric, r in self.store.device_readings(g).items():
                value = r.value if r.value is None or math.isfinite(r.value) else None
                state = (value, r.quality, r.error)
                if since is not None and metric not in ALWAYS_SENT and since.get((g, metric)) == state:
                    continue
                if record is not None:
                    record[(g, metric)] = state
                readings[metric] = [value, str(r.quality), r.error, round(max(0.0, now - r.ts_mono), 4)]
            gpu: dict[str, object] = {
                "index": int(g.removeprefix("gpu")),
                "readings": readings,
                "applied_w": self.applied.get(g),
                "cap_w": self.caps.get(g),
                "by": self.cap_reasons.get(g),
                "filler_w": self.filler_w.get(g),
            }
            if since is None:
                gpu["info"] = info.get(g, {})
            out.append(gpu)
        return out


def settings_json(result: GpuSettingsOutcome) -> dict[str, object]:
    """One GPU's settings outcome as the answer carries it (agent/drivers/node.py reads it)."""
    rb = result.smoothing
    return {
        "smoothing": None
        if rb is None
        else {"enabled": rb.enabled, "profile": rb.profile, "floor_w": rb.floor_w},
        "smoothing_error": result.smoothing_error,
        "unsupported": result.unsupported,
        "filler_w": result.filler_w,
        "filler_error": result.filler_error,
        "workload": result.workload,
        "workload_error": result.workload_error,
        "workload_unsupported": result.workload_unsupported,
    }


class _Shutdown(Exception):
    pass


__all__ = ["NodeAgent"]
