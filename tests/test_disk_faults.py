"""Disk faults are conditions, not crashes: the MQTT spool and the audit log on a small tmpfs that
fills up or turns read-only, with polling and the interlocks verified alive throughout.

Mounting a tmpfs needs root (CAP_SYS_ADMIN); where that is not permitted the tests skip, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import agent.audit as audit_mod
import agent.publish.spool as spool_mod
from agent.app import Agent
from agent.audit import AuditLog
from agent.config import load_config
from agent.events import Event, EventBus, Severity
from agent.interlocks.service import InterlockService
from agent.publish.mqtt import MqttService
from agent.publish.spool import EVENT, TELEMETRY, Spool
from tests.agent_helpers import running_agent
from tests.conftest import SimPod
from tests.conftest_mqtt import Mosquitto, Subscriber, mqtt_toml
from tests.test_interlocks_e2e import DEFAULT_W, INTERLOCKS, Truth, event, pod_running


# ---------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    ran = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if ran.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {ran.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def fill(where: Path, leave: int = 0) -> Path:
    """Fill the filesystem, leaving about ``leave`` bytes; returns the filler file."""
    filler = where / "filler"
    st = os.statvfs(where)
    room = st.f_bavail * st.f_frsize - leave
    with filler.open("ab", buffering=0) as f:
        try:
            while room > 0:
                f.write(b"\0" * min(room, 65536))
                room -= 65536
        except OSError:
            pass
    return filler


def telemetry(n: int = 400) -> tuple[int, str, bytes, int]:
    return (TELEMETRY, "t/telemetry/x", b'{"x":"' + os.urandom(n // 2).hex().encode() + b'"}', 10)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "RETRY_MIN_S", 0.01)
    monkeypatch.setattr(spool_mod, "RETRY_MAX_S", 0.05)
    monkeypatch.setattr(spool_mod, "RECOVERY_QUIET_S", 0.0)
    monkeypatch.setattr(audit_mod, "RETRY_S", 0.01)


# ---------------------------------------------------------------------------------- the spool alone
def test_spool_bound_covers_its_disk_use_and_drops_in_small_steps(tmp_path: Path) -> None:
    bound = 256 * 1024
    spool = Spool(tmp_path / "s.sqlite", max_bytes=bound)
    steps = []
    for i in range(1200):
        before = spool.dropped_messages
        spool.append([telemetry()])
        if i % 10 == 0:
            spool.append([(EVENT, "t/event", json.dumps({"n": i}).encode(), 0)])
        steps.append(spool.dropped_messages - before)
        assert spool.disk_bytes() <= bound, f"the spool's files take {spool.disk_bytes()} > {bound} bytes"
    assert spool.dropped_messages > 500
    assert max(steps) <= spool_mod.STEP_ROWS  # a few rows at a time, never a chunk of hundreds
    kept = spool.read(after_id=0, upto_id=spool.max_id(), limit=100_000)
    assert any(m.topic == "t/event" for m in kept) and spool.dropped_events == 0
    spool.close()


def test_spool_events_have_their_own_bounded_allowance(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_bytes=256 * 1024, event_max_bytes=32 * 1024)
    for i in range(800):
        spool.append([(EVENT, "t/event", json.dumps({"n": i, "pad": "e" * 200}).encode(), 0)])
        if i % 3 == 0:
            spool.append([telemetry()])
    assert spool.event_bytes <= 32 * 1024 and spool.dropped_events > 0
    kept = spool.read(after_id=0, upto_id=spool.max_id(), limit=100_000)
    events = [json.loads(m.payload)["n"] for m in kept if m.topic == "t/event"]
    assert events == sorted(events) and events[-1] == 799  # the newest kept, the oldest went
    assert any(m.topic != "t/event" for m in kept)  # telemetry was not starved by the event flood
    spool.close()


def test_spool_on_a_full_then_read_only_disk_holds_and_resumes(tmp_path: Path, quick_retries: None) -> None:
    with tmpfs(tmp_path / "m", "1m") as mnt:
        faults: list[str | None] = []
        spool = Spool(mnt / "s.sqlite", max_bytes=1 << 30, on_fault=faults.append)
        ids = [i for _ in range(50) for i in spool.append([telemetry()])]
        filler = fill(mnt)
        for _ in range(300):  # never raises, whatever the disk says
            ids += spool.append([telemetry()])
            ids += spool.append([(EVENT, "t/event", b'{"e":1}', 0)])
        assert spool.faulty and spool.held > 0 and faults and faults[0] is not None
        assert len([f for f in faults if f is not None]) == 1  # one condition, not one per write
        held = spool.held_messages()
        assert all(m.id < 0 for m in held)
        assert spool.delete([held[0].id]) == 1  # a held message that was published is forgotten
        filler.unlink()
        time.sleep(0.06)
        spool.append([telemetry()])
        assert spool.held == 0 and not spool.faulty and faults[-1] is None
        on_disk = spool.read(after_id=0, upto_id=spool.max_id(), limit=100_000)
        assert len(on_disk) == spool.depth
        spool.close()
        # Read-only: opening and writing hold in memory, never raise; start-up works.
        remount(mnt, "ro")
        try:
            faults.clear()
            again = Spool(mnt / "s.sqlite", max_bytes=1 << 30, on_fault=faults.append)
            assert again.append([telemetry()])[0] < 0 and again.faulty and faults
            again.close()
        finally:
            remount(mnt, "rw")


def test_audit_log_on_a_full_disk_holds_lines_and_resumes(tmp_path: Path, quick_retries: None) -> None:
    with tmpfs(tmp_path / "m", "512k") as mnt:
        bus = EventBus()
        audit = AuditLog(mnt / "audit.jsonl")
        audit.attach(bus)
        bus.emit("interlock_trip", Severity.WARNING, "before", detail={"n": 0})
        filler = fill(mnt)
        for i in range(200):
            bus.emit("noise", Severity.INFO, "x" * 200, detail={"n": i})
        bus.emit("interlock_trip", Severity.WARNING, "during", detail={"n": 1})
        assert audit.fault is not None
        assert [e.kind for e in bus.recent(limit=5000)].count("storage_fault") == 1
        filler.unlink()
        time.sleep(0.02)
        bus.emit("interlock_clear", Severity.INFO, "after")
        assert audit.fault is None
        audit.close()
        lines = [json.loads(x) for x in (mnt / "audit.jsonl").read_text().splitlines()]  # whole lines only
        kinds = [x["kind"] for x in lines]
        assert kinds.count("interlock_trip") == 2 and "storage_recovered" in kinds
        safety = [json.loads(x)["message"] for x in (mnt / "safety.jsonl").read_text().splitlines()]
        assert safety == ["before", "during", "after"]


# ---------------------------------------------------------------------------------- the agent
@contextlib.asynccontextmanager
async def agent_on(
    pod: SimPod, state: Path, port: int, tmp: Path
) -> AsyncIterator[tuple[Agent, MqttService]]:
    mqtt = mqtt_toml([port], telemetry_period_s=0.2, reconnect_min_s=0.2, reconnect_max_s=0.5)
    path = tmp / "podagent.toml"
    text = pod.agent_config(state, extra=INTERLOCKS + mqtt)
    path.write_text(text.replace(f'socket = "{state}/podagent.sock"', f'socket = "{tmp}/podagent.sock"'))
    config = load_config(path)
    service = MqttService(config)
    async with running_agent(path, services=[InterlockService(config.interlocks), service]) as agent:
        yield agent, service


def fresh(agent: Agent, device: str, metric: str, within_s: float) -> bool:
    r = agent.store.get(device, metric)
    return r is not None and time.monotonic() - r.ts_mono <= within_s


async def wait_for(predicate: object, within: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.1)


def storage_events(agent: Agent, kind: str, store: str) -> list[Event]:
    return [e for e in agent.events.recent(limit=2000) if e.kind == kind and e.detail.get("store") == store]


async def test_full_state_dir_broker_down_polling_and_interlocks_go_on_then_spool_resumes(
    tmp_path: Path, quick_retries: None
) -> None:
    broker = Mosquitto()  # its port, not started yet: the broker is down
    with tmpfs(tmp_path / "state", "2m") as state, pod_running(tmp_path) as pod:
        pod.request(cmd="workload", profile="steady", level=0.95)
        truth = Truth(pod)
        sampler = asyncio.create_task(truth.run(), name="truth")
        try:
            async with agent_on(pod, state, broker.port, tmp_path) as (agent, service):
                filler = fill(state, leave=64 * 1024)
                await wait_for(
                    lambda: service.spool is not None and service.spool.faulty, 60, "a spool fault"
                )
                assert storage_events(agent, "storage_fault", "spool")
                # Polling goes on, and so do the interlocks: a GPU runaway is still capped.
                assert fresh(agent, "gpu3", "temp_c", 3.0) and fresh(agent, "cdu-1", "supply_temp_c", 5.0)
                pod.fault("gpu-runaway", "gpu3")
                trip = await event(agent, "interlock_trip", device="gpu3", within=20)
                cap = 0.6 * DEFAULT_W
                await truth.until(lambda s: abs(s.limits[3] - cap) <= 1, within=5, what="gpu3 capped")
                assert trip.detail["gpus"] == ["gpu3"]
                assert service.spool is not None and service.spool.faulty  # still full all along
                assert fresh(agent, "gpu0", "temp_c", 3.0)
            # Start-up with the disk still full: the agent comes up (ready), no crash loop.
            async with agent_on(pod, state, broker.port, tmp_path) as (agent, service):
                assert agent.ready.is_set()
                await wait_for(lambda: service.spool is not None and service.spool.held > 0, 30, "held rows")
                # Space comes back and so does the broker: writes resume and the spool drains.
                filler.unlink()
                broker.start()
                sub = await Subscriber(broker.port).start()
                try:
                    await wait_for(
                        lambda: storage_events(agent, "storage_recovered", "spool"), 30, "recovery"
                    )
                    await sub.wait_for(lambda ms: [m for m in ms if "/telemetry/" in m.topic], timeout=30)
                    await wait_for(lambda: service.link == "connected", 30, "the link")
                    spool = service.spool
                    assert spool is not None
                    await wait_for(lambda: spool.held == 0 and spool.depth < 50, 30, "the spool to drain")
                    assert fresh(agent, "gpu3", "temp_c", 3.0)
                finally:
                    await sub.stop()
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            broker.close()
