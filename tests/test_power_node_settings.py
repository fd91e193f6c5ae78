"""GPU settings over the node protocol, end to end: the controller's power service sets NVIDIA power
smoothing (Blackwell-class fake) and the soft floor's filler floors (H100) on the GPUs of real
``podagent node`` processes against hwsim, read back, audited as events, and released when the
controller stops. NOT_SUPPORTED (H100) is one refusal, never a retry loop. Asserted on the
simulator's truth (each GPU's smoothing state and filler floor in the physics) and the nodes' logs."""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.drivers.smoothing import GpuSettingsAsk, SmoothingSettings
from agent.interlocks.service import InterlockService
from agent.node.protocol import ProtocolError, ReplayGuard, check_request
from agent.power.config import PowerConfig
from agent.power.control import smoothing_alone
from agent.power.service import PowerService
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod, start_pod, stop_pod
from tests.node_helpers import DUO_PER_SERVER, DUO_SERVERS, RawClient, duo_pod_file, node_fleet, request_body

N_GPUS = DUO_SERVERS * DUO_PER_SERVER
POWER = """
[interlocks]
release_interval_s = 1.0

[power]
enabled = true
control_period_s = 0.2
ramp_limit_w_per_s = 2000.0
workload_power_profile = "LLM_TRAINING"
"""
LLM_TRAINING_BIT = 1 << 7  # NVML_POWER_PROFILE_LLM_TRAINING
SOFT_FLOOR = POWER + 'no_battery_fallback = "soft_floor"\n'


@contextlib.contextmanager
def duo(tmp_path: Path, *, blackwell: bool) -> Iterator[SimPod]:
    path = duo_pod_file(tmp_path)
    if blackwell:
        text = path.read_text().replace(
            'name = "NVIDIA H100 80GB HBM3"', 'name = "NVIDIA GB200 (hwsim)"\npower_smoothing = true'
        )
        path.write_text(text)
    sim = start_pod(tmp_path / "pod", str(path))
    try:
        yield sim
    finally:
        stop_pod(sim)


def smoothing(pod: SimPod) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = pod.request(cmd="state")["smoothing"]
    return out


async def until_sim(
    pod: SimPod, predicate: Callable[[list[dict[str, Any]]], bool], *, within: float, what: str
) -> None:
    last: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(within):
            while True:
                last = await asyncio.to_thread(smoothing, pod)
                if predicate(last):
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out after {within} s waiting for {what}; last {last}") from None


def load_config_power(extra: str) -> PowerConfig:
    return PowerConfig.model_validate(tomllib.loads(extra)["power"])


def events(agent: Any, kind: str) -> list[Any]:
    return [e for e in agent.events.recent(since_wall=0) if e.kind == kind]


async def test_smoothing_is_set_on_node_gpus_read_back_audited_and_released(tmp_path: Path) -> None:
    # No battery: the profile for smoothing alone, sized for the pod's 8 GPUs (700 W TMP).
    want = smoothing_alone(load_config_power(POWER), [700.0] * N_GPUS)
    with duo(tmp_path, blackwell=True) as pod, node_fleet(pod, tmp_path) as fleet:
        path = tmp_path / "ctl.toml"
        path.write_text(fleet.controller_config(tmp_path / "ctl-state", extra=POWER))
        config = load_config(path)
        power = PowerService(config.power)
        async with running_agent(path, services=[InterlockService(config.interlocks), power]) as agent:
            await until_sim(
                pod,
                lambda sm: all(s["enabled"] and s["floor_pct"] == want.floor_pct for s in sm),
                within=30,
                what="smoothing on every GPU of both nodes",
            )
            await until_sim(
                pod,
                lambda sm: all(s["workload_mask"] == LLM_TRAINING_BIT for s in sm),
                within=15,
                what="the LLM_TRAINING workload profile requested on every GPU",
            )
            sm0 = smoothing(pod)[0]
            assert (sm0["ramp_up_w_per_s"], sm0["ramp_down_w_per_s"], sm0["hysteresis_ms"]) == (
                want.ramp_up_w_per_s,
                want.ramp_down_w_per_s,
                want.hysteresis_ms,
            )
            await until(
                agent,
                lambda: sum(len(e.detail["gpus"]) for e in events(agent, "gpu_smoothing_set")) == N_GPUS,
                what="the smoothing set audited",
            )
            told = [g for e in events(agent, "gpu_smoothing_set") for g in e.detail["gpus"]]
            assert sorted(told) == sorted(f"srv-{s}-gpu{i}" for s in range(DUO_SERVERS) for i in range(4))
            # The node's own poll reads the GPUs' smoothing back to the controller.
            await until(
                agent,
                lambda: all(agent.store.value(g, "power_smoothing_enabled") == 1.0 for g in told),
                what="the read-back in the controller's store",
            )
            status = agent.summary()["power"]["allocation"]
            assert agent.summary()["power"]["gpu_smoothing"]["on_gpus"] == N_GPUS, status
            assert not events(agent, "gpu_settings_failed")
            steps = power.steps
            await until(agent, lambda: power.steps >= steps + 10, what="ten more control periods")
            assert len(told) == N_GPUS  # set once, not re-sent every period
            assert sum(len(e.detail["gpus"]) for e in events(agent, "gpu_smoothing_set")) == N_GPUS
            workload = events(agent, "gpu_workload_profile_set")
            assert sorted(g for e in workload for g in e.detail["gpus"]) == sorted(told)
            assert {e.detail["profile"] for e in workload} == {"LLM_TRAINING"}
        # The controller stopped: what it set is released.
        await until_sim(
            pod,
            lambda sm: not any(s["enabled"] or s["workload_mask"] for s in sm),
            within=15,
            what="smoothing and the workload profile off",
        )


async def test_h100_refuses_smoothing_once_and_the_soft_floor_fills_node_gpus(tmp_path: Path) -> None:
    with duo(tmp_path, blackwell=False) as pod, node_fleet(pod, tmp_path) as fleet:
        path = tmp_path / "ctl.toml"
        path.write_text(fleet.controller_config(tmp_path / "ctl-state", extra=SOFT_FLOOR))
        config = load_config(path)
        power = PowerService(config.power)
        async with running_agent(path, services=[InterlockService(config.interlocks), power]) as agent:
            await until(
                agent,
                lambda: len(power.smoothing_unsupported) == N_GPUS,
                timeout=30,
                what="every GPU's NOT_SUPPORTED",
            )
            await until_sim(
                pod,
                lambda sm: sum(1 for s in sm if s["soft_floor_w"] > 100.0) >= N_GPUS // 2,
                within=30,
                what="filler floors on the busy GPUs of both nodes",
            )
            steps = power.steps
            await until(agent, lambda: power.steps >= steps + 25, timeout=30, what="25 more control periods")
            # One refusal each, told once: no retry loop on the controller or the nodes.
            refused = [g for e in events(agent, "gpu_smoothing_unsupported") for g in e.detail["gpus"]]
            assert sorted(refused) == sorted(power.smoothing_unsupported)
            no_profiles = [
                g for e in events(agent, "gpu_workload_profile_unsupported") for g in e.detail["gpus"]
            ]
            assert sorted(no_profiles) == sorted(refused)  # asked once each, with the smoothing
            assert not events(agent, "gpu_settings_failed")
            for node in fleet.nodes:
                lines = [r for r in node.log_lines() if r.get("kind") == "smoothing_refused"]
                assert len(lines) == DUO_PER_SERVER, lines
                assert all("NOT_SUPPORTED" in str(r.get("reason")) for r in lines)

            # The physics holds the floors the controller last sent (sampled with no batch in flight).
            def held_as_sent() -> bool:
                task = power._settings_task
                if task is not None and not task.done():
                    return False
                sent = dict(power.filler_sent)
                sm = smoothing(pod)
                if power._settings_task is not task:
                    return False  # a batch started while the physics was read
                return all(
                    sm[s * DUO_PER_SERVER + i]["soft_floor_w"]
                    == pytest.approx(sent.get(f"srv-{s}-gpu{i}", 0.0), abs=0.2)
                    for s in range(DUO_SERVERS)
                    for i in range(DUO_PER_SERVER)
                )

            async with asyncio.timeout(15):
                while not await asyncio.to_thread(held_as_sent):
                    await asyncio.sleep(0.05)
            assert agent.summary()["power"]["gpu_smoothing"]["filler_gpus"] >= N_GPUS // 2
        await until_sim(
            pod, lambda sm: all(s["soft_floor_w"] == 0.0 for s in sm), within=15, what="fillers off"
        )


def test_a_settings_request_is_checked_whole() -> None:
    guard = ReplayGuard(window_s=5.0)

    def check(settings: object) -> Any:
        body = request_body("srv-0", "b", 1, {}, op="settings")
        body["caps"] = None
        body["settings"] = settings
        return check_request(body, node="srv-0", guard=guard, max_skew_s=5.0)

    good = check(
        {
            "0": {
                "smoothing": {
                    "floor_pct": 80,
                    "ramp_up_w_per_s": 600,
                    "ramp_down_w_per_s": 100,
                    "hysteresis_ms": 2000,
                }
            },
            "1": {"filler_w": 350.0},
            "3": {"workload_profile": "LLM_TRAINING"},
            "4": {"workload_profile": None},
            "2": {"smoothing": None},
        }
    )
    assert good.settings == {
        0: GpuSettingsAsk(True, SmoothingSettings(80.0, 600.0, 100.0, 2000.0), None),
        3: GpuSettingsAsk(False, None, None, True, "LLM_TRAINING"),
        4: GpuSettingsAsk(False, None, None, True, None),
        1: GpuSettingsAsk(False, None, 350.0),
        2: GpuSettingsAsk(True, None, None),
    }
    bad_entries: list[object] = [
        None,
        {},
        {"x": {"filler_w": 1.0}},
        {"0": {"filler_w": -1.0}},
        {"0": {"filler_w": float("nan")}},
        {"0": {"filler_w": True}},
        {"0": {"filler_w": 1e6}},
        {
            "0": {
                "smoothing": {
                    "floor_pct": 120,
                    "ramp_up_w_per_s": 600,
                    "ramp_down_w_per_s": 100,
                    "hysteresis_ms": 2000,
                }
            }
        },
        {"0": {"smoothing": {"floor_pct": 80}}},
        {"0": {"smoothing": "on"}},
        {"0": {"power_limit_w": 100}},
        {"0": {"workload_profile": "FASTEST"}},
        {"0": {"workload_profile": 7}},
    ]
    for bad in bad_entries:
        with pytest.raises(ProtocolError) as err:
            check(bad)
        assert err.value.reason == "frame", bad


async def test_a_node_switches_its_filler_floors_off_when_the_controller_is_lost(tmp_path: Path) -> None:
    """A raw, signed settings request (as the controller's) sets a filler floor; then silence: the
    node's fail-safe switches the floor off (no power burnt for a controller that is gone)."""
    with duo(tmp_path, blackwell=False) as pod, node_fleet(pod, tmp_path, lost_after_s=3.0) as fleet:
        node = fleet.nodes[0]
        client = RawClient(node.port, fleet.key)
        try:
            body = request_body("srv-0", "raw", 1, {}, op="settings")
            body["caps"] = None
            body["settings"] = {"1": {"filler_w": 400.0}, "9": {"filler_w": 100.0}}
            answer = client.send_raw(client.frame(**body))
            assert answer["ok"], answer
            assert answer["settings"]["1"] == {
                **answer["settings"]["1"],
                "filler_w": 400.0,
                "filler_error": None,
            }
            assert answer["settings"]["9"]["smoothing_error"] == "no such GPU on this node"
            await until_sim(
                pod, lambda sm: sm[1]["soft_floor_w"] == 400.0, within=10, what="the filler floor"
            )
            assert all(s["soft_floor_w"] == 0.0 for i, s in enumerate(smoothing(pod)) if i != 1)
        finally:
            client.close()
        await until_sim(pod, lambda sm: sm[1]["soft_floor_w"] == 0.0, within=20, what="the floor off")
        kinds = [r.get("kind") for r in node.log_lines()]
        assert kinds.index("controller_lost") < kinds.index("filler_released")
