"""The typed actuators against the simulated pod: read-back, verification, failures as events."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.actuators import ActuationError
from agent.drivers.snmp import SnmpDriver
from agent.events import Event
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod


async def test_point_writer_reads_back_and_reports_a_refused_write_once(
    tiny_pod: SimPod, agent_config_path: Path
) -> None:
    async with running_agent(agent_config_path) as agent:
        seen: list[Event] = []
        agent.events.subscribe(seen.append)
        points = agent.actuators.points
        assert await points.write("cdu-1", "setpoint_c", 22.5, reason="test") == pytest.approx(22.5)
        state = tiny_pod.state()
        assert state["cdus"][0]["setpoint_c"] == pytest.approx(22.5)
        for _ in range(2):  # out of the profile's range: refused before any I/O, reported once
            with pytest.raises(ActuationError, match="below"):
                await points.write("cdu-1", "setpoint_c", -40.0, reason="test")
        failed = [e for e in seen if e.kind == "actuation_failed"]
        assert len(failed) == 1 and failed[0].device == "cdu-1"
        assert failed[0].detail["action"] == "write setpoint_c" and failed[0].detail["reason"] == "test"
        await points.write("cdu-1", "setpoint_c", 20.0, reason="test")
        assert [e.kind for e in seen if e.kind == "actuation_recovered"] == ["actuation_recovered"]
        with pytest.raises(ActuationError, match="no writable points"):
            await points.write("pdu-a", "setpoint_c", 20.0, reason="test")


async def test_outlet_switch_verifies_the_outlet_reads_off(tiny_pod: SimPod, agent_config_path: Path) -> None:
    async with running_agent(agent_config_path) as agent:
        seen: list[Event] = []
        agent.events.subscribe(seen.append)
        await until(agent, lambda: agent.store.value("pdu-a", "outlet2_on") == 1.0, what="outlet 2 on")
        await agent.actuators.outlets.switch_off("pdu-a", 2, reason="test")
        assert agent.store.value("pdu-a", "outlet2_on") == 0.0  # read back by the switch itself
        with pytest.raises(ActuationError, match="no such PDU"):
            await agent.actuators.outlets.switch_off("pdu-z", 2, reason="test")
        assert [e.device for e in seen if e.kind == "actuation_failed"] == ["pdu-z"]
        async with agent.pollers["pdu-a"].exclusive() as driver:
            assert isinstance(driver, SnmpDriver)
            await driver.set_outlet(2, True)


async def test_power_limiter_sets_and_reads_back_gpu_caps(tiny_pod: SimPod, agent_config_path: Path) -> None:
    async with running_agent(agent_config_path) as agent:
        power = agent.actuators.power
        results = await power.set_caps({"gpu1": 400.0, "gpu2": 450.0, "gpu99": 400.0})
        assert results["gpu1"].ok and results["gpu1"].readback_w == pytest.approx(400.0)
        assert results["gpu2"].ok and results["gpu2"].readback_w == pytest.approx(450.0)
        assert not results["gpu99"].ok and results["gpu99"].error
        await until(agent, lambda: agent.store.value("gpu1", "power_limit_w") == 400.0, what="polled")
        assert (await power.read_limits(["gpu1"]))["gpu1"] == pytest.approx(400.0)
        default = agent.store.value("gpu1", "default_power_limit_w")
        assert default is not None
        await power.set_caps({"gpu1": default, "gpu2": default})
