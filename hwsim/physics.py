"""The pod's thermal and electrical model: deterministic for a given seed and sequence of steps.

Model (numbers per pod live in hwsim/pods/*.toml; docs/hwsim.md explains the choices):
- GPU power = workload demand (a fraction of the default limit, per profile) clamped by the enforced
  power limit and by hardware thermal slowdown at the slowdown threshold.
- GPU die temperature is first-order: T -> T_coolant + P * R_eff with time constant tau. R_eff grows
  when coolant flow drops and, under the ``gpu-runaway`` fault, by 2x (a failing cold plate).
- Each CDU loop is one thermal mass: M dT_supply/dt = Q_in - Q_out. The CDU's valve holds the supply
  at its setpoint while its heat exchanger can (Q_out <= UA * flow_fraction * (T_return - T_facility)).
- Each chiller holds its facility water at setpoint up to its capacity; tripped, it removes nothing and
  the facility water warms with the heat the CDUs hand it.
- Server power = (GPU power + base) / PSU efficiency, split over the outlets that are on, over both
  feeds (A/B); a feed whose partner fails over carries everything. Phase current = sum of its outlets'
  power / (V * PF). Energy counters integrate.
First-order updates use the exact exponential step, so any tick length (``--speed``) stays stable.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from hwsim.podspec import PodSpec, WorkloadSpec
from hwsim.state import (
    BATTERY_MODE_GRID_TARGET,
    CDU_ALARM_FLOW_LOW,
    CDU_ALARM_LEAK,
    CDU_ALARM_LEVEL_LOW,
    CDU_ALARM_PUMP_FAULT,
    CDU_ALARM_SUPPLY_HIGH,
    CHILLER_ALARM_HIGH_TEMP,
    CHILLER_ALARM_TRIP,
    CLOCKS_EVENT_GPU_IDLE,
    CLOCKS_EVENT_HW_SLOWDOWN,
    CLOCKS_EVENT_HW_THERMAL,
    CLOCKS_EVENT_SW_POWER_CAP,
    GRID_NORMAL,
    GRID_OUTAGE,
    GRID_SAG,
    SAG_VOLTAGE_PCT,
    BatteryState,
    CduState,
    ChillerState,
    GpuSmoothingState,
    GpuState,
    OutletState,
    PduState,
    PhaseState,
    PodState,
    SiteMeterState,
    XidEvent,
)

WATER_CP_J_PER_KG_K = 4186.0
WATER_KG_PER_L = 1.0
MAX_SUBSTEP_S = 0.5  # coolant/thermal sub-step when the sim runs fast
RUNAWAY_R_FACTOR = 2.0
XID_RING = 1024


@dataclass
class _Server:
    index: int
    gpus: list[GpuState]
    loop: str
    feeds: list[tuple[PduState, list[OutletState]]] = field(default_factory=list)
    power_w: float = 0.0


@dataclass
class _Loop:
    cdu: CduState
    volume_l: float
    ua_w_per_k: float
    min_flow_lpm: float
    servers: list[_Server]
    chiller: ChillerState | None = None
    heat_in_w: float = 0.0


@dataclass
class _Facility:
    chiller: ChillerState
    volume_l: float
    loops: list[_Loop]


class Physics:
    """Owns a PodState and advances it. All mutation of the pod happens through here or the
    protocol servers' validated ``set_*`` calls on the state objects."""

    def __init__(self, spec: PodSpec, *, seed: int = 1) -> None:
        self.spec = spec
        self.seed = seed
        self.rng = random.Random(seed)
        self.workload: WorkloadSpec = spec.workload.model_copy()
        self.state = PodState(name=spec.name)
        self._servers: list[_Server] = []
        self._loops: dict[str, _Loop] = {}
        self._facilities: list[_Facility] = []
        self._meters: list[tuple[PduState, list[PduState]]] = []
        self._phase_offset: list[float] = []
        self._spike_until: list[float] = []
        # Faults that live in the physics (protocol faults are flags on the state objects).
        self.runaway: set[int] = set()
        self.overloaded_pdus: set[str] = set()
        self._xid_seq = 0
        # Per GPU (same index as state.gpus): power smoothing, filler floor, work done.
        self.smoothing: list[GpuSmoothingState] = []
        # Per GPU: (dt, W) of the last second of ticks and their energy, for NVML's 1 s average.
        self._power_window: list[deque[tuple[float, float]]] = []
        self._power_window_j: list[float] = []
        self._power_window_s: list[float] = []
        # Grid outage (ride-through): the battery carries the site; what it cannot is unserved
        # (a real site would trip or shed it). The site meter reads 0.
        self.grid_outage = False
        # Grid sag (voltage at SAG_VOLTAGE_PCT): the inverter rides through, carrying the site as on
        # an outage; the grid still supplies what the battery cannot (the meter reads it).
        self.grid_sag = False
        self.unserved_w = 0.0
        self.unserved_j = 0.0
        self._build()

    # ----------------------------------------------------------------- construction
    def _build(self) -> None:
        spec = self.spec
        g = spec.gpu
        loop_of_server: dict[int, str] = {}
        for c in spec.cdu:
            for s in c.servers:
                loop_of_server[s] = c.id
        index = 0
        for s in range(spec.servers.count):
            gpus: list[GpuState] = []
            for slot in range(spec.servers.gpus_per_server):
                gpus.append(
                    GpuState(
                        index=index,
                        uuid=_uuid(self.seed, index),
                        name=g.name,
                        pci_bus_id=f"00000000:{(s % 256):02X}:{slot:02X}.0",
                        serial=f"16{self.seed % 100:02d}{index:08d}",
                        server=s,
                        loop=loop_of_server.get(s, ""),
                        default_limit_w=g.default_limit_w,
                        min_limit_w=g.min_limit_w,
                        max_limit_w=g.max_limit_w,
                        power_limit_w=g.default_limit_w,
                        enforced_limit_w=g.default_limit_w,
                        mem_total_bytes=g.memory_gib * 1024**3,
                    )
                )
                index += 1
            self.state.gpus.extend(gpus)
            self._servers.append(_Server(index=s, gpus=gpus, loop=loop_of_server.get(s, "")))
        for _ in self.state.gpus:
            self._phase_offset.append(self.rng.uniform(0.0, 1.0))
            self._spike_until.append(-1.0)
            self.smoothing.append(GpuSmoothingState(supported=g.power_smoothing))
            self._power_window.append(deque())
            self._power_window_j.append(0.0)
            self._power_window_s.append(0.0)

        for p in spec.pdu:
            phases = [PhaseState(index=i, voltage_v=p.voltage_v) for i in (1, 2, 3)]
            outlets = [
                OutletState(index=o, name=f"{p.id}-outlet-{o}", phase=(o - 1) % 3 + 1)
                for o in range(1, p.outlets + 1)
            ]
            pdu = PduState(
                id=p.id,
                vendor=p.vendor,
                model=p.model,
                rating_a=p.rating_a,
                phases=phases,
                outlets=outlets,
                power_factor=p.power_factor,
            )
            self.state.pdus.append(pdu)
            per = spec.servers.outlets_per_feed
            for k, s in enumerate(p.servers):
                mine = outlets[k * per : (k + 1) * per]
                for o in mine:
                    o.server = s
                    o.name = f"server{s}-psu{o.index}"
                self._servers[s].feeds.append((pdu, mine))
        by_id = {p.id: p for p in self.state.pdus}
        for p in spec.pdu:
            if p.measures:
                self._meters.append((by_id[p.id], [by_id[m] for m in p.measures]))
                for o, m in zip(by_id[p.id].outlets, p.measures, strict=False):
                    o.name = f"feed-{m}"

        for c in spec.cdu:
            cdu = CduState(
                id=c.id,
                setpoint_c=c.setpoint_c,
                supply_temp_c=c.setpoint_c,
                return_temp_c=c.setpoint_c,
                nominal_flow_lpm=c.nominal_flow_lpm,
                flow_lpm=c.nominal_flow_lpm,
            )
            self.state.cdus.append(cdu)
            self._loops[c.id] = _Loop(
                cdu=cdu,
                volume_l=c.loop_volume_l,
                ua_w_per_k=c.ua_kw_per_k * 1000.0,
                min_flow_lpm=c.min_flow_lpm if c.min_flow_lpm is not None else 0.5 * c.nominal_flow_lpm,
                servers=[self._servers[s] for s in c.servers],
            )
        for ch in spec.chiller:
            chiller = ChillerState(
                id=ch.id,
                setpoint_c=ch.setpoint_c,
                supply_temp_c=ch.setpoint_c,
                return_temp_c=ch.setpoint_c,
                capacity_kw=ch.capacity_kw,
            )
            self.state.chillers.append(chiller)
            loops = [self._loops[c] for c in ch.cdus]
            for loop in loops:
                loop.chiller = chiller
                loop.cdu.facility_supply_temp_c = ch.setpoint_c
            self._facilities.append(_Facility(chiller=chiller, volume_l=ch.water_volume_l, loops=loops))
        self._chiller_power = {ch.id: (ch.cop, ch.fixed_kw * 1000.0) for ch in spec.chiller}
        if spec.battery is not None:
            b = spec.battery
            self.state.battery = BatteryState(
                id=b.id,
                capacity_wh=b.capacity_kwh * 1000.0,
                rated_charge_w=b.max_charge_kw * 1000.0,
                rated_discharge_w=b.max_discharge_kw * 1000.0,
                soc_pct=b.soc_pct,
                soc_min_pct=b.soc_min_pct,
                soc_max_pct=b.soc_max_pct,
                efficiency=b.efficiency,
            )
        if spec.site_meter is not None:
            self.state.site_meter = SiteMeterState(id=spec.site_meter.id)
        # Start near steady state at the workload's mean, so a test does not wait for warm-up.
        for gpu in self.state.gpus:
            loop = self._loops.get(gpu.loop)
            coolant = loop.cdu.supply_temp_c if loop else 30.0
            gpu.temp_c = coolant + 0.6 * g.default_limit_w * g.r_c_per_w
        # One short step so that server power (and so every PDU, meter and loop figure) is real
        # before the first poll: a PDU read right after start must not say 0 W.
        self.step(0.001)
        self._site(0.0)

    # ----------------------------------------------------------------- faults and commands
    def partner_of(self, pdu_id: str) -> str | None:
        for p in self.spec.pdu:
            if p.id == pdu_id:
                return p.partner
        return None

    def add_xid(self, gpu_index: int, xid: int) -> None:
        self._xid_seq += 1
        self.state.xid_events.append(XidEvent(gpu_index=gpu_index, xid=xid, seq=self._xid_seq))
        if len(self.state.xid_events) > XID_RING:
            del self.state.xid_events[: len(self.state.xid_events) - XID_RING]

    def set_power_limit(self, gpu_index: int, watts: float) -> None:
        """Apply an NVML power-limit set (the fake validated the range; clamp anyway)."""
        gpu = self.state.gpus[gpu_index]
        gpu.power_limit_w = min(max(watts, gpu.min_limit_w), gpu.max_limit_w)
        gpu.enforced_limit_w = gpu.power_limit_w

    def set_power_smoothing(
        self,
        gpu_index: int,
        *,
        enabled: bool | None = None,
        floor_pct: float | None = None,
        ramp_up_w_per_s: float | None = None,
        ramp_down_w_per_s: float | None = None,
        hysteresis_ms: float | None = None,
    ) -> None:
        """NVIDIA power smoothing on one GPU (what nvmlDevicePowerSmoothing* would set).
        ValueError: not supported on this GPU (H100) or a value out of range."""
        sm = self.smoothing[gpu_index]
        if not sm.supported:
            raise ValueError("power smoothing not supported on this GPU")
        if floor_pct is not None and not 0.0 <= floor_pct <= 100.0:
            raise ValueError("floor_pct must be 0..100")
        for rate in (ramp_up_w_per_s, ramp_down_w_per_s):
            if rate is not None and not rate > 0.0:
                raise ValueError("ramp rates must be > 0 W/s")
        if hysteresis_ms is not None and not 0.0 <= hysteresis_ms <= 60_000.0:
            raise ValueError("hysteresis_ms must be 0..60000")
        if enabled is not None:
            sm.enabled = enabled
        if floor_pct is not None:
            sm.floor_pct = floor_pct
        if ramp_up_w_per_s is not None:
            sm.ramp_up_w_per_s = ramp_up_w_per_s
        if ramp_down_w_per_s is not None:
            sm.ramp_down_w_per_s = ramp_down_w_per_s
        if hysteresis_ms is not None:
            sm.hysteresis_ms = hysteresis_ms

    def smoothing_request(self, gpu_index: int, op: int, profile: int, param: int, value: float) -> None:
        """One NVML smoothing call taken from the fake (already validated there): 1 SetState
        (value 0/1), 2 ActivatePresetProfile, 3 UpdatePresetProfileParam; 4 the filler floor (W;
        not NVML, any GPU); 5/6 workload power profiles set / cleared (value: the mask). The
        active preset's floor / ramps / hysteresis are what the physics applies. ValueError: not
        supported."""
        if op == 4:  # the filler floor (not NVML; any GPU model): hwsim.nvml.podagentSetFillerFloor
            self.set_soft_floor(gpu_index, value)
            return
        sm = self.smoothing[gpu_index]
        if not sm.supported:
            raise ValueError("power smoothing not supported on this GPU")
        if op in (5, 6):  # workload power profiles: set / clear requested bits (no effect modelled)
            mask = int(value)
            sm.workload_mask = sm.workload_mask | mask if op == 5 else sm.workload_mask & ~mask
            return
        if not 0 <= profile < len(sm.presets):
            raise ValueError(f"profile {profile} out of range")
        if op == 1:
            sm.enabled = bool(value)
        elif op == 2:
            sm.profile = profile
        elif op == 3:
            if not 0 <= param < len(sm.presets[profile]):
                raise ValueError(f"param {param} out of range")
            sm.presets[profile][param] = float(value)
        else:
            raise ValueError(f"unknown smoothing op {op}")
        floor, up, down, hyst = sm.presets[sm.profile][:4]
        self.set_power_smoothing(
            gpu_index,
            floor_pct=floor,
            ramp_up_w_per_s=up if up > 0 else None,
            ramp_down_w_per_s=down if down > 0 else None,
            hysteresis_ms=hyst,
        )

    def set_soft_floor(self, gpu_index: int, watts: float) -> None:
        """The software fallback's filler floor on one GPU (0: off); any GPU model."""
        if not math.isfinite(watts) or watts < 0.0:
            raise ValueError("soft floor must be a finite W >= 0")
        self.smoothing[gpu_index].soft_floor_w = watts

    def work_done_s(self) -> float:
        """Seconds of full-speed progress, summed over the GPUs (a synchronized job moves at its
        slowest GPU's pace; with equal caps that is the same figure)."""
        return sum(sm.work_s for sm in self.smoothing)

    # ----------------------------------------------------------------- time
    def step(self, dt: float) -> None:
        """Advance the pod by dt seconds of simulated time."""
        remaining = dt
        while remaining > 1e-9:
            h = min(remaining, MAX_SUBSTEP_S)
            self._substep(h)
            remaining -= h

    def _substep(self, dt: float) -> None:
        self.state.sim_time_s += dt
        t = self.state.sim_time_s
        g = self.spec.gpu
        for loop in self._loops.values():
            self._update_pump(loop, dt)
        alpha = 1.0 - math.exp(-dt / g.tau_s)
        for server in self._servers:
            powered = any(o.on for _, outs in server.feeds for o in outs) or not server.feeds
            loop = self._loops.get(server.loop)
            coolant = loop.cdu.supply_temp_c if loop else 30.0
            flow_frac = (loop.cdu.flow_lpm / loop.cdu.nominal_flow_lpm) if loop else 1.0
            r_flow = 1.0 + 2.0 * max(0.0, 1.0 - flow_frac)
            gpu_sum = 0.0
            for gpu in server.gpus:
                self._update_gpu(gpu, t, dt, powered, coolant, r_flow, alpha)
                gpu_sum += gpu.power_w
            server.power_w = (
                (gpu_sum + self.spec.servers.base_w) / self.spec.servers.psu_efficiency if powered else 0.0
            )
        for loop in self._loops.values():
            self._update_loop(loop, dt)
        for fac in self._facilities:
            self._update_facility(fac, dt)
        self._electrical(dt)
        self._site(dt)

    def _demand_fraction(self, i: int, t: float) -> float:
        w = self.workload
        if w.profile == "idle":
            return 0.0
        if w.profile == "steady":
            base = w.level
        else:
            # training: compute (high) for duty*period, then communication (low); "synchronized" has
            # every GPU step together (the grid's worst case), "training" gives each GPU a phase offset.
            offset = 0.0 if w.profile == "synchronized" else self._phase_offset[i]
            tc = t
            if w.checkpoint_every > 0:
                # Every K steps the job pauses to write a checkpoint: a long low-power stretch.
                steps_s = w.checkpoint_every * w.period_s
                tc = t % (steps_s + w.checkpoint_s)
            if w.checkpoint_every > 0 and tc >= w.checkpoint_every * w.period_s:
                base = w.checkpoint_level
            else:
                phase = (tc / w.period_s + offset) % 1.0
                base = w.high if phase < w.duty else w.low
        if w.spike_per_s > 0.0:
            if t < self._spike_until[i]:
                base += w.spike
            elif self.rng.random() < w.spike_per_s * self.spec.tick_s:
                self._spike_until[i] = t + 0.3
        return base

    def _update_gpu(
        self, gpu: GpuState, t: float, dt: float, powered: bool, coolant: float, r_flow: float, alpha: float
    ) -> None:
        g = self.spec.gpu
        if not powered:
            gpu.power_w = 0.0
            self._average_power(gpu, dt)
            gpu.util_gpu_pct = 0.0
            gpu.util_mem_pct = 0.0
            gpu.temp_c += (coolant - gpu.temp_c) * alpha
            return
        frac = self._demand_fraction(gpu.index, t)
        demand = g.idle_w + max(0.0, frac) * (g.default_limit_w - g.idle_w)
        reasons = 0
        power = demand
        if power > gpu.enforced_limit_w:
            power = gpu.enforced_limit_w
            reasons |= CLOCKS_EVENT_SW_POWER_CAP
        if gpu.temp_c >= gpu.temp_slowdown_c:
            # Hardware thermal slowdown: clocks drop hard, like a real GPU at its slowdown threshold.
            power = min(power, max(g.idle_w, 0.7 * power))
            reasons |= CLOCKS_EVENT_HW_SLOWDOWN | CLOCKS_EVENT_HW_THERMAL
        if frac <= 0.01:
            reasons |= CLOCKS_EVENT_GPU_IDLE
        sm = self.smoothing[gpu.index]
        useful, power = self._smooth(gpu, sm, power, t, dt)
        sm.demand_w, sm.useful_w = demand, useful
        if demand > 0.0:
            sm.work_s += dt * min(1.0, useful / demand)
        gpu.power_w = power
        self._average_power(gpu, dt)
        gpu.clocks_event_reasons = reasons
        gpu.energy_j += power * dt
        gpu.util_gpu_pct = min(100.0, 100.0 * frac)
        gpu.util_mem_pct = min(100.0, 60.0 * frac)
        gpu.mem_used_bytes = int(gpu.mem_total_bytes * (0.85 if frac > 0.05 else 0.01))
        # Clocks scale roughly with the cube root of the power the GPU may draw vs. what it wants.
        ratio = min(1.0, useful / demand) if demand > 0 else 1.0
        gpu.clock_sm_mhz = round(gpu.clock_sm_max_mhz * ratio ** (1 / 3)) if frac > 0.01 else 345.0
        r = g.r_c_per_w * r_flow * (RUNAWAY_R_FACTOR if gpu.index in self.runaway else 1.0)
        target = coolant + power * r
        gpu.temp_c += (target - gpu.temp_c) * alpha

    def _average_power(self, gpu: GpuState, dt: float) -> None:
        """``power_avg_w``: the draw averaged over the last second of ticks (a boxcar, as the
        1 s average nvmlDeviceGetPowerUsage reports on Ampere and later)."""
        window = self._power_window[gpu.index]
        window.append((dt, gpu.power_w))
        i = gpu.index
        self._power_window_j[i] += dt * gpu.power_w
        span = self._power_window_s[i] + dt
        while len(window) > 1 and span - window[0][0] >= 1.0 - 1e-9:
            d, w = window.popleft()
            span -= d
            self._power_window_j[i] -= d * w
        self._power_window_s[i] = span
        gpu.power_avg_w = max(0.0, self._power_window_j[i] / span) if span > 0 else gpu.power_w

    @staticmethod
    def _smooth(
        gpu: GpuState, sm: GpuSmoothingState, power: float, t: float, dt: float
    ) -> tuple[float, float]:
        """(power the job gets, power drawn) after the filler floor and the GPU's power smoothing.
        Firmware smoothing (GB200-class): the draw never falls below floor_pct of TMP, rises at
        most ramp_up W/s (the job gets less meanwhile: slower), and a fall waits hysteresis_ms then
        goes down at most ramp_down W/s (the excess is burnt). Neither floor exceeds the enforced
        limit. Work only comes from what the phase wanted."""
        useful = power
        drawn = power
        if sm.soft_floor_w > 0.0:
            drawn = max(drawn, min(sm.soft_floor_w, gpu.enforced_limit_w))
        if sm.enabled:
            floor = min(sm.floor_pct / 100.0 * gpu.default_limit_w, gpu.enforced_limit_w)
            target = max(drawn, floor)
            prev = gpu.power_w
            if target > prev:
                drawn = min(target, prev + sm.ramp_up_w_per_s * dt)
                useful = min(useful, drawn)
                sm.fall_since_s = None
            elif target < prev:
                if sm.fall_since_s is None:
                    sm.fall_since_s = t - dt
                if (t - sm.fall_since_s) * 1000.0 < sm.hysteresis_ms:
                    drawn = prev
                else:
                    drawn = max(target, prev - sm.ramp_down_w_per_s * dt)
                drawn = min(drawn, gpu.enforced_limit_w)  # a lowered cap applies at once
            else:
                drawn = target
                sm.fall_since_s = None
        return useful, drawn

    def _update_pump(self, loop: _Loop, dt: float) -> None:
        cdu = loop.cdu
        running = cdu.pump_running and not cdu.pump_fault
        target = cdu.nominal_flow_lpm * cdu.pump_speed_pct / 80.0 if running else 0.0
        # Pump spin-up/down: ~2 s time constant.
        cdu.flow_lpm += (target - cdu.flow_lpm) * (1.0 - math.exp(-dt / 2.0))
        frac = cdu.flow_lpm / cdu.nominal_flow_lpm
        cdu.supply_pressure_kpa = 120.0 + 180.0 * frac * frac
        cdu.return_pressure_kpa = 120.0 + 40.0 * frac * frac
        if cdu.leak:
            cdu.reservoir_level_pct = max(0.0, cdu.reservoir_level_pct - 0.5 * dt)

    def _update_loop(self, loop: _Loop, dt: float) -> None:
        cdu = loop.cdu
        liquid_share = self.spec.servers.base_heat_to_liquid
        q_in = 0.0
        for server in loop.servers:
            gpu_w = sum(gp.power_w for gp in server.gpus)
            q_in += gpu_w + (liquid_share * self.spec.servers.base_w if server.power_w > 0 else 0.0)
        loop.heat_in_w = q_in
        mass_flow = cdu.flow_lpm / 60.0 * WATER_KG_PER_L
        # With (almost) no flow the return sensor sees the loop, not a transport delay.
        dt_loop = q_in / (max(mass_flow, 0.05) * WATER_CP_J_PER_KG_K)
        cdu.return_temp_c = cdu.supply_temp_c + min(dt_loop, 25.0)
        facility = loop.chiller.supply_temp_c if loop.chiller else cdu.facility_supply_temp_c
        cdu.facility_supply_temp_c = facility
        heat_cap = WATER_CP_J_PER_KG_K * WATER_KG_PER_L * loop.volume_l
        flow_frac = min(1.0, cdu.flow_lpm / cdu.nominal_flow_lpm)
        q_max = max(0.0, loop.ua_w_per_k * flow_frac * (cdu.return_temp_c - facility))
        # The valve aims to bring the supply back to setpoint in ~10 s.
        q_want = q_in + heat_cap * (cdu.supply_temp_c - cdu.setpoint_c) / 10.0
        q_out = min(max(q_want, 0.0), q_max)
        cdu.supply_temp_c += (q_in - q_out) * dt / heat_cap
        cdu.heat_removed_kw = q_out / 1000.0
        cdu.facility_return_temp_c = facility + (q_out / 1000.0) / max(loop.ua_w_per_k / 1000.0, 1e-6)
        alarms = 0
        if cdu.pump_fault:
            alarms |= CDU_ALARM_PUMP_FAULT
        if cdu.leak:
            alarms |= CDU_ALARM_LEAK
        if cdu.supply_temp_c >= cdu.setpoint_c + 8.0:
            alarms |= CDU_ALARM_SUPPLY_HIGH
        if cdu.flow_lpm < loop.min_flow_lpm:
            alarms |= CDU_ALARM_FLOW_LOW
        if cdu.reservoir_level_pct < 50.0:
            alarms |= CDU_ALARM_LEVEL_LOW
        cdu.alarms = alarms

    def _update_facility(self, fac: _Facility, dt: float) -> None:
        ch = fac.chiller
        q_in = sum(loop.cdu.heat_removed_kw * 1000.0 for loop in fac.loops)
        heat_cap = WATER_CP_J_PER_KG_K * WATER_KG_PER_L * fac.volume_l
        ch.running = not ch.tripped
        if ch.running:
            q_want = q_in + heat_cap * (ch.supply_temp_c - ch.setpoint_c) / 10.0
            q_out = min(max(q_want, 0.0), ch.capacity_kw * 1000.0)
        else:
            q_out = 0.0
        ch.supply_temp_c += (q_in - q_out) * dt / heat_cap
        ch.load_kw = q_out / 1000.0
        ch.compressor_pct = min(100.0, 100.0 * q_out / (ch.capacity_kw * 1000.0))
        ch.return_temp_c = ch.supply_temp_c + q_in / 1000.0 / max(ch.capacity_kw / 10.0, 1e-6)
        alarms = CHILLER_ALARM_TRIP if ch.tripped else 0
        if ch.supply_temp_c > ch.setpoint_c + 5.0:
            alarms |= CHILLER_ALARM_HIGH_TEMP
        ch.alarms = alarms
        cop, fixed_w = self._chiller_power.get(ch.id, (4.5, 1000.0))
        ch.power_w = (fixed_w + q_out / cop) if ch.running else 0.0

    def _electrical(self, dt: float) -> None:
        for pdu in self.state.pdus:
            for o in pdu.outlets:
                o.power_w = 0.0
        for server in self._servers:
            feeds = [(pdu, [o for o in outs if o.on]) for pdu, outs in server.feeds]
            # A/B failover: an overloaded PDU carries its partner's share too.
            weights = []
            for pdu, outs in feeds:
                partner = self.partner_of(pdu.id)
                if not outs or (partner in self.overloaded_pdus and pdu.id not in self.overloaded_pdus):
                    weights.append(0.0)
                else:
                    weights.append(1.0)
            total_w = sum(weights)
            if total_w == 0.0:
                continue
            for (_pdu, outs), wgt in zip(feeds, weights, strict=True):
                if wgt == 0.0:
                    continue
                share = server.power_w * wgt / total_w / len(outs)
                for o in outs:
                    o.power_w = share
        for pdu in self.state.pdus:
            self._pdu_totals(pdu, dt)
        for meter, measured in self._meters:
            for ph in meter.phases:
                ph.power_w = sum(m.phases[ph.index - 1].power_w for m in measured)
            for o, m in zip(meter.outlets, measured, strict=False):
                o.power_w = m.power_w
            self._pdu_totals(meter, dt, from_outlets=False)

    def _pdu_totals(self, pdu: PduState, dt: float, *, from_outlets: bool = True) -> None:
        pf = pdu.power_factor
        hours = dt / 3600.0
        if from_outlets:
            for ph in pdu.phases:
                ph.power_w = 0.0
            for o in pdu.outlets:
                pdu.phases[o.phase - 1].power_w += o.power_w
        total = 0.0
        for o in pdu.outlets:
            o.current_a = o.power_w / (pdu.phases[o.phase - 1].voltage_v * pf)
            o.peak_power_w = max(o.peak_power_w, o.power_w)
            o.energy_wh += o.power_w * hours
        for ph in pdu.phases:
            ph.apparent_power_va = ph.power_w / pf
            ph.current_a = ph.apparent_power_va / ph.voltage_v
            ph.peak_current_a = max(ph.peak_current_a, ph.current_a)
            ph.energy_wh += ph.power_w * hours
            total += ph.power_w
        pdu.power_w = total
        pdu.apparent_power_va = total / pf
        pdu.energy_wh += total * hours

    # ----------------------------------------------------------------- site: battery and meter
    def pod_load_w(self) -> float:
        """IT load: every PDU's power, except meters that measure other PDUs (counted already)."""
        meters = {m.id for m, _ in self._meters}
        return sum(p.power_w for p in self.state.pdus if p.id not in meters)

    def aux_load_w(self) -> float:
        """Auxiliary (cooling) load the site feeds besides the IT load: the chillers."""
        return sum(ch.power_w for ch in self.state.chillers)

    def _site(self, dt: float) -> None:
        load = self.pod_load_w() + self.aux_load_w()
        bat = self.state.battery
        if bat is not None:
            self._update_battery(bat, load, dt)
        meter = self.state.site_meter
        status = GRID_OUTAGE if self.grid_outage else GRID_SAG if self.grid_sag else GRID_NORMAL
        if bat is not None:
            bat.grid_status = status
        if meter is not None:
            meter.grid_status = status
            meter.grid_voltage_pct = {GRID_OUTAGE: 0.0, GRID_SAG: SAG_VOLTAGE_PCT}.get(status, 100.0)
        self.unserved_w = 0.0
        if self.grid_outage:
            self.unserved_w = max(0.0, load - (bat.power_w if bat is not None else 0.0))
            self.unserved_j += self.unserved_w * dt
        if meter is not None:
            meter.power_w = 0.0 if self.grid_outage else load - (bat.power_w if bat is not None else 0.0)
            hours = dt / 3600.0
            if meter.power_w >= 0:
                meter.energy_import_wh += meter.power_w * hours
            else:
                meter.energy_export_wh -= meter.power_w * hours

    @staticmethod
    def _battery_limits(bat: BatteryState) -> None:
        ok = bat.faults == 0
        bat.max_discharge_w = bat.rated_discharge_w if ok and bat.soc_pct > bat.soc_min_pct else 0.0
        bat.max_charge_w = bat.rated_charge_w if ok and bat.soc_pct < bat.soc_max_pct else 0.0

    def _update_battery(self, bat: BatteryState, load_w: float, dt: float) -> None:
        """The inverter follows its setpoint (or, in grid-target mode, holds the meter at the
        target from its own current transformer) within the BMS's limits; SoC integrates."""
        self._battery_limits(bat)
        want = load_w - bat.grid_target_w if bat.mode == BATTERY_MODE_GRID_TARGET else bat.power_setpoint_w
        if self.grid_outage or self.grid_sag:
            want = load_w  # islanded: the inverter carries the whole site, whatever it was told
        power = min(max(want, -bat.max_charge_w), bat.max_discharge_w)
        if dt > 0.0 and bat.capacity_wh > 0.0:
            hours = dt / 3600.0
            if power >= 0.0:
                cells_wh = power * hours / bat.efficiency
                bat.energy_discharged_wh += power * hours
            else:
                cells_wh = power * hours * bat.efficiency
                bat.energy_charged_wh -= power * hours
            soc = bat.soc_pct - 100.0 * cells_wh / bat.capacity_wh
            # The BMS stops at its bounds: never past them in one step.
            lo, hi = bat.soc_min_pct, bat.soc_max_pct
            if power > 0.0 and soc < lo:
                soc = min(bat.soc_pct, lo)
            if power < 0.0 and soc > hi:
                soc = max(bat.soc_pct, hi)
            bat.soc_pct = min(100.0, max(0.0, soc))
        bat.power_w = power
        self._battery_limits(bat)

    # ----------------------------------------------------------------- views
    def summary(self) -> dict[str, object]:
        gpus = self.state.gpus
        return {
            "pod": self.state.name,
            "sim_time_s": round(self.state.sim_time_s, 3),
            "gpu_power_w": round(sum(g.power_w for g in gpus), 1),
            "gpu_temp_max_c": round(max((g.temp_c for g in gpus), default=0.0), 2),
            "pdu_power_w": {p.id: round(p.power_w, 1) for p in self.state.pdus},
            "cdu_supply_c": {c.id: round(c.supply_temp_c, 2) for c in self.state.cdus},
            "chiller_supply_c": {c.id: round(c.supply_temp_c, 2) for c in self.state.chillers},
            "workload": self.workload.profile,
            **(
                {"grid_import_w": round(self.state.site_meter.power_w, 1)}
                if self.state.site_meter is not None
                else {}
            ),
            **(
                {
                    "battery_w": round(self.state.battery.power_w, 1),
                    "battery_soc_pct": round(self.state.battery.soc_pct, 2),
                }
                if self.state.battery is not None
                else {}
            ),
        }


def _uuid(seed: int, index: int) -> str:
    rnd = random.Random(seed * 1_000_003 + index).getrandbits(128)
    h = f"{rnd:032x}"
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
