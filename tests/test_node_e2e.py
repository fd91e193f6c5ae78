"""Node agents end to end: real ``podagent node`` processes, one per simulated server, against hwsim;
the controller (in-process ``Agent`` + interlocks) reaches them over loopback TCP with the pod key.
Asserted on the simulator's truth (each GPU's ``power_limit_w`` in the physics) and the nodes' logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from agent.app import Agent
from agent.config import load_config
from agent.interlocks.service import InterlockService
from agent.model import Quality
from agent.node.protocol import ALWAYS_SENT, FULL_EVERY
from tests.agent_helpers import running_agent
from tests.conftest import SimPod, start_pod, stop_pod
from tests.node_helpers import NodeFleet, RawClient, duo_pod_file, node_fleet, request_body, wait_armed

DEFAULT_W, MIN_W = 700.0, 200.0
FAILSAFE_W = 0.6 * DEFAULT_W
POLL_S = 0.5  # the controller's
# The nodes' NVML poll: their own sensor_stale trips after 3 of these (kept at 1 s so that a
# loaded test machine does not make a node's GPU temperatures stale).
NODE_POLL_S = 1.0
LOST_S = 3.0
# Node and controller ramp alike: +10% of the default limit every second (tests stay short).
NODE_EXTRA = "[interlocks]\nrelease_interval_s = 1.0\n[interlocks.gpu_runaway]\nclear_hold_s = 3.0\n"
CONTROLLER_EXTRA = """
[interlocks]
release_interval_s = 1.0
[interlocks.sensor_stale]
fresh_hold_s = 2.0
startup_grace_s = 5.0
"""


@contextlib.contextmanager
def duo(tmp_path: Path) -> Iterator[SimPod]:
    sim = start_pod(tmp_path / "pod", str(duo_pod_file(tmp_path)))
    try:
        yield sim
    finally:
        stop_pod(sim)


def limits(pod: SimPod) -> list[float]:
    return [float(g["power_limit_w"]) for g in pod.state()["gpus"]]


async def until_truth(
    pod: SimPod, predicate: Callable[[list[float]], bool], *, within: float, what: str
) -> list[float]:
    """Sample the physics' limits (~10 Hz) until predicate holds; returns every sample seen."""
    seen: list[list[float]] = []
    try:
        async with asyncio.timeout(within):
            while True:
                now = await asyncio.to_thread(limits, pod)
                seen.append(now)
                if predicate(now):
                    return now
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {within} s waiting for {what}; last {seen[-1:]}") from None


async def until_log(
    node: Any, predicate: Callable[[dict[str, Any]], bool], *, within: float, what: str
) -> dict[str, Any]:
    try:
        async with asyncio.timeout(within):
            while True:
                for line in node.log_lines():
                    if predicate(line):
                        return line
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"node {node.id}: timed out after {within} s waiting for {what}") from None


@contextlib.asynccontextmanager
async def controller(
    fleet: NodeFleet, tmp_path: Path, name: str = "ctl", extra: str = CONTROLLER_EXTRA
) -> AsyncIterator[tuple[Agent, InterlockService]]:
    path = tmp_path / f"{name}.toml"
    path.write_text(fleet.controller_config(tmp_path / f"{name}-state", extra=extra, poll_interval_s=POLL_S))
    service = InterlockService(load_config(path).interlocks)
    async with running_agent(path, services=[service]) as agent:
        yield agent, service


async def until_agent(agent: Agent, predicate: Callable[[], bool], *, within: float, what: str) -> None:
    try:
        async with asyncio.timeout(within):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"controller: timed out after {within} s waiting for {what}") from None


async def still_polled(agent: Agent, gpus: list[str]) -> None:
    """The other node keeps its cadence: new, good readings keep arriving from it."""
    since = time.monotonic()

    def new(g: str) -> bool:
        r = agent.store.get(g, "temp_c")
        return r is not None and r.ts_mono > since and r.value is not None and r.quality is Quality.GOOD

    await until_agent(agent, lambda: all(new(g) for g in gpus), within=5, what=f"new readings from {gpus}")


def gpu_ids(server: int) -> list[str]:
    return [f"srv-{server}-gpu{i}" for i in range(4)]


def fresh(agent: Agent, gpu: str) -> bool:
    r = agent.store.get(gpu, "temp_c")
    return r is not None and agent.store.effective_quality(r) is Quality.GOOD and r.value is not None


# ---------------------------------------------------------------------------------- tests
async def test_runaway_with_no_controller_is_capped_by_its_node(tmp_path: Path) -> None:
    with duo(tmp_path) as pod:
        pod.request(cmd="workload", profile="steady", level=0.95)
        # No controller at all, and never "lost" within the test: the node holds the limits it
        # found (700 W) and its own rules are all that act.
        with node_fleet(
            pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S, extra=NODE_EXTRA
        ) as fleet:
            node = fleet.nodes[1]
            await until_log(
                node, lambda r: r.get("event") == "node interlocks armed", within=20, what="armed"
            )
            pod.fault("gpu-runaway", "gpu5")  # server 1, local GPU 1
            capped = await until_truth(
                pod, lambda lim: abs(lim[5] - FAILSAFE_W) <= 1, within=30, what="gpu5 capped"
            )
            assert [w for i, w in enumerate(capped) if i != 5] == [DEFAULT_W] * 7
            trip = await until_log(node, lambda r: r.get("kind") == "interlock_trip", within=5, what="trip")
            assert trip["interlock"] in ("gpu_runaway", "gpu_overtemp") and trip["gpu"] == "gpu1"
            applied = await until_log(
                node, lambda r: r.get("event") == "node cap applied", within=5, what="cap"
            )
            assert applied["gpu"] == "gpu1" and applied["readback_w"] == FAILSAFE_W
            assert not any(r.get("event") == "node cap applied" for r in fleet.nodes[0].log_lines())


async def test_forged_replayed_and_expired_caps_change_nothing(tmp_path: Path) -> None:
    with (
        duo(tmp_path) as pod,
        node_fleet(pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S) as fleet,
    ):
        node = fleet.nodes[0]
        await until_log(node, lambda r: r.get("event") == "node interlocks armed", within=20, what="armed")
        client = RawClient(node.port, fleet.key)
        try:
            boot = os.urandom(4).hex()
            first = client.frame(**request_body("srv-0", boot, 1, {"0": 650.0}))
            assert client.send_raw(first)["ok"]
            second = client.frame(**request_body("srv-0", boot, 2, {"0": 600.0}))
            assert client.send_raw(second)["ok"]
            await until_truth(pod, lambda lim: lim[0] == 600.0, within=5, what="the valid cap")

            bad_key = os.urandom(32).hex().encode()
            refused = {
                "mac": client.frame(key=bad_key, **request_body("srv-0", boot, 3, {"0": 250.0})),
                "replay": first,
                "expired": client.frame(
                    **request_body("srv-0", boot, 4, {"0": 250.0}, expires_at=int(time.time() * 1000) - 1000)
                ),
                "skew": client.frame(
                    **request_body("srv-0", boot, 5, {"0": 250.0}, issued_at=int(time.time() * 1000) + 60_000)
                ),
                "node": client.frame(**request_body("srv-1", boot, 6, {"0": 250.0})),
            }
            tampered = second.replace(b'"0":600.0', b'"0":250.0')
            assert tampered != second
            refused["mac_tampered"] = tampered
            for reason, frame in refused.items():
                answer = client.send_raw(frame)
                assert answer == {**answer, "ok": False, "error": reason.removesuffix("_tampered")}, reason
            answer = client.send_raw(refused["mac"])  # a second forgery: counted, not logged again
            assert answer["error"] == "mac"
            assert answer["re"] is None  # a forged request gets no echo it could pass off

            # Nothing changed on the GPUs, and a valid poll reports the counters.
            poll = client.send_raw(client.frame(**request_body("srv-0", boot, 7, {"0": 600.0}, op="poll")))
            assert poll["ok"]
            status = poll["status"]
            assert status["rejected_mac_total"] == 3 and status["rejected_replay_total"] == 1
            assert status["rejected_expired_total"] == 1 and status["rejected_skew_total"] == 1
            assert status["rejected_node_total"] == 1
            assert status["rejected_total"] == 7
        finally:
            client.close()
        await asyncio.sleep(2 * POLL_S)  # a refused cap must not show up on a later tick either
        assert limits(pod) == [600.0, *[DEFAULT_W] * 7]
        logged = [r for r in node.log_lines() if r.get("kind") == "rejected"]
        assert sorted(r["reason"] for r in logged) == ["expired", "mac", "node", "replay", "skew"]


async def test_controller_lost_means_failsafe_and_its_return_releases_ramped(tmp_path: Path) -> None:
    with (
        duo(tmp_path) as pod,
        node_fleet(
            pod, tmp_path, lost_after_s=LOST_S, poll_interval_s=NODE_POLL_S, extra=NODE_EXTRA
        ) as fleet,
    ):
        async with controller(fleet, tmp_path, "ctl-1") as (agent, _service):
            await until_agent(
                agent,
                lambda: all(fresh(agent, g) for s in (0, 1) for g in gpu_ids(s)),
                within=20,
                what="all fresh",
            )
            info = agent.store.info("srv-1-gpu2")
            assert info["hostname"] == "duo-srv-1" and info["gpu"] == "2"
            assert info["uuid"] == pod.state()["gpus"][6]["uuid"]
            assert limits(pod) == [DEFAULT_W] * 8
        stopped = time.monotonic()  # the controller is gone (its connections closed)
        await until_truth(
            pod, lambda lim: lim == [FAILSAFE_W] * 8, within=LOST_S + 10, what="fail-safe on every node"
        )
        took = time.monotonic() - stopped
        for node in fleet.nodes:
            lost = await until_log(
                node, lambda r: r.get("kind") == "controller_lost", within=2, what="lost event"
            )
            assert lost["silent_for_s"] >= LOST_S  # never early
        print(
            f"controller gone -> fail-safe on all GPUs: {took:.2f} s (lost_after {LOST_S} s, poll {POLL_S} s)"
        )

        seen: list[list[float]] = []

        def back(lim: list[float]) -> bool:
            seen.append(lim)
            return lim == [DEFAULT_W] * 8

        async with controller(fleet, tmp_path, "ctl-2") as (agent, service):
            everything = [g for s in (0, 1) for g in gpu_ids(s)]
            await until_agent(agent, lambda: set(everything) <= set(service.caps), within=20, what="armed")
            await until_truth(pod, back, within=40, what="back to the default limit under the controller")
        # Released in steps (the ramp), not in one jump from the fail-safe.
        assert any(FAILSAFE_W < w < DEFAULT_W for lim in seen for w in lim), seen[:3]
        for node in fleet.nodes:
            await until_log(node, lambda r: r.get("kind") == "controller_back", within=2, what="back event")


async def test_dead_or_hung_node_goes_stale_while_the_other_keeps_cadence(tmp_path: Path) -> None:
    with (
        duo(tmp_path) as pod,
        node_fleet(pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S) as fleet,
    ):
        async with controller(fleet, tmp_path) as (agent, service):
            everything = [g for s in (0, 1) for g in gpu_ids(s)]
            await until_agent(
                agent,
                lambda: all(fresh(agent, g) for g in everything) and set(everything) <= set(service.caps),
                within=20,
                what="every GPU fresh and under the engine",
            )
            for victim, survivor, how in ((1, 0, "kill"), (0, 1, "hang")):
                node = fleet.nodes[victim]
                other = gpu_ids(survivor)
                if how == "kill":
                    node.kill()
                else:
                    node.hang()
                await until_agent(
                    agent,
                    lambda v=victim: all(not fresh(agent, g) for g in gpu_ids(v)),
                    within=10,
                    what=f"node {victim} ({how}) GPUs stale",
                )
                await still_polled(agent, other)  # the other node kept its cadence
                await until_agent(
                    agent,
                    lambda v=victim: all(
                        service.engine is not None
                        and service.engine.instances.get(("sensor_stale", g)) is not None
                        and service.engine.instances[("sensor_stale", g)].tripped
                        for g in gpu_ids(v)
                    ),
                    within=10,
                    what=f"sensor_stale on node {victim}'s GPUs",
                )
                assert all(service.caps[g] == FAILSAFE_W for g in gpu_ids(victim)), service.caps
                if how == "kill":
                    node.start()  # back for the second round
                    await until_agent(
                        agent, lambda: all(fresh(agent, g) for g in gpu_ids(1)), within=20, what="node 1 back"
                    )
            fleet.nodes[0].resume()


async def test_coolant_leak_caps_the_gpus_of_every_node_on_the_loop(tmp_path: Path) -> None:
    with (
        duo(tmp_path) as pod,
        node_fleet(pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S) as fleet,
    ):
        async with controller(fleet, tmp_path) as (agent, service):
            everything = [g for s in (0, 1) for g in gpu_ids(s)]
            await until_agent(
                agent,
                lambda: all(fresh(agent, g) for g in everything) and set(everything) <= set(service.caps),
                within=20,
                what="every GPU fresh and under the engine",
            )
            assert set(next(iter(service.engine.topology.loops.values()))) == set(everything)  # type: ignore[union-attr]
            pod.fault("coolant-leak", "cdu-1")
            await until_truth(
                pod, lambda lim: lim == [MIN_W] * 8, within=15, what="every GPU on the loop at minimum"
            )
            assert all(service.actuation[g].requested_w == MIN_W for g in everything)


async def test_chiller_trip_caps_the_gpus_of_every_node_on_the_loop(tmp_path: Path) -> None:
    """The pod's core loop across the pod network: a facility trip the controller sees over Modbus
    (the chiller), coolant_supply_high on the CDU's loop, caps on GPUs only the nodes can reach."""
    from tests.test_interlocks_e2e import event

    # The coolant takes simulated minutes to warm past 40 C: the physics runs 6x faster.
    pod = start_pod(tmp_path / "pod", str(duo_pod_file(tmp_path)), speed=6.0)
    try:
        with node_fleet(pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S) as fleet:
            async with controller(fleet, tmp_path) as (agent, service):
                everything = [g for s in (0, 1) for g in gpu_ids(s)]
                await until_agent(
                    agent,
                    lambda: all(fresh(agent, g) for g in everything) and set(everything) <= set(service.caps),
                    within=20,
                    what="every GPU fresh and under the engine",
                )
                pod.request(cmd="workload", profile="steady", level=0.95)
                pod.fault("chiller-trip", "chiller-1")
                trip = await event(agent, "interlock_trip", interlock="coolant_supply_high", within=90)
                assert trip.device == "cdu-1"
                half = 0.5 * DEFAULT_W
                await until_truth(
                    pod,
                    lambda lim: all(w <= half + 1 for w in lim),
                    within=20,
                    what="every GPU of both nodes at or under 50%",
                )
                assert all(service.actuation[g].requested_w <= half + 1 for g in everything)
    finally:
        stop_pod(pod)


async def test_node_restart_keeps_each_gpu_limit_until_the_controller_decides(tmp_path: Path) -> None:
    with (
        duo(tmp_path) as pod,
        node_fleet(pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S, extra=NODE_EXTRA) as fleet,
    ):
        node = fleet.nodes[0]
        client = RawClient(node.port, fleet.key)
        try:
            assert client.send_raw(client.frame(**request_body("srv-0", "b1", 1, {"0": 450.0, "2": 300.0})))[
                "ok"
            ]
        finally:
            client.close()
        await until_truth(
            pod, lambda lim: lim[:4] == [450.0, DEFAULT_W, 300.0, DEFAULT_W], within=5, what="caps"
        )
        node.kill()
        node.start()
        await asyncio.to_thread(wait_armed, node)
        await asyncio.sleep(4 * POLL_S)  # several of the new node's ticks, no controller yet
        assert limits(pod)[:4] == [450.0, DEFAULT_W, 300.0, DEFAULT_W]  # held, no jump to default
        assert any(r.get("kind") == "reconciled" for r in node.log_lines())
        # The controller's first decision takes over (here: no caps -> ramped back to the default).
        async with controller(fleet, tmp_path) as (_agent, _service):
            await until_truth(pod, lambda lim: lim == [DEFAULT_W] * 8, within=30, what="released")


async def test_node_down_at_controller_start_is_protected_from_the_first_step(tmp_path: Path) -> None:
    # The GPUs of a node that never answered come from its config's `gpus` count: under the engine
    # from its first step, stale after the start grace, held at the fail-safe cap when it comes up.
    extra = CONTROLLER_EXTRA.replace("fresh_hold_s = 2.0", "fresh_hold_s = 10.0")
    with (
        duo(tmp_path) as pod,
        node_fleet(pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S) as fleet,
    ):
        late = fleet.nodes[1]
        late.kill()
        async with controller(fleet, tmp_path, extra=extra) as (agent, service):
            await until_agent(agent, lambda: service.engine is not None, within=10, what="engine built")
            assert service.engine is not None
            assert set(gpu_ids(1)) <= set(service.engine.topology.gpus)
            assert set(gpu_ids(1)) <= set(next(iter(service.engine.topology.loops.values())))
            assert not any(fresh(agent, g) for g in gpu_ids(1))

            def stale_tripped() -> bool:
                assert service.engine is not None
                insts = [service.engine.instances.get(("sensor_stale", g)) for g in gpu_ids(1)]
                return all(i is not None and i.tripped for i in insts)

            await until_agent(agent, stale_tripped, within=20, what="sensor_stale on the silent node's GPUs")
            trip = next(
                e for e in agent.events.recent() if e.kind == "interlock_trip" and e.device in gpu_ids(1)
            )
            assert trip.detail["inputs"]["temp_c"] == "never received", trip.detail
            late.start()
            await until_truth(
                pod,
                lambda lim: lim[4:] == [FAILSAFE_W] * 4 and lim[:4] == [DEFAULT_W] * 4,
                within=20,
                what="the late node's GPUs at the controller's fail-safe cap",
            )
            assert stale_tripped()
            assert all(service.caps[g] == FAILSAFE_W for g in gpu_ids(1)), service.caps


async def test_poll_answers_carry_only_changes_between_full_ones(tmp_path: Path) -> None:
    """On one connection: the first poll answer is full (every reading, the GPUs' info); the next
    ones carry what changed plus what the safety rules read; every FULL_EVERY-th is full again."""
    with (
        duo(tmp_path) as pod,
        node_fleet(pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S) as fleet,
    ):
        node = fleet.nodes[0]
        await until_log(node, lambda r: r.get("event") == "node interlocks armed", within=20, what="armed")
        client = RawClient(node.port, fleet.key)
        try:
            boot = os.urandom(4).hex()
            answers = [
                client.send_raw(client.frame(**request_body("srv-0", boot, seq, {}, op="poll")))
                for seq in range(1, FULL_EVERY + 2)
            ]
        finally:
            client.close()
        assert [a["full"] for a in answers] == [True] + [False] * (FULL_EVERY - 1) + [True]
        first, second = answers[0]["gpus"][0], answers[1]["gpus"][0]
        assert first["info"]["uuid"].startswith("GPU-") and "info" not in second
        assert {"min_power_limit_w", "default_power_limit_w", "temp_c"} <= set(first["readings"])
        assert ALWAYS_SENT & set(first["readings"]) <= set(second["readings"])
        assert "default_power_limit_w" not in second["readings"]  # unchanged, not re-sent
        assert len(second["readings"]) < len(first["readings"])
        assert set(answers[-1]["gpus"][0]["readings"]) == set(first["readings"])
