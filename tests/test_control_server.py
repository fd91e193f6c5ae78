"""The control socket of a running agent (one host device, no simulated pod), through the real
Unix socket: bad requests change nothing, changes are audited, non-admin callers are refused,
podctl without a daemon says so and exits 3."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import load_config
from agent.control.server import build_service
from agent.events import Event, Severity
from tests.agent_helpers import running_agent
from tests.test_podctl_support import (
    NOBODY,
    host_only_config,
    podctl,
    python_for_nobody,
    sock_dir_fixture,  # noqa: F401  (the sock_dir fixture)
    socket_of,
)


async def raw_exchange(path: Path, payload: bytes) -> list[dict[str, object]]:
    """Send bytes as they are; every answer line until the daemon closes or goes quiet."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(payload)
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    answers = []
    async with asyncio.timeout(10):
        while line := await reader.readline():
            answers.append(json.loads(line))
    writer.close()
    return answers


async def test_bad_requests_get_an_error_and_change_nothing(sock_dir: Path) -> None:
    config = host_only_config(sock_dir, extra="max_request_bytes = 1024\n")
    async with running_agent(config, services=[build_service(load_config(config))]) as agent:
        path = socket_of(config)
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
        target = agent.events.emit("test_alarm", Severity.WARNING, "needs an ack", needs_ack=True)
        before = len(agent.events.recent(limit=2000))
        answers = await raw_exchange(
            path,
            b"{oops\n"
            + b'{"v": 1, "op": "launch_missiles"}\n'
            + b'{"v": 1, "op": "ack"}\n'
            + json.dumps({"v": 1, "op": "ack", "id": target.id, "extra": True}).encode()
            + b"\n"
            + b'{"v": 7, "op": "status"}\n'
            + b'{"v": 1, "op": "ping"}\n',
        )
        assert [a["ok"] for a in answers] == [False, False, False, False, False, True]
        assert "not JSON" in str(answers[0]["error"])
        assert "unknown op" in str(answers[1]["error"])
        assert "bad arguments for ack" in str(answers[2]["error"])
        assert "bad arguments for ack" in str(answers[3]["error"])
        assert "version" in str(answers[4]["error"])
        assert answers[5]["pod"] == "unit"
        # Too large: refused, and the connection is closed (nothing of it is parsed).
        big = json.dumps({"v": 1, "op": "ack", "id": target.id, "pad": "x" * 4000}).encode() + b"\n"
        answers = await raw_exchange(path, big + b'{"v": 1, "op": "ping"}\n')
        assert len(answers) == 1 and "too large" in str(answers[0]["error"])
        # Nothing changed: no ack, no command, no new event of any kind.
        assert target.id not in agent.events.acks
        assert len(agent.events.recent(limit=2000)) == before
        # The daemon still serves.
        assert (await raw_exchange(path, b'{"v": 1, "op": "ping"}\n'))[0]["ok"] is True


async def test_root_may_ack_and_the_change_is_audited(sock_dir: Path) -> None:
    config = host_only_config(sock_dir)
    async with running_agent(config, services=[build_service(load_config(config))]) as agent:
        target = agent.events.emit("test_alarm", Severity.CRITICAL, "leak under rack 2", needs_ack=True)
        ran = await podctl(socket_of(config), "events", "--unacked", "--json")
        assert ran.rc == 0, ran
        assert [e["id"] for e in ran.json()] == [target.id]
        ran = await podctl(socket_of(config), "ack", target.id)
        assert ran.rc == 0, ran
        assert "acknowledged" in ran.out
        assert target.id in agent.events.acks
        assert "root" in agent.events.acks[target.id].by
        audit = [e for e in agent.events.recent() if e.kind == "control_command"]
        assert audit and audit[-1].detail["op"] == "ack" and audit[-1].detail["uid"] == 0
        assert audit[-1].detail["user"] == "root" and audit[-1].detail["ok"] is True
        # Acking an unknown event: an error (exit 1), audited as failed, nothing acked.
        ran = await podctl(socket_of(config), "ack", "ev-nope-1")
        assert ran.rc == 1 and "no event" in ran.err, ran
        assert "ev-nope-1" not in agent.events.acks
        assert agent.events.recent()[-1].detail["ok"] is False
        ran = await podctl(socket_of(config), "events", "--unacked", "--json")
        assert ran.json() == []


async def test_uid_nobody_reads_but_is_refused_changes_through_the_real_socket(sock_dir: Path) -> None:
    python = await asyncio.to_thread(python_for_nobody)
    assert python is not None, "no interpreter that uid nobody can run with this project's packages"
    config = host_only_config(sock_dir)
    async with running_agent(config, services=[build_service(load_config(config))]) as agent:
        path = socket_of(config)
        assert path.stat().st_gid == NOBODY  # read_group = "nogroup" in this config
        target = agent.events.emit("test_alarm", Severity.WARNING, "needs an ack", needs_ack=True)
        ran = await podctl(path, "status", "--json", python=python, as_nobody=True)
        assert ran.rc == 0, ran
        assert ran.json()["pod"] == "unit"
        ran = await podctl(path, "ack", target.id, python=python, as_nobody=True)
        assert ran.rc == 4, ran
        assert "permission denied" in ran.err and ran.err.count("\n") == 1
        assert target.id not in agent.events.acks
        refused = [e for e in agent.events.recent() if e.kind == "control_refused"]
        assert refused and refused[-1].detail["uid"] == NOBODY and refused[-1].detail["op"] == "ack"
        assert refused[-1].detail["user"] == "nobody"


async def test_follow_streams_new_events_until_the_client_hangs_up(sock_dir: Path) -> None:
    config = host_only_config(sock_dir)
    async with running_agent(config, services=[build_service(load_config(config))]) as agent:
        subscribed, unsubscribed = asyncio.Event(), asyncio.Event()
        subscribe = agent.events.subscribe

        def watched_subscribe(callback: Callable[[Event], None]) -> Callable[[], None]:
            subscribed.set()
            unsubscribe = subscribe(callback)

            def watched_unsubscribe() -> None:
                unsubscribe()
                unsubscribed.set()

            return watched_unsubscribe

        agent.events.subscribe = watched_subscribe  # type: ignore[method-assign]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.control.podctl", "--socket", str(socket_of(config)),
            "events", "--follow", "--json", "--since", "1s",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        await asyncio.wait_for(subscribed.wait(), 15)  # the daemon put the follower on the bus
        agent.events.emit("test_marker", Severity.INFO, "hello follower")
        async with asyncio.timeout(10):
            while True:
                event = json.loads(await proc.stdout.readline())
                if event["kind"] == "test_marker":
                    break
        assert event["message"] == "hello follower"
        proc.terminate()
        await proc.wait()
        await asyncio.wait_for(unsubscribed.wait(), 10)  # it noticed the hang-up and let go


async def test_reload_and_poll_now_for_root(sock_dir: Path) -> None:
    config = host_only_config(sock_dir)
    async with running_agent(config, services=[build_service(load_config(config))]) as agent:
        path = socket_of(config)
        polls = agent.pollers["controller"].stats.polls
        ran = await podctl(path, "poll", "controller", "--json")
        assert ran.rc == 0, ran
        metrics = {r["metric"]: r for r in ran.json()["readings"]}
        assert metrics["uptime_s"]["quality"] == "good" and metrics["uptime_s"]["value"] > 0
        assert agent.pollers["controller"].stats.polls > polls
        ran = await podctl(path, "reload")
        assert ran.rc == 0 and agent.reloads == 1, ran
        # An invalid file on disk: refused, the running config kept.
        config.write_text(config.read_text().replace('kind = "host"', 'kind = "toaster"'))
        ran = await podctl(path, "reload")
        assert ran.rc == 1 and "invalid" in ran.err, ran
        assert agent.reloads == 1 and agent.config.device[0].kind == "host"


async def test_without_a_daemon_every_command_says_so_in_one_line_and_exits_3(sock_dir: Path) -> None:
    missing = sock_dir / "podagent.sock"
    for args in (("status",), ("watch",), ("devices", "--json"), ("ack", "ev-1"), ("events", "--follow")):
        ran = await podctl(missing, *args)
        assert ran.rc == 3, (args, ran)
        assert ran.out == ""
        assert ran.err.count("\n") == 1 and "not running" in ran.err and "systemctl start podagent" in ran.err
    # A socket file nobody listens on (a daemon that died): the same.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(missing))
    dead.close()
    ran = await podctl(missing, "status")
    assert ran.rc == 3 and "nothing listening" in ran.err, ran
    # The environment variable names the socket too.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.control.podctl", "status",
        env={**os.environ, "PODAGENT_SOCKET": str(sock_dir / "elsewhere.sock")},
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 3 and "elsewhere.sock" in err.decode()


async def test_config_check_needs_no_daemon(sock_dir: Path) -> None:
    good = host_only_config(sock_dir)
    ran = await podctl(None, "config", "check", str(good))
    assert ran.rc == 0 and "ok" in ran.out, ran
    bad = sock_dir / "bad.toml"
    bad.write_text(good.read_text().replace("poll_interval_s = 0.5", "poll_interval_s = -1"))
    ran = await podctl(None, "config", "check", str(bad))
    assert ran.rc == 1 and "poll_interval_s" in ran.err, ran


async def test_stale_socket_is_replaced_and_removed_on_stop(sock_dir: Path) -> None:
    config = host_only_config(sock_dir)
    path = socket_of(config)
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))  # a daemon that was killed left its socket behind
    leftover.close()
    started = time.monotonic()
    async with running_agent(config, services=[build_service(load_config(config))]):
        assert (await raw_exchange(path, b'{"v": 1, "op": "ping"}\n'))[0]["ok"] is True
    assert not path.exists()
    assert time.monotonic() - started < 20
