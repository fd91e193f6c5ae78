"""Store and forward: broker outages, kill -9 of the agent mid-outage, failover to a second broker.

The fleet subscriber uses a persistent session (clean_session false, QoS 1) and the broker keeps
it across a graceful restart (persistence on), as a fleet backend would; so what the agent replays
before the subscriber is back still reaches it. Outages are 5 s here (the issue's 20 s and the
bench's 60 s are in bench/mqtt_outage.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest_mqtt import (
    ROOT,
    Mosquitto,
    Subscriber,
    assert_no_gaps,
    mqtt_toml,
    seq_report,
    tiny_pod_process,
)
from tests.test_mqtt_link import running_agent, write_config

OUTAGE_S = 20.0  # as the issue asks; the bench (bench/mqtt_outage.py) runs a 60 s outage


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tiny_pod_process(tmp_path_factory.mktemp("pod")) as manifest:
        yield manifest


class PersistentMosquitto(Mosquitto):
    def write_conf(self) -> Path:
        path = super().write_conf()
        store = self.dir / "db"
        store.mkdir(exist_ok=True)
        os.chmod(store, 0o777)
        text = path.read_text().replace(
            "persistence false\n", f"persistence true\npersistence_location {store}/\n"
        )
        path.write_text(text)
        return path

    def stop_gracefully(self) -> None:
        """SIGTERM: mosquitto saves its sessions (the fleet subscriber's queue) before exiting."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


async def fleet_subscriber(port: int, name: str = "fleet-test") -> Subscriber:
    return await Subscriber(port, kwargs={"identifier": name, "clean_session": False}).start()


def durable_seqs(sub: Subscriber) -> dict[str, list[int]]:
    return seq_report(sub.messages)


def historical_count(sub: Subscriber) -> int:
    return sum(1 for m in sub.messages if "/telemetry/" in m.topic and m.json().get("historical"))


async def test_broker_outage_replays_every_seq(pod: dict[str, Any], tmp_path: Path) -> None:
    b = PersistentMosquitto()
    b.start()
    try:
        sub = await fleet_subscriber(b.port)
        mqtt = mqtt_toml([b.port], telemetry_period_s=0.5, reconnect_min_s=0.2, reconnect_max_s=1.0)
        async with running_agent(write_config(pod, tmp_path, mqtt)) as (_agent, service):
            await sub.wait_for(lambda ms: len(sub.on("/telemetry/gpu0")) >= 2, timeout=15)
            b.stop_gracefully()
            await asyncio.sleep(OUTAGE_S)  # the outage itself: time is the point here
            assert service.link != "connected"
            depth = service.spool.depth if service.spool else 0
            assert depth > 0  # the outage's data waits on disk
            b.start()
            await sub.wait_for(lambda ms: historical_count(sub) > 0, timeout=15)
            # Everything made so far arrives: up to the seq assigned now, no gap.
            await asyncio.sleep(0)
            target = service._seq

            # Live messages go out before the backlog, so a seq above the target can arrive while
            # earlier ones are still in flight: wait for all of 1..target, then name any missing.
            def everything_arrived(ms: object) -> bool:
                got = set(durable_seqs(sub).get(service.boot_id, []))
                return all(s in got for s in range(1, target + 1))

            with contextlib.suppress(TimeoutError):
                await sub.wait_for(everything_arrived, timeout=30)
            seqs = durable_seqs(sub)[service.boot_id]
            assert_no_gaps(seqs, upto=target)
            # Duplicates only as QoS 1 allows (the messages in flight when the link broke, each
            # standing for up to replay_batch spooled rows).
            assert len(seqs) - len(set(seqs)) <= service.cfg.replay_window * service.cfg.replay_batch
            assert service.spool is not None
            assert service.spool.dropped_messages == 0
            # The replay batched a device's spooled rows (replay_batch) into fewer messages.
            batched = [m.json() for m in sub.messages if "/telemetry/" in m.topic and "seqs" in m.json()]
            assert batched and all(len(b["seqs"]) <= service.cfg.replay_batch for b in batched)
        await sub.stop()
    finally:
        b.close()


async def test_kill9_mid_outage_old_boot_arrives(pod: dict[str, Any], tmp_path: Path) -> None:
    b = PersistentMosquitto()
    b.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sub = await fleet_subscriber(b.port)
        mqtt = mqtt_toml([b.port], telemetry_period_s=0.5, reconnect_min_s=0.2, reconnect_max_s=1.0)
        path = write_config(pod, tmp_path, mqtt)

        def start_agent() -> subprocess.Popen[bytes]:
            p = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(p)
            return p

        first = start_agent()
        online = await sub.wait_for(lambda ms: list(sub.on("/telemetry/gpu0")), timeout=20)
        old_boot = online[0].json()["boot_id"]
        seen_before = max(durable_seqs(sub)[old_boot])
        b.stop_gracefully()
        await asyncio.sleep(OUTAGE_S / 2)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(5)
        second = start_agent()
        await asyncio.sleep(OUTAGE_S / 2)
        b.start()

        def new_boot_live(ms: list[Any]) -> bool:
            bodies = [m.json() for m in ms if "/telemetry/" in m.topic]
            return any(x["boot_id"] not in (old_boot,) and not x.get("historical") for x in bodies)

        await sub.wait_for(new_boot_live, timeout=30)
        # The old boot's spooled data all arrives, marked historical, with no gap in its seqs.
        await sub.wait_for(lambda ms: historical_count(sub) > 0, timeout=10)
        old = durable_seqs(sub)[old_boot]
        assert max(old) > seen_before + 4  # what the old boot spooled during the outage arrived
        assert_no_gaps(old)
        hist = [m.json() for m in sub.messages if "/telemetry/" in m.topic and m.json().get("historical")]
        assert {h["boot_id"] for h in hist} >= {old_boot}
        second.send_signal(signal.SIGTERM)
        second.wait(15)
        await sub.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        b.close()


async def test_failover_to_second_broker(pod: dict[str, Any], tmp_path: Path) -> None:
    first, second = Mosquitto(), Mosquitto()
    first.start()
    second.start()
    try:
        sub1 = await Subscriber(first.port).start()
        sub2 = await Subscriber(second.port).start()
        mqtt = mqtt_toml(
            [first.port, second.port], telemetry_period_s=0.5, reconnect_min_s=0.2, reconnect_max_s=1.0
        )
        async with running_agent(write_config(pod, tmp_path, mqtt)) as (_, service):
            await sub1.wait_for(lambda ms: len(sub1.on("/telemetry/gpu0")) >= 2, timeout=15)
            assert service.broker == f"127.0.0.1:{first.port}"
            # The node dies for good: frozen first, so what it never answered stays unacknowledged
            # at the agent, then killed. (A broker killed mid-work can lose messages it PUBACKed
            # but had not yet written to its subscribers: no publisher can see or repair that.)
            assert first.proc is not None
            first.proc.send_signal(signal.SIGSTOP)
            frozen_at = service._seq
            await asyncio.sleep(1.5)  # the agent goes on publishing into the frozen node
            assert service._seq > frozen_at
            first.stop()
            await sub2.wait_for(lambda ms: sub2.on("/birth"), timeout=15)
            assert service.broker == f"127.0.0.1:{second.port}"
            await sub2.wait_for(lambda ms: len(sub2.on("/telemetry/gpu0")) >= 2, timeout=10)
            target = service._seq
            await sub2.wait_for(
                lambda ms: max(seq_report(sub2.messages).get(service.boot_id, [0])) >= target, timeout=10
            )
            both = seq_report(sub1.messages + sub2.messages)[service.boot_id]
            assert_no_gaps(both, upto=target)
        await sub1.stop()
        await sub2.stop()
    finally:
        first.close()
        second.close()


def test_spool_bound_drops_oldest_telemetry_never_events(tmp_path: Path) -> None:
    from agent.publish.spool import EVENT, TELEMETRY, Spool

    spool = Spool(tmp_path / "s.sqlite", max_bytes=1 << 16)
    event_ids = spool.append([(EVENT, "t/event", json.dumps({"n": i}).encode(), 0) for i in range(5)])
    for _ in range(150):
        spool.append([(TELEMETRY, "t/telemetry/x", b"{" + b"x" * 1000 + b"}", 10)])
    assert spool.bytes <= 1 << 16
    assert spool.dropped_messages > 0 and spool.dropped_samples == spool.dropped_messages * 10
    kept = spool.read(after_id=0, upto_id=spool.max_id(), limit=10_000)
    assert [m.id for m in kept[:5]] == event_ids  # events survive, oldest telemetry went
    dropped = spool.dropped_messages
    spool.close()
    again = Spool(tmp_path / "s.sqlite", max_bytes=1 << 16)  # counters and rows survive a restart
    assert again.dropped_messages == dropped and again.depth == len(kept)
    assert again.delete(m.id for m in kept) == len(kept) and again.depth == 0
    again.close()
