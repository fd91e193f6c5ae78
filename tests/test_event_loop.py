"""The controller's event loop: uvloop by default, asyncio's own on PODAGENT_EVENT_LOOP=asyncio,
and either way the real daemon polls every kind of device of the tiny pod, serves podctl over its
Unix socket and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvloop

from agent.aio import EVENT_LOOP_ENV, loop_factory, loop_name
from agent.config import load_config
from agent.publish.mqtt import MqttService
from tests.conftest import SimPod
from tests.test_podctl_support import host_only_config


def test_uvloop_by_default_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    loop = loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop) and loop_name(loop) == "uvloop"
    finally:
        loop.close()
    for value in ("asyncio", " AsyncIO "):
        monkeypatch.setenv(EVENT_LOOP_ENV, value)
        loop = loop_factory()()
        try:
            assert not isinstance(loop, uvloop.Loop) and loop_name(loop) == "asyncio"
        finally:
            loop.close()


def test_an_unknown_choice_runs_asyncio_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    # A typo in a drop-in must not stop the daemon (its interlocks) from starting.
    monkeypatch.setenv(EVENT_LOOP_ENV, "tokio")
    with structlog.testing.capture_logs() as logs:
        factory = loop_factory()
    assert factory is asyncio.new_event_loop
    assert [(e["log_level"], e["value"]) for e in logs] == [("warning", "tokio")]


def _lines_until(proc: subprocess.Popen[bytes], log: Path, done: Any, timeout: float) -> list[dict[str, Any]]:
    """The daemon's JSON log lines, read until ``done(lines)`` holds (fails if it exits first)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        if done(lines):
            return lines
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"podagent exited or stalled (rc {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_the_daemon_polls_every_device_and_serves_podctl(
    choice: str, tiny_pod: SimPod, tmp_path: Path
) -> None:
    config = tmp_path / "podagent.toml"
    config.write_text(tiny_pod.agent_config(tmp_path / "state", extra='[logging]\nformat = "json"\n'))
    devices = {d.id for d in load_config(config).device}
    log = tmp_path / "agent.log"
    env = {**os.environ, EVENT_LOOP_ENV: choice}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)], stderr=out, env=env
        )
    try:
        lines = _lines_until(proc, log, lambda ls: any(e["event"].startswith("ready:") for e in ls), 90)
        start = next(e for e in lines if e["event"] == "podagent starting")
        assert start["event_loop"] == choice
        assert {e.get("device") for e in lines if e["event"] == "device up"} == devices
        assert next(e for e in lines if e["event"].startswith("ready:"))["stale"] == []
        assert not [e for e in lines if e["event"] == "device down"]
        socket = tmp_path / "state" / "podagent.sock"
        listed = subprocess.run(
            [sys.executable, "-m", "agent.control.podctl", "--socket", str(socket), "devices", "--json"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr.decode()
        assert devices <= {d["id"] for d in json.loads(listed.stdout)}
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text()[-3000:]
    assert any(json.loads(line)["event"] == "podagent stopping" for line in log.read_text().splitlines())


def test_the_mqtt_flush_waits_once_per_period_on_uvloops_millisecond_clock(tmp_path: Path) -> None:
    """uvloop's clock counts whole ms: a flush loop that waited for a float remainder of 1e-16
    woke again and again within the same ms (extra partial flushes, every few periods)."""
    config = load_config(
        host_only_config(
            tmp_path, extra='[mqtt]\nenabled = true\nbrokers = ["127.0.0.1:1"]\ntelemetry_period_s = 0.1\n'
        )
    )
    service = MqttService(config)
    flushes: list[bool] = []
    service._flush = lambda *, telemetry: flushes.append(telemetry)  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.ensure_future(service._flush_loop())
        while len(flushes) < 30:
            await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
    # No event was emitted: every wake of the loop is its period's full (telemetry) flush.
    assert flushes and all(flushes), flushes
