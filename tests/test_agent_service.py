"""The agent as a service: systemd notify/watchdog, SIGHUP reload, isolation of slow devices,
Prometheus and health, surviving a driver bug."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.app import Agent
from agent.config import HostDevice, load_config
from agent.model import Quality, Reading
from agent.poller import Poller
from agent.sdnotify import Notifier
from agent.state import DeviceStatus, StateStore
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod
from tests.conftest_mqtt import free_port


class NotifyListener:
    """Plays systemd's side of sd_notify: a datagram socket, every message timestamped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def times(self, line: str) -> list[float]:
        return [t for t, m in self.messages if m == line]

    def wait_for(self, line: str, timeout: float = 10.0) -> None:
        """Until the listener thread has received ``line`` (the sender may be ahead of it)."""
        deadline = time.monotonic() + timeout
        while not self.times(line):
            assert time.monotonic() < deadline, f"no {line!r} within {timeout} s"
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


async def test_systemd_ready_after_first_poll_watchdog_and_stall(
    tiny_pod: SimPod, agent_config_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # WatchdogSec=1: kick every 0.5 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    try:
        config = load_config(agent_config_path)
        agent = Agent(config, config_path=agent_config_path, notifier=Notifier(str(listener.path)))
        task = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.ready.wait(), 30)
        await asyncio.sleep(2.0)
        ready = listener.times("READY=1")
        assert len(ready) == 1
        # READY came only once every device had completed its first poll.
        assert all(p.stats.polls >= 1 for p in agent.pollers.values())
        kicks = listener.times("WATCHDOG=1")
        assert len(kicks) >= 3 and min(kicks) >= ready[0]
        # Stall the loop on purpose (a blocking call where none belongs): no kicks while stalled.
        stall_start = time.monotonic()
        time.sleep(2.5)  # noqa: ASYNC251 - this IS the stall under test
        stall_end = time.monotonic()
        await asyncio.sleep(1.5)
        kicks = listener.times("WATCHDOG=1")
        assert not [t for t in kicks if stall_start + 0.05 < t < stall_end]
        assert [t for t in kicks if t > stall_end]  # and they resume with the loop
        # A poll loop that stops making progress (heartbeat too old) also withholds the kick.
        poller = agent.pollers["controller"]
        assert agent.polling_healthy()
        poller.heartbeat_mono -= 3600
        assert not agent.polling_healthy()
        agent.stop()
        await asyncio.wait_for(task, 15)
        # The datagram is sent; the listener thread may not have read it yet.
        await asyncio.to_thread(listener.wait_for, "STOPPING=1")
        assert listener.messages[-1][1] == "STOPPING=1"  # and no kick after it
    finally:
        listener.close()


async def test_sighup_reloads_a_valid_config_and_refuses_a_bad_one(
    tiny_pod: SimPod, agent_config_path: Path
) -> None:
    async with running_agent(agent_config_path) as agent:
        pdu_b = agent.pollers["pdu-b"]
        original = agent_config_path.read_text()
        # Change only pdu-a's interval: pdu-a restarts, the others keep polling untouched.
        changed = re.sub(r'(id = "pdu-a"\n(?:.*\n)*?poll_interval_s = )1\.0', r"\g<1>2.0", original, count=1)
        assert changed != original
        agent_config_path.write_text(changed)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(agent, lambda: agent.reloads == 1, what="reload applied")
        assert agent.pollers["pdu-b"] is pdu_b
        assert agent.pollers["pdu-a"].cfg.poll_interval_s == 2.0
        polls = pdu_b.stats.polls
        agent_config_path.write_text(changed.replace('kind = "host"', 'kind = "host"\nbogus_key = 1'))
        os.kill(os.getpid(), signal.SIGHUP)
        await until(agent, lambda: pdu_b.stats.polls >= polls + 2, what="polling goes on")
        assert agent.reloads == 1  # refused: the old config is kept
        assert agent.pollers["pdu-a"].cfg.poll_interval_s == 2.0
        assert set(agent.pollers) == {"gpus", "pdu-a", "pdu-b", "cdu-1", "chiller-1", "meter-1", "controller"}


async def test_a_pdu_answering_after_5_s_delays_no_other_device(
    tiny_pod: SimPod, agent_config_path: Path
) -> None:
    async with running_agent(agent_config_path) as agent:
        tiny_pod.fault("snmp-slow", "pdu-a", value=5)
        await until(
            agent,
            lambda: agent.store.health()["pdu-a"].status is DeviceStatus.ERROR,
            timeout=20,
            what="pdu-a times out",
        )
        others = {d: p for d, p in agent.pollers.items() if d not in ("pdu-a", "controller")}
        before = {d: (p.stats.polls, p.stats.missed_deadlines) for d, p in others.items()}
        slow_before = agent.pollers["pdu-a"].stats.polls
        await until(
            agent,
            lambda: all(p.stats.polls >= before[d][0] + 4 for d, p in others.items()),
            timeout=40,
            what="4 more polls of every other device",
        )
        # Had pdu-a's 5 s delays leaked into the others, each of their polls would wait behind one
        # of pdu-a's: they would miss a deadline on most polls and poll no faster than pdu-a.
        for d, p in others.items():
            polls = p.stats.polls - before[d][0]
            missed = p.stats.missed_deadlines - before[d][1]
            assert missed < polls / 2, (d, polls, missed)
            assert agent.store.health()[d].status is DeviceStatus.OK, d
        slow_polls = agent.pollers["pdu-a"].stats.polls - slow_before
        assert all(p.stats.polls - before[d][0] > slow_polls for d, p in others.items())
        tiny_pod.fault("snmp-slow", "pdu-a", clear=True)


async def test_prometheus_metrics_and_health(tiny_pod: SimPod, tmp_path: Path) -> None:
    port = free_port()
    config_path = tmp_path / "podagent.toml"
    config_path.write_text(
        tiny_pod.agent_config(tmp_path / "state", extra=f'[prometheus]\nlisten = "127.0.0.1:{port}"\n')
    )

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    async with running_agent(config_path) as agent:
        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        temp = re.search(
            r'^DCGM_FI_DEV_GPU_TEMP\{gpu="3",UUID="(GPU-[0-9a-f-]+)",.*device="nvidia3".*\} ([0-9.]+)$',
            body,
            re.M,
        )
        assert temp, body[:2000]
        # No sample timestamps (they would disable Prometheus' staleness handling).
        assert temp.group(1) == agent.store.info("gpu3")["uuid"]
        for reason in ("sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake"):
            assert re.search(
                rf'^podagent_gpu_clock_event_active\{{gpu="0",.*reason="{reason}"\}} [01]$', body, re.M
            )
        assert 'podagent_pdu_phase_current_amperes{device="pdu-a",phase="1"}' in body
        assert 'podagent_cdu_supply_temp_celsius{device="cdu-1"}' in body
        assert 'podagent_device_up{device="pdu-a"} 1' in body
        assert re.search(r'^podagent_gpu_nvml_errors_total\{gpu="0",.*\} 0$', body, re.M)
        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        tiny_pod.fault("snmp-timeout", "pdu-a")
        await until(agent, lambda: agent.store.health()["pdu-a"].status is DeviceStatus.ERROR, timeout=20)
        status, body = await asyncio.to_thread(get, "/healthz")
        assert status == 503
        assert "pdu-a" in json.loads(body)["devices"]
        _, metrics = await asyncio.to_thread(get, "/metrics")
        assert 'podagent_device_up{device="pdu-a"} 0' in metrics
        assert 'podagent_pdu_phase_current_amperes{device="pdu-a"' not in metrics  # no value: no sample


class ExplodingDriver:
    """A driver with a bug: every third poll raises something no driver should raise."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.opens = 0
        self.polls = 0

    async def open(self) -> None:
        self.opens += 1

    async def poll(self) -> list[Reading]:
        self.polls += 1
        if self.polls % 3 == 0:
            raise ZeroDivisionError("driver bug")
        return [Reading(self.device_id, "value_pct", float(self.polls))]

    async def close(self) -> None:
        pass


async def test_a_driver_bug_restarts_the_driver_not_the_daemon() -> None:
    store = StateStore()
    cfg = HostDevice(id="buggy", kind="host", poll_interval_s=0.05)
    driver = ExplodingDriver("buggy")
    poller = Poller(cfg, driver, store)
    task = asyncio.create_task(poller.run())
    try:
        async with asyncio.timeout(10):
            while poller.stats.driver_restarts < 2 or store.value("buggy", "value_pct") is None:
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert driver.opens >= 3  # re-opened after each crash
    assert poller.stats.failures == poller.stats.driver_restarts
    r = store.get("buggy", "value_pct")
    assert r is not None and r.quality is Quality.GOOD


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify passes (ExecStart pointed at this checkout's podagent)."""
    root = Path(__file__).resolve().parent.parent
    unit = (root / "systemd" / "podagent.service").read_text()
    exe = Path(os.environ.get("VIRTUAL_ENV", root / ".venv")) / "bin" / "podagent"
    if not exe.exists():
        exe = root / ".venv" / "bin" / "podagent"
    local = tmp_path / "podagent.service"
    local.write_text(unit.replace("/opt/podagent/.venv/bin/podagent", str(exe)))
    res = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for key in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=podagent",
        "RuntimeDirectory=podagent",
        "CapabilityBoundingSet=CAP_SYS_ADMIN",
    ):
        assert key in unit


class CancelSwallowingService:
    """Reproduces Python 3.11's asyncio.wait_for race as it bit the MQTT publisher in CI: a child
    of the service's own TaskGroup loses the group's one cancel and keeps looping."""

    def __init__(self) -> None:
        self.swallowed = asyncio.Event()
        self.child_stopped = False

    async def _child(self) -> None:
        try:
            while True:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    if self.swallowed.is_set():
                        raise
                    self.swallowed.set()  # the race: carry on as if the wait had completed
        finally:
            self.child_stopped = True

    async def run(self, agent: Agent) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._child(), name="swallower")


async def test_a_cancel_lost_deep_inside_a_service_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "podagent.toml"
    path.write_text(
        f'[pod]\nsite = "lab"\nid = "t"\n[paths]\nstate_dir = "{tmp_path / "state"}"\n'
        '[prometheus]\nenabled = false\n[[device]]\nid = "host"\nkind = "host"\n'
    )
    service = CancelSwallowingService()
    async with running_agent(path, services=[service]) as agent:
        assert not service.child_stopped
    # running_agent's exit awaited agent.run(): it returned although the child lost a cancel.
    assert service.swallowed.is_set()
    assert service.child_stopped
    assert agent._tg is None


def test_supervisor_kicks_at_half_the_watchdog_and_checks_rarely_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent.app import STALL_CHECK_S, supervise_interval_s

    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert supervise_interval_s() == 15.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert supervise_interval_s() == STALL_CHECK_S >= 30.0  # an idle agent is not woken for nothing
