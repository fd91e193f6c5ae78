"""The agent against a running simulated `tiny` pod over real UDP, TCP and a pty RTU line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.model import Quality
from agent.state import DeviceStatus
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod

EXPECTED_DEVICES = {"gpus", "pdu-a", "pdu-b", "cdu-1", "chiller-1", "meter-1", "controller"}


def good(agent, device: str, metric: str) -> bool:  # type: ignore[no-untyped-def]
    r = agent.store.get(device, metric)
    return r is not None and r.quality is Quality.GOOD and r.value is not None


async def test_sees_every_device_and_metric_with_good_quality(
    tiny_pod: SimPod, agent_config_path: Path
) -> None:
    async with running_agent(agent_config_path) as agent:
        assert set(agent.pollers) == EXPECTED_DEVICES
        truth = tiny_pod.state()
        for i in range(8):
            for metric in (
                "temp_c",
                "power_w",
                "power_limit_w",
                "energy_mj",
                "util_gpu_pct",
                "clock_sm_mhz",
                "throttle_sw_power_cap",
                "throttle_hw_thermal",
                "xid_total",
                "nvml_errors_total",
            ):
                assert good(agent, f"gpu{i}", metric), (i, metric)
        for metric in ("power_w", "phase1_current_a", "phase3_voltage_v", "outlet1_power_w", "outlet2_on"):
            assert good(agent, "pdu-a", metric), metric
            assert good(agent, "pdu-b", metric), metric
        for metric in ("supply_temp_c", "return_temp_c", "flow_lpm", "pump_running", "leak", "setpoint_c"):
            assert good(agent, "cdu-1", metric), metric
        for metric in ("supply_temp_c", "running", "tripped"):
            assert good(agent, "chiller-1", metric), metric
        assert good(agent, "meter-1", "power_w")
        assert good(agent, "controller", "cpu_pct")
        # Values agree with the simulator's truth (within what changes between poll and now).
        assert agent.store.value("cdu-1", "setpoint_c") == truth["cdus"][0]["setpoint_c"]
        assert agent.store.value("gpus", "power_w") is None  # per-GPU devices, not the driver's id
        assert agent.store.value("gpu0", "power_limit_w") == truth["gpus"][0]["power_limit_w"]
        # Derived: the pod's power is the sum of its PDUs (the meter, measuring them, is not added).
        await until(agent, lambda: agent.store.get("pod", "power_w") is not None, what="pod power")
        pod = agent.store.get("pod", "power_w")
        a, b = agent.store.get("pdu-a", "power_w"), agent.store.get("pdu-b", "power_w")
        assert pod is not None and a is not None and b is not None
        assert a.value is not None and b.value is not None
        assert pod.value == pytest.approx(a.value + b.value), (pod, a, b)
        for reading, i in ((a, 0), (b, 1)):  # each PDU agrees with the simulator (power moves between polls)
            assert reading.value == pytest.approx(truth["pdus"][i]["power_w"], rel=0.35), (
                reading,
                truth["pdus"][i],
            )
        assert good(agent, "cdu-1", "gpu_heat_load_kw")
        assert all(
            h.current_status(time.monotonic()) is DeviceStatus.OK for h in agent.store.health().values()
        )
        # Every reading carries its age.
        assert all(r.age_s() < 5 for r in agent.store.readings().values())
        # The GPU labels a dashboard needs came from NVML.
        assert agent.store.info("gpu3")["uuid"].startswith("GPU-")


async def _fault_marks_only_that_device(
    tiny_pod: SimPod, config: Path, fault: str, device: str, metric: str
) -> None:
    async with running_agent(config) as agent:
        others = [p for d, p in agent.pollers.items() if d != device and d not in ("controller",)]
        tiny_pod.fault(fault, device)
        target = device
        await until(
            agent,
            lambda: (r := agent.store.get(target, metric)) is not None and r.quality is Quality.ERROR,
            timeout=20,
            what=f"{target}.{metric} ERROR",
        )
        assert agent.store.get(target, metric).value is None  # type: ignore[union-attr]
        # The others keep their cadence: each completes polls while the faulty one fails.
        # Counted from here: the first open() and the fault's onset are not what is measured.
        counts = {p.device_id: (p.stats.polls, p.stats.missed_deadlines) for p in others}
        checked = [p for p in others if not (device.startswith("gpu") and p.device_id == "gpus")]
        await until(
            agent,
            lambda: all(p.stats.polls - counts[p.device_id][0] >= 3 for p in checked),
            timeout=30,
            what="3 more polls of every other device",
        )
        for p in checked:
            polls = p.stats.polls - counts[p.device_id][0]
            missed = p.stats.missed_deadlines - counts[p.device_id][1]
            # A leak of the fault's timeouts into this loop would miss a deadline on most polls.
            assert missed < polls / 2, (p.device_id, polls, missed)
        for d, h in agent.store.health().items():
            if d not in (device, "gpus"):
                assert h.current_status(time.monotonic()) is DeviceStatus.OK, d
        tiny_pod.fault(fault, device, clear=True)
        await until(
            agent, lambda: good(agent, target, metric), timeout=40, what=f"{target}.{metric} recovers"
        )


async def test_snmp_timeout_marks_only_that_pdu(tiny_pod: SimPod, agent_config_path: Path) -> None:
    await _fault_marks_only_that_device(
        tiny_pod, agent_config_path, "snmp-timeout", "pdu-a", "phase1_current_a"
    )


async def test_modbus_exception_marks_only_that_unit(tiny_pod: SimPod, agent_config_path: Path) -> None:
    await _fault_marks_only_that_device(
        tiny_pod, agent_config_path, "modbus-exception", "cdu-1", "supply_temp_c"
    )


async def test_gpu_lost_marks_only_that_gpu_and_counts_nvml_errors(
    tiny_pod: SimPod, agent_config_path: Path
) -> None:
    async with running_agent(agent_config_path) as agent:
        tiny_pod.fault("gpu-lost", "gpu5")
        await until(agent, lambda: agent.store.value("gpu5", "lost") == 1.0, what="gpu5 lost")
        r = agent.store.get("gpu5", "temp_c")
        assert r is not None and r.quality is Quality.ERROR and "GPU_IS_LOST" in (r.error or "")
        errors_before = agent.store.value("gpu5", "nvml_errors_total") or 0
        await until(
            agent,
            lambda: (agent.store.value("gpu5", "nvml_errors_total") or 0) > errors_before,
            what="error counter rises",
        )
        assert good(agent, "gpu4", "temp_c") and good(agent, "gpu6", "temp_c")
        tiny_pod.fault("gpu-lost", "gpu5", clear=True)
        await until(
            agent,
            lambda: good(agent, "gpu5", "temp_c") and agent.store.value("gpu5", "lost") == 0.0,
            what="gpu5 back",
        )


async def test_two_identical_xids_count_as_two(tiny_pod: SimPod, agent_config_path: Path) -> None:
    async with running_agent(agent_config_path) as agent:
        base = agent.store.value("gpu2", "xid_total") or 0
        seen: list[str] = []
        agent.events.subscribe(lambda e: seen.append(e.kind) if e.device == "gpu2" else None)
        tiny_pod.fault("xid", "gpu2", value=79)
        tiny_pod.fault("xid", "gpu2", value=79)
        await until(agent, lambda: (agent.store.value("gpu2", "xid_total") or 0) >= base + 2, what="2 xids")
        assert agent.store.value("gpu2", "xid_total") == base + 2
        assert agent.store.value("gpu2", "xid_last") == 79
        await until(agent, lambda: seen.count("xid") >= 2, timeout=5, what="2 xid events")


async def test_dead_unit_on_shared_rtu_line_loses_no_other_units_readings(
    tiny_pod: SimPod, agent_config_path: Path
) -> None:
    async with running_agent(agent_config_path) as agent:
        tiny_pod.fault("modbus-timeout", "chiller-1")  # unit 1 on rtu0 goes silent
        await until(
            agent, lambda: agent.store.health()["chiller-1"].status is DeviceStatus.ERROR, what="chiller down"
        )
        meter = agent.pollers["meter-1"]
        polls, failures = meter.stats.polls, meter.stats.failures
        await until(agent, lambda: meter.stats.polls >= polls + 3, timeout=15, what="meter polls on")
        assert meter.stats.failures == failures
        assert good(agent, "meter-1", "power_w") and good(agent, "meter-1", "phase2_current_a")
