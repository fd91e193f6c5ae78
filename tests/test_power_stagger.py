"""Re-energisation on a multi-server pod: after a grid outage the GPU caps come off one server
every ``restore_stagger_s``, in server order, measured at the GPUs (the simulator's enforced
limits), with three real ``podagent node`` processes (one per server) under the controller; and the
grid import on return never rises faster than the contract's ramp (the site meter's readings)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

from agent.config import load_config
from agent.interlocks.service import InterlockService
from agent.model import Reading
from agent.power.service import PowerService
from hwsim.podspec import POD_DIR
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod, start_pod, stop_pod
from tests.node_helpers import node_fleet
from tests.test_power_ridethrough import POD_EXTRA

SERVERS, PER_SERVER = 3, 2
RAMP_W_PER_S = 1000.0
PERIOD_S = 0.2
STAGGER_S = 4.0
POWER = f"""
[interlocks]
release_interval_s = 0.5
release_step_pct = 50.0

[power]
enabled = true
control_period_s = {PERIOD_S}
battery = "bms-1"
site_meter = "site-meter"
ramp_limit_w_per_s = {RAMP_W_PER_S}
ride_through_s = 60.0
restore_stagger_s = {STAGGER_S}

[power.grid_contract]
ramp_up_w_per_s = {RAMP_W_PER_S}
"""
NODE_EXTRA = "[interlocks]\nrelease_interval_s = 0.5\nrelease_step_pct = 50.0\n"


def trio_pod_file(tmp: Path) -> Path:
    text = (POD_DIR / "tiny.toml").read_text().replace('[workload]\nprofile = "training"\n', "")
    text = text.replace('name = "tiny"', 'name = "trio"')
    text = text.replace(
        "count = 1\ngpus_per_server = 8", f"count = {SERVERS}\ngpus_per_server = {PER_SERVER}"
    )
    text = text.replace("servers = [0]", "servers = [0, 1, 2]")
    path = tmp / "trio.toml"
    path.write_text(text + POD_EXTRA)
    return path


def limits(pod: SimPod) -> list[float]:
    return [float(g["power_limit_w"]) for g in pod.state()["gpus"]]


async def test_caps_come_off_one_server_every_stagger_and_the_grid_climbs_at_the_ramp(tmp_path: Path) -> None:
    sim = start_pod(tmp_path / "pod", str(trio_pod_file(tmp_path)))
    try:
        with node_fleet(sim, tmp_path, extra=NODE_EXTRA) as fleet:
            path = tmp_path / "ctl.toml"
            path.write_text(fleet.controller_config(tmp_path / "ctl-state", extra=POWER, poll_interval_s=0.5))
            config = load_config(path)
            power = PowerService(config.power)
            meter: list[tuple[float, float]] = []

            def record(batch: Sequence[Reading]) -> None:
                for r in batch:
                    if r.device == "site-meter" and r.metric == "power_w" and r.value is not None:
                        meter.append((r.ts_mono, r.value))

            async with running_agent(path, services=[InterlockService(config.interlocks), power]) as agent:
                agent.store.subscribe(record)
                await until(
                    agent,
                    lambda: (
                        power.decision is not None
                        and power.decision.discharge_avail_w > 0
                        and agent.summary()["power"]["grid"]["aux_before_w"] is not None
                        and len(power._gpus()) == SERVERS * PER_SERVER
                    ),
                    timeout=30.0,
                    what="the power service on the meter, the battery and every node's GPUs",
                )
                await asyncio.to_thread(sim.fault, "grid-outage", "site-meter")
                await until(agent, lambda: power.grid_event == "outage", what="the outage seen")
                await until(
                    agent,
                    lambda: len(power.caps) == SERVERS * PER_SERVER,
                    what="every GPU capped to what the battery carries",
                )
                held = dict(power.caps)
                # The caps reach the GPUs through the nodes (lower at once).
                deadline = time.monotonic() + 20.0
                while True:
                    now = await asyncio.to_thread(limits, sim)
                    if all(w <= max(held.values()) + 1.0 for w in now):
                        break
                    assert time.monotonic() < deadline, (now, held)
                    await asyncio.sleep(0.1)
                outage_limits = now
                steps = power.steps
                await until(agent, lambda: power.steps >= steps + 10, what="the outage lasting")

                await asyncio.to_thread(sim.fault, "grid-outage", "site-meter", clear=True)
                returned = time.monotonic()
                samples: list[tuple[float, list[float]]] = []
                deadline = returned + 60.0
                while time.monotonic() < deadline:  # 10 Hz, until every server's GPUs have risen
                    samples.append((time.monotonic() - returned, await asyncio.to_thread(limits, sim)))
                    risen = [
                        any(
                            w > outage_limits[s * PER_SERVER + i] + 5.0
                            for _, ws in samples
                            for i, w in enumerate(ws[s * PER_SERVER : (s + 1) * PER_SERVER])
                        )
                        for s in range(SERVERS)
                    ]
                    if all(risen):
                        break
                    await asyncio.sleep(0.1)
                assert all(risen), samples[-1]
                await until(
                    agent,
                    lambda: not agent.summary()["power"]["grid"]["restoring"],
                    timeout=60.0,
                    what="the load back on the grid at the ramp",
                )
                reenergised = time.monotonic()
                kinds = [e.kind for e in agent.events.recent(since_wall=0)]
                assert {"grid_outage", "grid_restored", "grid_reenergised"} <= set(kinds)

        # When each server's GPUs first rose above their outage limit, seconds after the return.
        first_rise = []
        for s in range(SERVERS):
            lo = s * PER_SERVER
            t = next(
                t
                for t, ws in samples
                if any(w > outage_limits[lo + i] + 5.0 for i, w in enumerate(ws[lo : lo + PER_SERVER]))
            )
            first_rise.append(t)
        assert first_rise == sorted(first_rise), first_rise  # server order
        gaps = [b - a for a, b in itertools.pairwise(first_rise)]
        # One server per stagger: a gap is the stagger, give or take the lags of a control period,
        # a lease, the node engine and a tick (each up to ~1 s on a busy machine).
        assert all(g >= STAGGER_S - 2.0 for g in gaps), (first_rise, gaps)
        # The grid import on return: over any 1 s or more, never faster than the contract's ramp
        # (one control period of slack each end: target writes and meter polls are not in phase).
        after = [(t, w) for t, w in meter if returned <= t <= reenergised]
        assert len(after) > 10
        for i, (t0, w0) in enumerate(after):
            j = next((k for k in range(i + 1, len(after)) if after[k][0] - t0 >= 1.0), None)
            if j is None:
                break
            t1, w1 = after[j]
            assert w1 - w0 <= RAMP_W_PER_S * ((t1 - t0) + 2 * PERIOD_S) + 100.0, (t0 - returned, w1 - w0)
        print(f"stagger: first rise per server {[round(t, 2) for t in first_rise]} s after the return")
    finally:
        stop_pod(sim)
