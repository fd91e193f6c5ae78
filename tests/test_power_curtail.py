"""Fleet curtailment: the ``curtail`` command over a real mosquitto, delivered by the power service
against hwsim (battery + site meter over Modbus), measured at the site meter; its refusals; and the
order's own bookkeeping (pure)."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.interlocks.service import InterlockService
from agent.power.curtail import CurtailOrder, CurtailRefused, CurtailRun, validate_curtail
from agent.power.service import PowerService
from agent.publish.mqtt import build_service
from tests.agent_helpers import running_agent, until
from tests.conftest import start_pod, stop_pod
from tests.conftest_mqtt import Mosquitto, Subscriber, mqtt_toml
from tests.test_power_e2e import _pod_file

POWER = """
[interlocks]
release_interval_s = 0.5
release_step_pct = 50.0

[power]
enabled = true
control_period_s = 0.2
battery = "bms-1"
site_meter = "site-meter"
ramp_limit_w_per_s = 2000.0

[power.grid_contract]
ramp_up_w_per_s = 1000.0
"""


def _cmd(cmd_id: str, **fields: Any) -> bytes:
    now = int(time.time() * 1000)
    return json.dumps({"id": cmd_id, "issued_at": now, "expires_at": now + 60_000, **fields}).encode()


async def test_curtail_to_half_is_reached_before_its_deadline_and_released_at_the_ramp(
    tmp_path: Path,
) -> None:
    broker = Mosquitto()
    broker.start()
    sim = start_pod(tmp_path / "pod", str(_pod_file(tmp_path)))
    sub = await Subscriber(broker.port).start()
    try:
        path = tmp_path / "podagent.toml"
        extra = POWER + mqtt_toml([broker.port], telemetry_period_s=0.5)
        path.write_text(sim.agent_config(tmp_path / "state", extra=extra, poll_interval_s=0.2))
        config = load_config(path)
        root = f"podagent/v1/{config.pod.site}/{config.pod.id}"
        power = PowerService(config.power)
        mqtt = build_service(config)
        assert mqtt is not None
        async with running_agent(path, services=[InterlockService(config.interlocks), power, mqtt]) as agent:
            await until(
                agent,
                lambda: power.decision is not None and power.decision.site_load_w is not None,
                what="the power service running on the site meter",
            )
            await sub.wait_for(lambda ms: sub.on("/birth"), timeout=15)

            async def send(name: str, payload: bytes) -> dict[str, Any]:
                before = len(sub.on("/cmd_reply"))
                await sub.publish(f"{root}/cmd/{name}", payload)
                replies = await sub.wait_for(lambda ms: sub.on("/cmd_reply")[before:] or None)
                return dict(replies[0].json())

            # Refusals first, each with its code and why.
            bad = await send("curtail", _cmd("c-bad-1", fraction=1.5, duration_s=10))
            assert bad["ok"] is False and bad["error"] == "schema"
            both = await send("curtail", _cmd("c-bad-2", fraction=0.5, target_w=100.0, duration_s=10))
            assert both["ok"] is False and both["error"] == "schema" and "exactly one" in both["detail"]
            flag = await send("curtail", _cmd("c-bad-3", fraction=True, duration_s=10))
            assert flag["ok"] is False and flag["error"] == "schema"
            low = await send("curtail", _cmd("c-low", target_w=10.0, duration_s=10))
            assert low["ok"] is False and low["error"] == "refused" and "go down to" in low["detail"]
            assert power.curtail is None

            start_ms = int(time.time() * 1000) + 1000
            ok = await send(
                "curtail", _cmd("c-half", fraction=0.5, start_at=start_ms, duration_s=4.0, deadline_s=2.0)
            )
            assert ok == {**ok, "ok": True, "id": "c-half"}
            assert power.curtail is not None and power.curtail.order.id == "c-half"
            await until(
                agent,
                lambda: power.curtail is not None and power.curtail.reached_after_s is not None,
                timeout=10.0,
                what="the curtailment reached at the site meter",
            )
            run = power.curtail
            assert run is not None and run.import_at_start_w is not None and run.target_w is not None
            assert run.target_w == pytest.approx(0.5 * run.import_at_start_w)
            status = agent.summary()["power"]["curtail"]
            assert status["reached_before_deadline"] is True and status["missed_deadline"] is False
            assert 0.0 <= status["reached_after_s"] <= 2.0
            print("curtail figures:", json.dumps(status))
            names = {m[0] for m in power.metrics()}
            assert {"podagent_pod_curtail_active", "podagent_pod_curtail_reached_seconds"} <= names

            # The state topic carries it; the release climbs at the contract's ramp (1 kW/s).
            await sub.wait_for(
                lambda ms: [
                    m
                    for m in sub.on("/state")
                    if (m.json()["state"].get("power") or {}).get("curtail", {})
                    and m.json()["state"]["power"]["curtail"].get("reached_after_s") is not None
                ],
                timeout=10,
            )
            limits: list[tuple[float, float]] = []

            def released() -> bool:
                r = power.curtail
                if r is not None and r.phase == "releasing" and r.limit_w is not None:
                    limits.append((time.time(), r.limit_w))
                return r is None or (r.phase == "releasing" and len(limits) >= 5)

            await until(agent, released, timeout=15.0, what="the release")
            for (t0, w0), (t1, w1) in itertools.pairwise(limits):
                assert w1 >= w0 and w1 - w0 <= 1000.0 * (t1 - t0) + 1000.0 * 0.4 + 1.0
            events = [e.kind for e in agent.events.recent(since_wall=0)]
            assert {"curtail_accepted", "curtail_started", "curtail_reached"} <= set(events)
    finally:
        await sub.stop()
        stop_pod(sim)
        broker.close()


def test_an_order_is_validated_tracked_and_measured() -> None:
    now = 1_000_000.0
    with pytest.raises(CurtailRefused, match="ends in the past"):
        validate_curtail("x", {"fraction": 0.5, "duration_s": 1.0, "start_at": (now - 10) * 1000}, now)
    with pytest.raises(CurtailRefused, match="deadline_s"):
        validate_curtail("x", {"fraction": 0.5, "duration_s": 1.0, "deadline_s": 5.0}, now)
    order = validate_curtail("c", {"fraction": 0.5, "duration_s": 10.0, "start_at": now * 1000}, now)
    assert order == CurtailOrder("c", None, 0.5, now, 10.0, 2.0)
    run = CurtailRun(order, accepted_wall=now)
    assert run.limit(now - 1, 10_000.0, 500.0, None) is None and run.phase == "scheduled"
    assert run.limit(now, 10_000.0, 500.0, None) == 5000.0 and run.phase == "active"
    assert run.measure(9000.0, now + 0.5) is None  # not there yet
    assert run.measure(5040.0, now + 1.0) == "reached"  # inside the 100 W tolerance
    assert run.measure(4900.0, now + 1.5) is None
    st = run.status()
    assert st["reached_after_s"] == 1.0 and st["reached_before_deadline"] is True
    assert st["delivered_w"] == pytest.approx(10_000.0 - (5040.0 + 4900.0) / 2, abs=0.1)
    # After the end the limit climbs at the ramp until it no longer binds.
    assert run.limit(now + 12.0, 5000.0, 500.0, 8000.0) == pytest.approx(6000.0)
    assert run.phase == "releasing"
    assert run.limit(now + 17.0, 7000.0, 500.0, 8000.0) is None and run.phase == "done"
    # A missed deadline is said once.
    late = CurtailRun(order, accepted_wall=now)
    late.limit(now, 10_000.0, None, None)
    assert late.measure(9000.0, now + 2.5) == "missed"
    assert late.measure(9000.0, now + 3.0) is None and late.status()["reached_before_deadline"] is False


async def test_a_curtail_order_survives_a_controller_restart_and_an_expired_one_is_dropped(
    tmp_path: Path,
) -> None:
    """The order in force is kept in state_dir/curtail.json: a new controller resumes it (the same
    target: a fraction keeps its base import) and the site meter holds it; an order that ended
    while the controller was down is dropped with an event."""
    sim = start_pod(tmp_path / "pod", str(_pod_file(tmp_path)))
    try:
        path = tmp_path / "podagent.toml"
        state = tmp_path / "state"
        path.write_text(sim.agent_config(state, extra=POWER, poll_interval_s=0.2))
        config = load_config(path)
        kept = state / "curtail.json"
        first = PowerService(config.power)
        async with running_agent(path, services=[InterlockService(config.interlocks), first]) as agent:
            await until(
                agent,
                lambda: first.decision is not None and first.decision.site_load_w is not None,
                what="the power service running on the site meter",
            )
            order = validate_curtail("c-kept", {"fraction": 0.5, "duration_s": 60.0}, time.time())
            first.accept_curtail(order)
            await until(
                agent,
                lambda: first.curtail is not None and first.curtail.reached_after_s is not None,
                timeout=10.0,
                what="the curtailment reached",
            )
            assert first.curtail is not None
            target = first.curtail.target_w
            assert target is not None and kept.exists()
            assert json.loads(kept.read_text())["import_at_start_w"] == first.curtail.import_at_start_w

        second = PowerService(config.power)
        async with running_agent(path, services=[InterlockService(config.interlocks), second]) as agent:
            await until(agent, lambda: second.curtail is not None, what="the order resumed")
            assert second.curtail is not None and second.curtail.order.id == "c-kept"
            assert second.curtail.target_w == pytest.approx(target)
            kinds = [e.kind for e in agent.events.recent(since_wall=0)]
            assert "curtail_resumed" in kinds
            steps = second.steps
            await until(agent, lambda: second.steps >= steps + 10, what="ten control periods")
            limit = second.curtail.limit_w
            assert limit is not None and limit == pytest.approx(target)
            grid = agent.store.value("site-meter", "power_w")
            assert grid is not None and grid <= target * 1.01 + 100.0, (grid, target)

        # The order ends while no controller runs: the next start drops it, with an event.
        raw = json.loads(kept.read_text())
        raw["start_wall"] = time.time() - 120.0
        kept.write_text(json.dumps(raw))
        third = PowerService(config.power)
        async with running_agent(path, services=[InterlockService(config.interlocks), third]) as agent:
            await until(
                agent,
                lambda: any(e.kind == "curtail_expired" for e in agent.events.recent(since_wall=0)),
                what="the expired order dropped",
            )
            assert third.curtail is None and not kept.exists()
            assert "curtail_resumed" not in [e.kind for e in agent.events.recent(since_wall=0)]
    finally:
        stop_pod(sim)
