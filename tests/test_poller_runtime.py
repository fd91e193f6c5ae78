"""The poller's runtime contract: one down/up record per transition, one exchange in flight per
device, a dead unit on a shared RTU line does not starve its neighbours, staggered deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog

from agent.config import HostDevice
from agent.events import Event
from agent.model import Reading
from agent.poller import Poller, phase_offset
from agent.state import DeviceStatus, StateStore
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod


def _transitions(events: list[Event], device: str) -> list[str]:
    return [e.kind for e in events if e.device == device and e.kind in ("device_down", "device_up")]


async def _down_and_up_once(tiny_pod: SimPod, config: Path, fault: str, device: str) -> None:
    async with running_agent(config) as agent:
        seen: list[Event] = []
        unsubscribe = agent.events.subscribe(seen.append)
        poller = agent.pollers[device]
        try:
            with structlog.testing.capture_logs() as logs:
                tiny_pod.fault(fault, device)
                await until(agent, lambda: poller.up is False, timeout=30, what=f"{device} down")
                # Several failed cycles while it stays down: still one record.
                failures = poller.stats.failures
                await until(agent, lambda: poller.stats.failures >= failures + 2, timeout=60, what="more")
                tiny_pod.fault(fault, device, clear=True)
                await until(agent, lambda: poller.up is True, timeout=150, what=f"{device} back")
                # A few good cycles after the return: no further up.
                polls = poller.stats.polls
                await until(agent, lambda: poller.stats.polls >= polls + 3, timeout=30, what="polls")
        finally:
            tiny_pod.fault(fault, device, clear=True)
            unsubscribe()
        assert _transitions(seen, device) == ["device_down", "device_up"]
        down = next(e for e in seen if e.kind == "device_down" and e.device == device)
        assert down.detail["reason"]  # says why
        up = next(e for e in seen if e.kind == "device_up" and e.device == device)
        assert "again after" in up.detail["reason"]
        lines = [
            (entry["event"], entry.get("reason"))
            for entry in logs
            if entry.get("device") == device and entry["event"] in ("device down", "device up")
        ]
        assert [e for e, _ in lines] == ["device down", "device up"], lines
        assert all(reason for _, reason in lines)
        # No driver logs a transition of its own.
        assert not [e for e in logs if "unavailable" in e["event"] or "recovered" in e["event"]], logs


async def test_snmp_pdu_killed_and_restored_is_one_down_and_one_up(
    tiny_pod: SimPod, agent_config_path: Path
) -> None:
    await _down_and_up_once(tiny_pod, agent_config_path, "snmp-timeout", "pdu-a")


async def test_modbus_unit_killed_and_restored_is_one_down_and_one_up(
    tiny_pod: SimPod, agent_config_path: Path
) -> None:
    await _down_and_up_once(tiny_pod, agent_config_path, "modbus-timeout", "cdu-1")


async def test_dead_rtu_unit_leaves_its_line_neighbour_its_cadence(
    tiny_pod: SimPod, agent_config_path: Path
) -> None:
    async with running_agent(agent_config_path) as agent:
        chiller, meter = agent.pollers["chiller-1"], agent.pollers["meter-1"]
        assert chiller.bus is not None and chiller.bus == meter.bus  # one serial line
        try:
            tiny_pod.fault("modbus-timeout", "chiller-1")
            await until(agent, lambda: chiller.up is False, timeout=30, what="chiller-1 down")
            loop = asyncio.get_running_loop()
            polls, t0 = meter.stats.polls, loop.time()
            await asyncio.sleep(12.0)  # the measurement window (not a synchronisation)
            done, elapsed = meter.stats.polls - polls, loop.time() - t0
        finally:
            tiny_pod.fault("modbus-timeout", "chiller-1", clear=True)
        expected = elapsed / meter.cfg.poll_interval_s
        assert done / expected >= 0.9, (done, expected)
        assert agent.store.health()["meter-1"].status is DeviceStatus.OK


class SlowDriver:
    """Counts how many exchanges overlap on its one connection."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.active = 0
        self.most = 0
        self.polls = 0

    async def open(self) -> None:
        pass

    async def _exchange(self) -> None:
        self.active += 1
        self.most = max(self.most, self.active)
        await asyncio.sleep(0.02)
        self.active -= 1

    async def poll(self) -> list[Reading]:
        self.polls += 1
        await self._exchange()
        return [Reading(self.device_id, "value_pct", float(self.polls))]

    async def poll_raw(self) -> list[int]:
        await self._exchange()
        return [self.polls]

    async def close(self) -> None:
        pass


async def test_scheduled_polls_podctl_polls_and_actuations_never_overlap_on_a_device() -> None:
    store = StateStore()
    driver = SlowDriver("slow")
    poller = Poller(HostDevice(id="slow", kind="host", poll_interval_s=0.01), driver, store)
    task = asyncio.create_task(poller.run())

    async def actuate() -> None:
        async with poller.exclusive() as drv:
            assert drv is driver
            await driver._exchange()

    try:
        await asyncio.wait_for(poller.first_cycle.wait(), 5)
        for _ in range(5):
            await asyncio.gather(poller.poll_once(), poller.poll_raw(), actuate(), poller.poll_once())
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert driver.polls >= 11
    assert driver.most == 1


def test_deadlines_sit_at_a_stable_phase_spread_over_the_interval() -> None:
    assert phase_offset("pdu-a", 1.0) == phase_offset("pdu-a", 1.0)
    phases = [phase_offset(f"pdu-{i}", 1.0) for i in range(32)]
    assert all(0.0 <= p < 1.0 for p in phases)
    # 32 PDUs spread over the second: no tenth of it holds more than a third of them.
    tenths = [sum(1 for p in phases if k / 10 <= p < (k + 1) / 10) for k in range(10)]
    assert max(tenths) <= 32 // 3, tenths
    poller = Poller(HostDevice(id="pdu-7", kind="host", poll_interval_s=2.0), SlowDriver("x"), StateStore())
    nxt = poller._next_phase(100.3)
    assert nxt > 100.3 and nxt - 100.3 <= 2.0
    assert (nxt - poller.phase_s) / 2.0 == round((nxt - poller.phase_s) / 2.0)


class HangingDriver:
    """A driver whose poll hangs until ``release`` is set (a bug, or a device that never ends its
    answer), counting polls."""

    def __init__(self, device_id: str, *, swallow_cancel: bool = False) -> None:
        self.device_id = device_id
        self.release = asyncio.Event()
        self.polls = 0
        self.swallow_cancel = swallow_cancel

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def poll(self) -> list[Reading]:
        self.polls += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            if not self.swallow_cancel:
                raise
        return [Reading(self.device_id, "cpu_pct", 1.0, "%")]


async def test_a_hung_cycle_fails_at_its_budget_and_the_loop_goes_on() -> None:
    """The budget guard (a timer that cancels the cycle): the cycle is a failure with the budget in
    its reason, the loop keeps its task (no cancel left pending on it) and polls again."""
    store = StateStore()
    driver = HangingDriver("hung")
    cfg = HostDevice(id="hung", kind="host", poll_interval_s=0.05, timeout_s=0.05, retries=0)
    poller = Poller(cfg, driver, store)
    task = asyncio.create_task(poller.run())
    try:
        await asyncio.wait_for(poller.first_cycle.wait(), 10)
        assert poller.up is False and poller.stats.failures == 1
        assert store.health()["hung"].last_error == f"no answer within {poller.budget_s:.1f} s"
        assert task.cancelling() == 0
        driver.release.set()  # the device answers again: the loop is still there to see it
        await asyncio.wait_for(_until(lambda: poller.up is True), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_cancel_that_is_not_the_guards_ends_the_loop() -> None:
    store = StateStore()
    driver = HangingDriver("hung")
    poller = Poller(HostDevice(id="hung", kind="host", poll_interval_s=0.05), driver, store)
    task = asyncio.create_task(poller.run())
    await asyncio.wait_for(_until(lambda: driver.polls == 1), 10)
    task.cancel()  # shutdown, mid-cycle
    done, _ = await asyncio.wait({task}, timeout=10)
    assert task in done and task.cancelled()
    assert poller.stats.failures == 0  # not mistaken for a timeout


async def test_a_driver_that_swallows_the_guards_cancel_leaves_none_pending() -> None:
    """As with asyncio.timeout: the guard's cancel is withdrawn even when the driver caught it and
    returned readings; the loop must not die of it at its next turn."""
    store = StateStore()
    driver = HangingDriver("hung", swallow_cancel=True)
    cfg = HostDevice(id="hung", kind="host", poll_interval_s=0.05, timeout_s=0.05, retries=0)
    poller = Poller(cfg, driver, store)
    task = asyncio.create_task(poller.run())
    try:
        await asyncio.wait_for(_until(lambda: driver.polls >= 2), 30)
        assert not task.done() and task.cancelling() == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.01)


def test_pdus_share_a_phase_unless_told_otherwise() -> None:
    """SNMP PDUs are polled at one instant of the interval (poll_phase "pdus", as nodes share
    "nodes"); "" puts a PDU back on its id's own phase."""
    from agent.config import SnmpDevice

    def phase(**kw: object) -> float:
        cfg = SnmpDevice(kind="snmp", profile="apc-rpdu2", host="127.0.0.1", community="public", **kw)  # type: ignore[arg-type]
        return Poller(cfg, SlowDriver(cfg.id), StateStore()).phase_s

    assert phase(id="pdu-1") == phase(id="pdu-2") == phase_offset("pdus", 1.0)
    assert phase(id="pdu-1", poll_phase="") == phase_offset("pdu-1", 1.0)
    assert phase(id="pdu-1", poll_phase="row-b") == phase(id="pdu-9", poll_phase="row-b")


class BadCadenceDriver:
    """A driver that answers, but whose ``metric_every`` (called by the poller after the poll,
    outside the driver's own error handling) raises, as a driver bug would."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.polls = 0

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def poll(self) -> list[Reading]:
        self.polls += 1
        return [Reading(self.device_id, "cpu_pct", 1.0, "%")]

    def metric_every(self, metric: str) -> int:
        raise RuntimeError(f"no cadence for {metric}")


async def test_a_bug_in_the_bookkeeping_after_a_poll_does_not_end_the_loop() -> None:
    store = StateStore()
    driver = BadCadenceDriver("buggy")
    poller = Poller(HostDevice(id="buggy", kind="host", poll_interval_s=0.05), driver, store)
    task = asyncio.create_task(poller.run())
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.wait_for(_until(lambda: poller.stats.bookkeeping_errors >= 3), 30)
        assert not task.done()  # the device's loop lives on, and keeps polling
        assert driver.polls >= 3
        failed = [e for e in logs if e["event"].startswith("poll bookkeeping failed")]
        assert len(failed) == 1 and "no cadence for cpu_pct" in failed[0]["error"]  # once, not per cycle
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
