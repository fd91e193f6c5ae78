"""PowerService: runs the power controller every control period inside the agent.

Reads the store (site meter, BMS, the pod's PDU sum, GPU power/util/limits), runs
``control_step`` and ``allocate``, commands the battery through its Modbus driver (never awaited by
the control loop: one write in flight, latest wins) and hands the per-GPU caps to the interlock
engine as a cap source (the lowest cap wins there, and it ramps releases).

The service uses what it is given (store, events, the point writer for the battery, the GPUs and
the fleet budget); ``run(agent)`` is the adapter that takes them from the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.actuators import ActuationError, GpuSettings, PointWriter
from agent.budget import FleetBudget, ramped_budget_w
from agent.config import AgentConfig
from agent.drivers.modbus import PointRole
from agent.drivers.smoothing import GpuSettingsAsk, GpuSettingsOutcome, SmoothingSettings, filler_unsupported
from agent.events import EventBus, Severity
from agent.inventory import Inventory
from agent.power.allocate import Allocation, GpuInput, allocate
from agent.power.config import Fallback, PowerConfig
from agent.power.contract import ContractMeter, report_metrics, report_status
from agent.power.control import (
    BatteryInput,
    Decision,
    Inputs,
    RampState,
    SoftFloorState,
    choose_smoothing,
    control_step,
    soft_floor_step,
)
from agent.power.curtail import CurtailOrder, CurtailRefused, CurtailRun
from agent.power.ridethrough import outage_pod_budget_w, stagger
from agent.state import POD_DEVICE, StateStore
from agent.statefile import read_json, write_atomic

if TYPE_CHECKING:
    from agent.app import Agent

log = structlog.get_logger(__name__)

CAP_REASON = "power_budget"
FILLER_DEADBAND_W = 10.0  # a filler floor moving less than this is not re-sent (floors move often)
CURTAIL_FILE = "curtail.json"
SETTINGS_RETRY_S = 10.0  # a GPU whose smoothing or filler set failed is asked again after this


class PowerService:
    def __init__(self, config: PowerConfig) -> None:
        self.config = config
        self.store: StateStore | None = None
        self.events: EventBus | None = None
        self.points: PointWriter | None = None
        self.inventory: Inventory | None = None  # the battery's points, bit names and modes
        self._gpu_ids: Callable[[], list[str]] = list
        self._fleet_budget: Callable[[], FleetBudget | None] = lambda: None
        self.ramp = RampState()
        self.caps: dict[str, float] = {}
        self.decision: Decision | None = None
        self.allocation: Allocation | None = None
        self.steps = 0
        self.last_step_mono: float | None = None
        self._last_grid: tuple[float, float] | None = None  # (mono, W)
        self.grid_ramp_w_per_s: float | None = None
        self.max_grid_ramp_w_per_s = 0.0
        self._write: asyncio.Task[None] | None = None
        self._written: dict[str, float] = {}
        self.battery_error: str | None = None
        self.interlocks_attached = False
        # The fleet budget in force, ramped (set_power_budget's ramp_w_per_s): W, or None.
        self.fleet_budget_w: float | None = None
        self._battery_faults = 0
        self._fleet_ramp: tuple[tuple[str, float], float | None, float] | None = None  # key, from, t0
        # Software fallback (no_battery_fallback = "soft_floor"): per-GPU filler floors for the
        # nodes (issue 12 applies them; floor_source is their hook).
        self.floors: dict[str, float] = {}
        self._floor_state = SoftFloorState()
        # GPU settings (actuators.GpuSettings): smoothing in force per GPU as read back (None: off,
        # set by us; absent: never touched), GPUs without smoothing (asked once), the filler floors
        # sent, failures being retried (GPU -> (retry at, reason)), the one batch in flight.
        self.gpu_settings: GpuSettings | None = None
        self.smoothing: dict[str, SmoothingSettings | None] = {}
        self.smoothing_profile: str | None = None
        self.smoothing_unsupported: set[str] = set()
        self.workload: dict[str, str | None] = {}  # workload power profile requested per GPU
        self.workload_unsupported: set[str] = set()
        self.filler_sent: dict[str, float] = {}
        # GPUs whose host has no filler backend (asked once): with any of them the soft floor
        # cannot hold the pod's ramp, so trough caps do (fallback_in_force); a reload asks again.
        self.filler_unsupported: set[str] = set()
        self._settings_failing: dict[str, tuple[float, str]] = {}
        self._settings_task: asyncio.Task[None] | None = None
        # The grid contract, measured live on the site meter (agent/power/contract.py).
        self.contract = (
            ContractMeter(config.grid_contract, 1.0 / config.control_period_s, config.grid_import_limit_w)
            if config.grid_contract is not None
            else None
        )
        # Fleet curtailment (MQTT ``curtail``): the order in force, and the last one finished.
        self.curtail: CurtailRun | None = None
        self.curtail_last: CurtailRun | None = None
        self._curtail_meter_ts: float | None = None
        self.curtail_file: Path | None = None  # state_dir/curtail.json: the order survives a restart
        # Ride-through: the grid event the meter/BMS report ("sag", "outage"), since when (mono);
        # re-energisation: when the grid came back (mono), the caps held then, the climbing limit.
        self.grid_event: str | None = None
        self._grid_event_since: float | None = None
        self._restored_at: float | None = None
        self._held_caps: dict[str, float] = {}
        self.restore_limit_w: float | None = None
        self.ride_through_budget_w: float | None = None
        self._aux_before_w: float | None = None

    def apply_config(self, config: AgentConfig, inventory: Inventory) -> None:
        """A reload's new [power] settings (validated already); the next period uses them."""
        self.inventory = inventory
        self.config = config.power
        self.filler_unsupported.clear()  # a burn kernel may have been installed meanwhile
        self.contract = (
            ContractMeter(
                config.power.grid_contract,
                1.0 / config.power.control_period_s,
                config.power.grid_import_limit_w,
            )
            if config.power.grid_contract is not None
            else None
        )
        self._written.clear()  # the battery (or its mode) may have changed: send everything again

    # ------------------------------------------------------------------ wiring
    async def run(self, agent: Agent) -> None:
        """The adapter: what the service uses, taken from the agent once it has polled."""
        agent.status_providers["power"] = self.status
        agent.metric_sources.append(self.metrics)
        agent.curtail_sink = self.accept_curtail
        await agent.ready.wait()
        agent.cap_sources.append(self.cap_source)
        self.interlocks_attached = agent.interlocks is not None
        if not self.interlocks_attached:
            log.warning("power budget: no interlock service; GPU caps will not be applied")

        def gpu_ids() -> list[str]:
            hosts = [p for p in agent.pollers.values() if p.cfg.kind in ("nvml", "node")]  # type: ignore[attr-defined]
            return sorted(g for p in hosts for g in p.sub_devices)

        await self.serve(
            agent.store,
            agent.events,
            agent.actuators.points,
            gpu_settings=agent.actuators.gpu_settings,
            state_dir=agent.config.paths.state_dir,
            inventory=agent.inventory,
            gpus=gpu_ids,
            fleet_budget=lambda: agent.fleet_budget,
        )

    async def serve(
        self,
        store: StateStore,
        events: EventBus,
        points: PointWriter,
        *,
        inventory: Inventory,
        gpus: Callable[[], list[str]],
        fleet_budget: Callable[[], FleetBudget | None],
        gpu_settings: GpuSettings | None = None,
        state_dir: Path | None = None,
    ) -> None:
        """Run the control period until cancelled."""
        self.store, self.events, self.points = store, events, points
        self.gpu_settings = gpu_settings
        if state_dir is not None:
            self.curtail_file = state_dir / CURTAIL_FILE
            self._resume_curtail(time.time())
        self.inventory = inventory
        self._gpu_ids, self._fleet_budget = gpus, fleet_budget
        period = self.config.control_period_s
        try:
            loop = asyncio.get_running_loop()
            next_at = loop.time()
            while True:
                self.step(time.monotonic(), time.time())
                next_at += period
                delay = next_at - loop.time()
                if delay < -period:  # far behind: re-anchor rather than burst
                    next_at, delay = loop.time(), 0.0
                await asyncio.sleep(max(delay, 0.0))
        finally:
            await self._release_battery()
            await self._release_gpu_settings()

    def cap_source(self) -> Mapping[str, tuple[float, str]]:
        return {g: (w, CAP_REASON) for g, w in self.caps.items()}

    def floor_source(self) -> Mapping[str, float]:
        """Filler floors (W) per GPU for the nodes to hold (software fallback); empty: none."""
        return dict(self.floors)

    # ------------------------------------------------------------------ the period
    def pod_limits(self, now_wall: float) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.config.site_limit_w is not None:
            out["site_limit"] = self.config.site_limit_w
        budget = self._fleet_budget()
        if budget is not None and budget.active(now_wall):
            out["fleet_budget"] = self.fleet_budget_w if self.fleet_budget_w is not None else budget.watts
        return out

    def _update_fleet_budget(self, now: float, now_wall: float) -> None:
        """Moves the fleet budget in force toward the last one set, at its ramp rate: from the
        budget in force before it, or, with none, from the pod's draw now."""
        assert self.store is not None
        budget = self._fleet_budget()
        if budget is None or not budget.active(now_wall):
            self.fleet_budget_w, self._fleet_ramp = None, None
            return
        key = (budget.id, budget.watts)
        if self._fleet_ramp is None or self._fleet_ramp[0] != key:
            start = self.fleet_budget_w
            if start is None:
                start = self.store.value(POD_DEVICE, "power_w", max_age_s=self.config.stale_after_s)
            self._fleet_ramp = (key, start, now)
        _, start, t0 = self._fleet_ramp
        self.fleet_budget_w = ramped_budget_w(budget.watts, budget.ramp_w_per_s, start, now - t0)

    def _gpus(self) -> dict[str, GpuInput]:
        assert self.store is not None
        store = self.store
        gpus: dict[str, GpuInput] = {}
        for g in self._gpu_ids():
            lo, hi = store.value(g, "min_power_limit_w"), store.value(g, "max_power_limit_w")
            default = store.value(g, "default_power_limit_w")
            if lo is None or hi is None or default is None:
                continue  # constraints unknown: nothing safe to ask for
            # The draw now where NVML gives it (power_w is a 1 s average on Ampere and later).
            power = store.value(g, "power_instant_w", max_age_s=self.config.stale_after_s)
            if power is None:
                power = store.value(g, "power_w")
            gpus[g] = GpuInput(lo, hi, default, power, store.value(g, "util_gpu_pct"))
        return gpus

    def _battery(self) -> BatteryInput | None:
        assert self.store is not None
        dev = self.config.battery
        if dev is None:
            return None
        age = self.config.stale_after_s
        v = {
            m: self.store.value(dev, m, max_age_s=age)
            for m in ("soc_pct", "power_w", "max_charge_w", "max_discharge_w", "faults")
        }
        if any(x is None for k, x in v.items() if k != "faults"):
            return None  # a battery we cannot see is treated as absent
        return BatteryInput(
            soc_pct=v["soc_pct"] or 0.0,
            power_w=v["power_w"] or 0.0,
            max_charge_w=v["max_charge_w"] or 0.0,
            max_discharge_w=v["max_discharge_w"] or 0.0,
            faults=int(v["faults"] or 0),
        )

    def _note_battery_faults(self, battery: BatteryInput | None) -> None:
        """A change of the BMS's fault bits is an event (the ramp then falls back on GPU caps)."""
        assert self.events is not None
        faults = battery.faults if battery is not None else self._battery_faults
        if faults == self._battery_faults:
            return
        # The fault bits' names are the profile's (generic-bms.toml `bits`).
        names = (
            []
            if self.inventory is None
            else self.inventory.bit_names(self.config.battery or "", "faults", faults)
        ) or ([f"0x{faults:x}"] if faults else [])
        if faults:
            self.events.emit(
                "battery_fault",
                Severity.WARNING,
                f"{self.config.battery}: BMS fault {', '.join(names)}; ramp limiting falls back on GPU caps",
                device=self.config.battery,
                detail={"faults": faults, "names": names},
            )
        else:
            self.events.emit(
                "battery_ok",
                Severity.INFO,
                f"{self.config.battery}: BMS faults cleared",
                device=self.config.battery,
                detail={"faults": 0},
            )
        self._battery_faults = faults

    def step(self, now: float, now_wall: float) -> Decision:
        assert self.store is not None
        cfg, store = self.config, self.store
        dt = cfg.control_period_s if self.last_step_mono is None else now - self.last_step_mono
        self.last_step_mono = now
        self._update_fleet_budget(now, now_wall)
        gpus = self._gpus()
        gpu_power = [g.power_w for g in gpus.values()]
        battery = self._battery()
        self._note_battery_faults(battery)
        grid = store.value(cfg.site_meter, "power_w", max_age_s=cfg.stale_after_s) if cfg.site_meter else None
        grid_limit = cfg.grid_import_limit_w
        curtail_w = self._curtail_step(now_wall, grid)
        if curtail_w is not None:
            grid_limit = curtail_w if grid_limit is None else min(grid_limit, curtail_w)
        pod_limits = self.pod_limits(now_wall)
        ride = self._ride_through_step(now, battery)
        if ride is not None:
            pod_limits["ride_through"] = ride
            grid_limit = 0.0  # the grid carries nothing; on return the limit climbs from here
        elif self.restore_limit_w is not None:
            grid_limit = self.restore_limit_w if grid_limit is None else min(grid_limit, self.restore_limit_w)
        inputs = Inputs(
            dt=dt,
            pod_power_w=store.value(POD_DEVICE, "power_w", max_age_s=cfg.stale_after_s),
            gpu_power_w=None if not gpu_power or None in gpu_power else sum(p or 0.0 for p in gpu_power),
            grid_w=grid,
            battery=battery,
            pod_limits=pod_limits,
            grid_limit_w=grid_limit,
        )
        decision = control_step(cfg, inputs, self.ramp, fallback=self.fallback_in_force)
        self.decision = decision
        self.allocation = allocate(
            decision.gpu_budget_w,
            gpus,
            previous=self.caps,
            hysteresis_w=cfg.hysteresis_w,
            idle_util_pct=cfg.idle_util_pct,
            idle_margin_w=cfg.idle_margin_w,
        )
        self.caps = self.allocation.caps
        if self._restored_at is not None and self._held_caps:
            self.caps = self._staggered(self.caps, now)
        no_battery = decision.discharge_avail_w == 0.0 and decision.charge_avail_w == 0.0
        if self.fallback_in_force == "soft_floor" and no_battery and cfg.ramp_limit_w_per_s is not None:
            draws = {g: x.power_w for g, x in gpus.items()}
            limits = {g: self.caps.get(g, x.default_w) for g, x in gpus.items()}
            self.floors = soft_floor_step(
                cfg, self._floor_state, now, dt, draws, limits, cfg.ramp_limit_w_per_s
            )
        else:
            self.floors = {}
        # GPUs whose firmware smooths need no filler (the soft floor is for the others).
        self.floors = {g: w for g, w in self.floors.items() if self.smoothing.get(g) is None}
        if self.gpu_settings is not None:
            self._plan_gpu_settings(gpus, battery_ok=not no_battery, now=now)
        if grid is not None:
            if self._last_grid is not None and now > self._last_grid[0]:
                self.grid_ramp_w_per_s = (grid - self._last_grid[1]) / (now - self._last_grid[0])
                self.max_grid_ramp_w_per_s = max(self.max_grid_ramp_w_per_s, abs(self.grid_ramp_w_per_s))
            self._last_grid = (now, grid)
        if self.contract is not None:
            self.contract.add(now, grid)  # a missing reading restarts the window
            self.contract.evaluate(now)
        if inputs.battery is not None:
            self._command_battery(decision)
        self.steps += 1
        return decision

    # ------------------------------------------------------------------ ride-through
    def _grid_status(self) -> str | None:
        """``"outage"`` or ``"sag"`` when the site meter or the BMS says so (their profiles' enum
        on ``grid_status``), else None (a device without the point says nothing)."""
        assert self.store is not None and self.inventory is not None
        found: set[str] = set()
        for dev in (self.config.site_meter, self.config.battery):
            if dev is None:
                continue
            raw = self.store.value(dev, "grid_status", max_age_s=self.config.stale_after_s)
            if raw is None:
                continue
            for name in ("outage", "sag"):
                if self.inventory.enum_value(dev, "grid_status", name) == int(raw):
                    found.add(name)
        return "outage" if "outage" in found else "sag" if "sag" in found else None

    def _restore_ramp(self) -> float | None:
        cfg, gc = self.config, self.config.grid_contract
        if cfg.restore_ramp_w_per_s is not None:
            return cfg.restore_ramp_w_per_s
        rates = [r for r in (gc.ramp_up_w_per_s if gc else None, cfg.ramp_limit_w_per_s) if r is not None]
        return min(rates) if rates else None

    def _ride_through_step(self, now: float, battery: BatteryInput | None) -> float | None:
        """The pod budget while the grid is out or sagging (None: it is not); on its return, moves
        the climbing grid limit (``restore_limit_w``) and says what happened as events."""
        assert self.store is not None and self.events is not None
        cfg, d = self.config, self.decision
        event = self._grid_status()
        if event is None and self.grid_event is None and d is not None and d.aux_w is not None:
            self._aux_before_w = d.aux_w  # cooling as measured on the grid (an outage hides it)
        if event != self.grid_event:
            self._grid_changed(event, now)
        if event is not None:
            dis = 0.0
            energy = 0.0
            if battery is not None and not battery.faults:
                dis = battery.max_discharge_w
                cap = self.store.value(cfg.battery or "", "capacity_wh", max_age_s=60.0)
                above = max(0.0, battery.soc_pct - cfg.soc_min_pct) / 100.0
                energy = cap * above if cap is not None else dis * cfg.ride_through_s / 3600.0
            # Cooling as last seen on the grid; an outage at start-up: as the battery carries it now.
            aux = self._aux_before_w if self._aux_before_w is not None else (d.aux_w if d else None)
            self.ride_through_budget_w = outage_pod_budget_w(
                dis, energy, cfg.ride_through_s, aux or 0.0, cfg.ride_through_margin_w
            )
            return self.ride_through_budget_w
        self.ride_through_budget_w = None
        if self._restored_at is not None:
            ramp = self._restore_ramp()
            since = now - self._restored_at
            servers = len(set(self._server_of().values()))
            stagger_done = since >= max(0, servers - 1) * cfg.restore_stagger_s
            site = d.site_load_w if d is not None else None
            if ramp is None:
                self.restore_limit_w = None
                limit_done = True
            else:
                self.restore_limit_w = ramp * since
                limit_done = site is not None and self.restore_limit_w >= site
            if limit_done:
                self.restore_limit_w = None
            if limit_done and stagger_done:
                self._restored_at, self._held_caps = None, {}
                self.events.emit(
                    "grid_reenergised",
                    Severity.INFO,
                    f"grid import back to the load at the ramp after {since:.1f} s",
                    device=cfg.site_meter,
                    detail={"after_s": round(since, 2), "ramp_w_per_s": ramp},
                )
        return None

    def _grid_changed(self, event: str | None, now: float) -> None:
        assert self.store is not None and self.events is not None
        was, since = self.grid_event, self._grid_event_since
        self.grid_event = event
        if event is not None:
            self._grid_event_since = now if was is None else since
            self._restored_at, self.restore_limit_w, self._held_caps = None, None, {}
            self.events.emit(
                f"grid_{event}",
                Severity.WARNING,
                f"grid {event}: the battery carries the site; GPUs held to what it can carry for "
                f"{self.config.ride_through_s:g} s",
                device=self.config.site_meter or self.config.battery,
                detail={"event": event, "was": was, "ride_through_s": self.config.ride_through_s},
            )
            return
        lasted = None if since is None else round(now - since, 2)
        self._grid_event_since = None
        self._restored_at = now
        self._held_caps = dict(self.caps)
        self.events.emit(
            "grid_restored",
            Severity.INFO,
            f"grid back after a {was} of {lasted} s: load returns at {self._restore_ramp() or 0:g} W/s, "
            f"one server every {self.config.restore_stagger_s:g} s",
            device=self.config.site_meter or self.config.battery,
            detail={"was": was, "lasted_s": lasted, "ramp_w_per_s": self._restore_ramp()},
        )

    def _server_of(self) -> dict[str, int]:
        """GPU -> its server's turn (servers: the devices that poll GPUs, in name order)."""
        assert self.store is not None and self.events is not None
        parents = {g: self.store.parent_of(g) for g in self._held_caps}
        order = {p: k for k, p in enumerate(sorted(set(parents.values())))}
        return {g: order[p] for g, p in parents.items()}

    def _staggered(self, caps: dict[str, float], now: float) -> dict[str, float]:
        assert self._restored_at is not None
        since = now - self._restored_at
        return stagger(caps, self._held_caps, self._server_of(), since, self.config.restore_stagger_s)

    # ------------------------------------------------------------------ curtailment
    def accept_curtail(self, order: CurtailOrder) -> None:
        """A validated fleet ``curtail`` order (agent/publish/commands.py); ``CurtailRefused`` with
        the reason when this pod cannot deliver it. A new order replaces the one in force."""
        assert self.store is not None and self.events is not None
        cfg = self.config
        if cfg.site_meter is None:
            raise CurtailRefused("no site meter in [power]: a curtailment could not be measured")
        grid = self.store.value(cfg.site_meter, "power_w", max_age_s=cfg.stale_after_s)
        if grid is None:
            raise CurtailRefused(f"the site meter {cfg.site_meter} has no fresh reading")
        floor = self._min_import_w()
        target = order.target_w if order.target_w is not None else (order.fraction or 0.0) * grid
        if floor is not None and target < floor:
            raise CurtailRefused(
                f"target {target:.0f} W is under what the site can go down to now ({floor:.0f} W: "
                "cooling, non-GPU load and every GPU at its minimum, less the battery's discharge)"
            )
        now = time.time()
        if self.curtail is not None and self.curtail.phase != "done":
            self._curtail_event("curtail_replaced", self.curtail, f"replaced by {order.id}")
        self.curtail = CurtailRun(order, accepted_wall=now)
        self._curtail_meter_ts = None
        self._curtail_event("curtail_accepted", self.curtail, f"target {target:.0f} W now")
        self._keep_curtail()

    def _keep_curtail(self) -> None:
        """The order in force to state_dir/curtail.json (removed when none): a controller restart
        resumes it. A disk that refuses is logged; the order still runs."""
        path = self.curtail_file
        if path is None:
            return
        try:
            if self.curtail is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, json.dumps(self.curtail.to_json(), allow_nan=False).encode())
        except (OSError, ValueError) as err:
            log.warning("curtail order not kept on disk", path=str(path), error=str(err))

    def _resume_curtail(self, now_wall: float) -> None:
        """At start: an order still in force is resumed; one that ended meanwhile is dropped."""
        assert self.events is not None
        path = self.curtail_file
        if path is None or not path.exists():
            return
        run = CurtailRun.from_json(read_json(path))
        if run is None:
            log.warning("curtail file is not an order; dropped", path=str(path))
            self._keep_curtail()
            return
        end = run.order.start_wall + run.order.duration_s
        if end <= now_wall:
            self.events.emit(
                "curtail_expired",
                Severity.INFO,
                f"curtailment {run.order.id}: ended {now_wall - end:.0f} s ago, while the agent was "
                "down; dropped",
                detail=run.status(),
            )
            self._keep_curtail()
            return
        self.curtail = run
        self._curtail_event("curtail_resumed", run, f"resumed after a restart, {end - now_wall:.0f} s left")

    def _min_import_w(self) -> float | None:
        """The lowest grid import the site can reach now, or None when it is not known."""
        d, gpus = self.decision, self._gpus()
        if d is None or d.site_load_w is None or d.aux_w is None or not gpus:
            return None
        pod = d.site_load_w - d.aux_w
        gpu_now = [g.power_w for g in gpus.values()]
        if None in gpu_now:
            return None
        non_gpu = max(0.0, pod - sum(p or 0.0 for p in gpu_now))
        return max(0.0, d.aux_w + non_gpu + sum(g.min_w for g in gpus.values()) - d.discharge_avail_w)

    def _curtail_step(self, now_wall: float, grid: float | None) -> float | None:
        """The order's grid import limit this period (None: none in force); measures it at the
        site meter (each new reading once, by its own time) and says what happened as events."""
        run = self.curtail
        if run is None:
            return None
        cfg = self.config
        gc = cfg.grid_contract
        ramp = gc.ramp_up_w_per_s if gc is not None and gc.ramp_up_w_per_s else cfg.ramp_limit_w_per_s
        site = self.decision.site_load_w if self.decision is not None else None
        release_at = cfg.grid_import_limit_w
        if release_at is None:
            known = [x for x in (site, run.import_at_start_w) if x is not None]
            release_at = max(known) if known else None
        before = run.phase
        limit = run.limit(now_wall, grid, ramp, release_at)
        if before != run.phase:
            if run.phase == "active":
                self._curtail_event("curtail_started", run, f"target {run.target_w or 0:.0f} W in force")
            elif run.phase == "releasing":
                self._curtail_event("curtail_released", run, f"released at {ramp or 0:.0f} W/s")
            elif run.phase == "done":
                self._curtail_event("curtail_done", run, "ended")
        what: str | None = None
        reading = (
            self.store.get(cfg.site_meter, "power_w") if self.store is not None and cfg.site_meter else None
        )
        if reading is not None and reading.ts_wall != self._curtail_meter_ts:
            self._curtail_meter_ts = reading.ts_wall
            what = run.measure(grid, reading.ts_wall if grid is not None else None)
            if what == "reached":
                after = run.reached_after_s or 0.0
                text = f"reached {run.grid_w or 0:.0f} W after {after:.2f} s"
                self._curtail_event("curtail_reached", run, text)
            elif what == "missed":
                self._curtail_event("curtail_missed", run, f"not reached within {run.order.deadline_s:g} s")
        if run.phase == "done":
            self.curtail_last, self.curtail = run, None
            self._keep_curtail()
        elif what == "reached" or (before != run.phase and run.phase == "active"):
            self._keep_curtail()  # the start's import (a fraction's base) and the reach survive too
        return limit

    def _curtail_event(self, kind: str, run: CurtailRun, what: str) -> None:
        assert self.store is not None and self.events is not None
        severity = Severity.WARNING if kind in ("curtail_missed", "curtail_replaced") else Severity.INFO
        self.events.emit(kind, severity, f"curtailment {run.order.id}: {what}", detail=run.status())

    # ------------------------------------------------------------------ GPU settings
    @property
    def fallback_in_force(self) -> Fallback:
        """How the ramp is held without a battery now: as configured, except that a soft floor
        needs filler work on every GPU it floors; one GPU whose host has no filler backend and the
        pod's ramp would be left to fillers that cannot run, so trough caps hold it instead."""
        if self.config.no_battery_fallback == "soft_floor" and self.filler_unsupported:
            return "trough_caps"
        return self.config.no_battery_fallback

    def _note_unfillable(self, unfillable: Mapping[str, str]) -> None:
        """GPUs found without a filler backend: never asked for a filler again; the first of them
        switches the soft floor to trough caps, told once (one event for the pod, not one per GPU)."""
        assert self.events is not None
        was = self.fallback_in_force
        self.filler_unsupported.update(unfillable)
        for gpu in unfillable:
            self._settings_failing.pop(gpu, None)
        if was == "soft_floor" and self.fallback_in_force == "trough_caps":
            reason = next(iter(unfillable.values()))
            log.warning(
                "soft floor unavailable; trough caps hold the ramp", gpus=len(unfillable), reason=reason
            )
            self.events.emit(
                "soft_floor_unavailable",
                Severity.WARNING,
                f"soft floor unavailable: {len(unfillable)} GPU(s) have no filler backend ({reason}); "
                "the grid ramp is held with GPU caps (trough_caps) instead",
                detail={
                    "configured": "soft_floor",
                    "in_force": "trough_caps",
                    "gpus": sorted(unfillable),
                    "reason": reason,
                },
            )

    def _plan_gpu_settings(self, gpus: Mapping[str, GpuInput], *, battery_ok: bool, now: float) -> None:
        """What each GPU should have now (smoothing from the contract and the battery; the filler
        floor), sent as one batch when it differs from what it has; one batch in flight."""
        if self._settings_task is not None and not self._settings_task.done():
            return
        tmp_w = [x.default_w for g, x in gpus.items() if g not in self.smoothing_unsupported]
        auto = self.config.gpu_smoothing == "auto" and bool(tmp_w)
        profile = choose_smoothing(self.config, battery_ok, tmp_w) if auto else None
        want = None if profile is None else profile.settings
        asks: dict[str, GpuSettingsAsk] = {}
        for g in gpus:
            failing = self._settings_failing.get(g)
            if failing is not None and now < failing[0]:
                continue
            set_sm = g not in self.smoothing_unsupported and (
                self.smoothing.get(g) != want if g in self.smoothing else want is not None
            )
            floor = 0.0 if g in self.filler_unsupported else self.floors.get(g, 0.0)
            filler = floor if abs(floor - self.filler_sent.get(g, 0.0)) > FILLER_DEADBAND_W else None
            if floor == 0.0 and self.filler_sent.get(g, 0.0) > 0.0:
                filler = 0.0
            # The workload profile goes with smoothing: asked while a profile is in force here.
            smooths = g not in self.smoothing_unsupported and want is not None
            workload = self.config.workload_power_profile if smooths else None
            set_wl = g not in self.workload_unsupported and (
                self.workload.get(g) != workload if g in self.workload else workload is not None
            )
            if set_sm or filler is not None or set_wl:
                asks[g] = GpuSettingsAsk(
                    set_sm, want if set_sm else None, filler, set_wl, workload if set_wl else None
                )
        if asks:
            name = None if profile is None else profile.name
            self._settings_task = asyncio.get_running_loop().create_task(
                self._send_gpu_settings(asks, name), name="power.gpu_settings"
            )

    async def _send_gpu_settings(self, asks: dict[str, GpuSettingsAsk], profile: str | None) -> None:
        """The batch through the actuator; what came back kept and told: one event per batch
        for smoothing set or released, one per GPU for a refusal (NOT_SUPPORTED: never asked
        again) and per failure streak."""
        assert self.gpu_settings is not None and self.events is not None
        try:
            results = await self.gpu_settings.apply(asks)
        except Exception as err:  # an actuator bug must not end the control loop's settings
            log.exception("gpu settings failed")
            results = {g: GpuSettingsOutcome(smoothing_error=repr(err)) for g in asks}
        now = time.monotonic()
        set_ok: list[str] = []
        released: list[str] = []
        unsupported: list[str] = []
        floors_w: list[float] = []
        wl_set: dict[str | None, list[str]] = {}
        wl_unsupported: list[str] = []
        unfillable: dict[str, str] = {}  # GPU -> why: its host has no filler backend
        for gpu, ask in asks.items():
            out = results.get(gpu, GpuSettingsOutcome(smoothing_error="no result"))
            if ask.set_smoothing:
                if out.unsupported:
                    self.smoothing_unsupported.add(gpu)
                    unsupported.append(gpu)
                elif out.smoothing_error is None:
                    self.smoothing[gpu] = ask.smoothing
                    (set_ok if ask.smoothing is not None else released).append(gpu)
                    if out.smoothing is not None and out.smoothing.floor_w is not None:
                        floors_w.append(out.smoothing.floor_w)
            if ask.filler_w is not None and out.filler_error is None:
                self.filler_sent[gpu] = out.filler_w if out.filler_w is not None else ask.filler_w
            no_filler = ask.filler_w is not None and filler_unsupported(out.filler_error)
            if no_filler and out.filler_error is not None:
                unfillable[gpu] = out.filler_error
            if ask.set_workload:
                if out.workload_unsupported:
                    self.workload_unsupported.add(gpu)
                    wl_unsupported.append(gpu)
                elif out.workload_error is None:
                    self.workload[gpu] = ask.workload_profile
                    wl_set.setdefault(ask.workload_profile, []).append(gpu)
            error = (
                (None if out.unsupported else out.smoothing_error)
                or (None if no_filler else out.filler_error)
                or (None if out.workload_unsupported else out.workload_error)
            )
            if error is not None:
                before = self._settings_failing.get(gpu)
                self._settings_failing[gpu] = (now + SETTINGS_RETRY_S, error)
                if before is None or before[1] != error:
                    self.events.emit(
                        "gpu_settings_failed",
                        Severity.WARNING,
                        f"{gpu}: GPU settings not applied: {error}",
                        device=gpu,
                        detail={
                            "smoothing": profile if ask.set_smoothing else None,
                            "filler_w": ask.filler_w,
                            "error": error,
                        },
                    )
            else:
                self._settings_failing.pop(gpu, None)
        if unfillable:
            self._note_unfillable(unfillable)
        if set_ok:
            self.smoothing_profile = profile
            floor = f", floor read back {min(floors_w):.0f}-{max(floors_w):.0f} W" if floors_w else ""
            sm = asks[set_ok[0]].smoothing
            self.events.emit(
                "gpu_smoothing_set",
                Severity.INFO,
                f"power smoothing {profile} on {len(set_ok)} GPU(s){floor}",
                detail={
                    "profile": profile,
                    "gpus": sorted(set_ok),
                    "settings": None
                    if sm is None
                    else {
                        "floor_pct": sm.floor_pct,
                        "ramp_up_w_per_s": sm.ramp_up_w_per_s,
                        "ramp_down_w_per_s": sm.ramp_down_w_per_s,
                        "hysteresis_ms": sm.hysteresis_ms,
                    },
                },
            )
        if released:
            self.events.emit(
                "gpu_smoothing_released",
                Severity.INFO,
                f"power smoothing off on {len(released)} GPU(s): not needed now",
                detail={"gpus": sorted(released)},
            )
        for name, gpus in wl_set.items():
            self.events.emit(
                "gpu_workload_profile_set",
                Severity.INFO,
                f"workload power profile {name or 'none'} on {len(gpus)} GPU(s)",
                detail={"profile": name, "gpus": sorted(gpus)},
            )
        if wl_unsupported:
            self.events.emit(
                "gpu_workload_profile_unsupported",
                Severity.INFO,
                f"{len(wl_unsupported)} GPU(s) have no workload power profiles (NOT_SUPPORTED)",
                detail={"gpus": sorted(wl_unsupported)},
            )
        if unsupported:
            self.events.emit(
                "gpu_smoothing_unsupported",
                Severity.INFO,
                f"{len(unsupported)} GPU(s) have no power smoothing (NOT_SUPPORTED); not asked again",
                detail={"gpus": sorted(unsupported)},
            )

    async def _release_gpu_settings(self) -> None:
        """On stop: smoothing off and filler floors to 0 where we set them (an agent that is not
        running must not leave a floor burning power or a profile nobody chose)."""
        if self.gpu_settings is None:
            return
        if self._settings_task is not None:
            self._settings_task.cancel()
            with contextlib.suppress(BaseException):
                await self._settings_task
        asks = {
            g: GpuSettingsAsk(
                set_smoothing=self.smoothing.get(g) is not None,
                filler_w=0.0 if self.filler_sent.get(g, 0.0) > 0.0 else None,
                set_workload=self.workload.get(g) is not None,
            )
            for g in set(self.smoothing) | set(self.filler_sent) | set(self.workload)
        }
        asks = {g: a for g, a in asks.items() if a.set_smoothing or a.filler_w is not None or a.set_workload}
        if not asks:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await self.gpu_settings.apply(asks)
        log.info("gpu settings released on stop", gpus=len(asks))

    # ------------------------------------------------------------------ battery
    def _point(self, role: PointRole) -> str:
        """The battery's writable point with this role (the profile's ``role``); check-config
        makes sure the [power] battery has them all."""
        found = None if self.inventory is None else self.inventory.writable(self.config.battery or "", role)
        return found or role

    def _mode(self, name: str) -> tuple[str, float]:
        """(mode point, raw value) selecting the inverter mode ``name`` (the profile's ``enum``)."""
        metric = self._point("mode")
        raw = (
            None
            if self.inventory is None
            else self.inventory.enum_value(self.config.battery or "", metric, name)
        )
        return metric, float("nan") if raw is None else float(raw)  # NaN: the point writer refuses it

    def _command_battery(self, d: Decision) -> None:
        if self._write is not None and not self._write.done():
            return  # one write in flight; the next period sends the latest value
        writes: list[tuple[str, float]] = []
        if self.config.battery_mode == "grid_target" and d.grid_target_w is not None:
            # Target first: the inverter must never hold a stale target in grid-target mode.
            writes.append((self._point("grid_target"), float(round(d.grid_target_w))))
            writes.append(self._mode("grid_target"))
        else:
            setpoint = d.battery_setpoint_w if self.config.battery_mode == "setpoint" else None
            writes.append((self._point("power_setpoint"), float(round(setpoint or 0.0))))
            writes.append(self._mode("power_setpoint"))
        writes = [(m, v) for m, v in writes if self._written.get(m) != v]
        if writes:
            self._write = asyncio.get_running_loop().create_task(self._send(writes), name="power.battery")

    async def _send(self, writes: list[tuple[str, float]]) -> None:
        """The battery's commands through the point writer (read back; a failure is its event)."""
        assert self.points is not None and self.config.battery is not None
        try:
            for metric, value in writes:
                await self.points.write(self.config.battery, metric, value, reason="power control")
                self._written[metric] = value
            self.battery_error = None
        except ActuationError as err:
            self.battery_error = err.reason
            self._written.clear()  # unknown state on the unit: send everything again

    async def _release_battery(self) -> None:
        """On stop: the battery back to an idle setpoint (a stale grid target must not linger)."""
        battery, points = self.config.battery, self.points
        if battery is None or points is None:
            return
        if self._write is not None:
            self._write.cancel()
            with contextlib.suppress(BaseException):
                await self._write
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await points.write(battery, self._point("power_setpoint"), 0.0, reason="agent stopping")
                await points.write(battery, *self._mode("power_setpoint"), reason="agent stopping")

    # ------------------------------------------------------------------ views
    def status(self) -> dict[str, Any]:
        d, a = self.decision, self.allocation
        bat = self._battery() if self.store is not None and self.config.battery else None

        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 1)

        return {
            "enabled": True,
            "steps": self.steps,
            "budget": {
                "pod_limits_w": self.pod_limits(time.time()),
                "grid_import_limit_w": self.config.grid_import_limit_w,
                "pod_budget_w": r(d.pod_budget_w) if d else None,
                "source": d.budget_source if d else None,
                # The fleet's last budget and, while ramping toward it, where the ramp stands.
                "fleet_target_w": r(fb.watts) if (fb := self._fleet_budget()) is not None else None,
                "fleet_in_force_w": r(self.fleet_budget_w),
            },
            "allocation": {
                "gpu_budget_w": r(d.gpu_budget_w) if d else None,
                "binding": bool(a and a.binding),
                "feasible": True if a is None else a.feasible,
                "capped_gpus": len(self.caps),
                "busy_gpus": a.busy if a else None,
                "idle_gpus": a.idle if a else None,
                "cap_min_w": r(min(self.caps.values())) if self.caps else None,
                "cap_max_w": r(max(self.caps.values())) if self.caps else None,
                "applied_by_interlocks": self.interlocks_attached,
                "soft_floor_gpus": len(self.floors),
                # trough_caps where soft_floor was configured but a GPU has no filler backend
                "no_battery_fallback": self.fallback_in_force,
                "soft_floor_max_w": r(max(self.floors.values())) if self.floors else None,
            },
            "gpu_smoothing": {
                "mode": self.config.gpu_smoothing,
                "profile": self.smoothing_profile
                if any(v is not None for v in self.smoothing.values())
                else None,
                "on_gpus": sum(1 for v in self.smoothing.values() if v is not None),
                "unsupported_gpus": len(self.smoothing_unsupported),
                "filler_gpus": sum(1 for w in self.filler_sent.values() if w > 0.0),
                "no_filler_backend_gpus": len(self.filler_unsupported),
                "workload_profile_gpus": sum(1 for w in self.workload.values() if w is not None),
                "failing_gpus": len(self._settings_failing),
            },
            "battery": None
            if bat is None
            else {
                "id": self.config.battery,
                "soc_pct": r(bat.soc_pct),
                "power_w": r(bat.power_w),
                "max_charge_w": r(bat.max_charge_w),
                "max_discharge_w": r(bat.max_discharge_w),
                "faults": bat.faults,
                "mode": self.config.battery_mode,
                "setpoint_w": r(d.battery_setpoint_w) if d else None,
                "error": self.battery_error,
            },
            "ramp": {
                "limit_w_per_s": self.config.ramp_limit_w_per_s,
                "site_load_w": r(d.site_load_w) if d else None,
                "aux_w": r(d.aux_w) if d else None,
                "grid_w": r(self._last_grid[1]) if self._last_grid else None,
                "grid_target_w": r(d.grid_target_w) if d else None,
                "grid_ramp_w_per_s": r(self.grid_ramp_w_per_s),
                "max_grid_ramp_w_per_s": r(self.max_grid_ramp_w_per_s),
            },
            "contract": None
            if self.contract is None
            else report_status(self.contract.report, self.contract.contract),
            "grid": {
                "event": self.grid_event,
                "ride_through_budget_w": r(self.ride_through_budget_w),
                "aux_before_w": r(self._aux_before_w),
                "restoring": self._restored_at is not None,
                "restore_limit_w": r(self.restore_limit_w),
            },
            "curtail": None if self.curtail is None else self.curtail.status(),
            "curtail_last": None if self.curtail_last is None else self.curtail_last.status(),
        }

    def metrics(self) -> list[tuple[str, list[tuple[str, str]], float, str]]:
        out: list[tuple[str, list[tuple[str, str]], float, str]] = []
        d = self.decision
        if d is None:
            return out

        def add(name: str, value: float | None, help_: str) -> None:
            if value is not None:
                out.append((name, [], float(value), help_))

        add(
            "podagent_pod_power_budget_watts",
            d.pod_budget_w,
            "The pod's IT power budget now (lowest source).",
        )
        add("podagent_pod_gpu_power_budget_watts", d.gpu_budget_w, "The budget left for the GPUs.")
        add("podagent_pod_grid_target_watts", d.grid_target_w, "The ramped grid import target.")
        add(
            "podagent_pod_battery_setpoint_watts",
            d.battery_setpoint_w,
            "Battery power asked (+ discharge).",
        )
        add("podagent_pod_grid_ramp_watts_per_second", self.grid_ramp_w_per_s, "Grid import rate of change.")
        add("podagent_pod_budget_capped_gpus", float(len(self.caps)), "GPUs capped by the power budget.")
        if self.contract is not None:
            out.extend(report_metrics(self.contract.report))
        run = self.curtail or self.curtail_last
        if run is not None:
            out.extend(curtail_metrics(run))
        return out


def curtail_metrics(run: CurtailRun) -> list[tuple[str, list[tuple[str, str]], float, str]]:
    """The order in force (or the last one): limit, target, delivered W, time to reach."""
    out: list[tuple[str, list[tuple[str, str]], float, str]] = []
    active = 1.0 if run.phase in ("active", "releasing") else 0.0
    out.append(("podagent_pod_curtail_active", [], active, "1 while a curtailment order is in force."))
    for name, value in (
        ("podagent_pod_curtail_limit_watts", run.limit_w),
        ("podagent_pod_curtail_target_watts", run.target_w),
        ("podagent_pod_curtail_delivered_watts", run.status()["delivered_w"]),
        ("podagent_pod_curtail_reached_seconds", run.reached_after_s),
    ):
        if isinstance(value, int | float):
            out.append((name, [], float(value), ""))
    return out


def build_service(config: AgentConfig) -> PowerService | None:
    power: PowerConfig | None = getattr(config, "power", None)
    return PowerService(power) if power is not None and power.enabled else None
