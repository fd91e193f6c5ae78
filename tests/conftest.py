"""Shared fixtures: a running simulated pod (real UDP/TCP/pty endpoints) and an agent config for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hwsim.agentconf import render_agent_config
from hwsim.runner import control_request

ROOT = Path(__file__).resolve().parent.parent


class SimPod:
    """A `hwsim run` subprocess and ways to poke it."""

    def __init__(self, proc: subprocess.Popen[bytes], run_dir: Path, manifest: dict[str, Any]) -> None:
        self.proc = proc
        self.run_dir = run_dir
        self.manifest = manifest

    def request(self, **request: Any) -> dict[str, Any]:
        reply = control_request(self.manifest["control"], request)
        assert reply.get("ok"), reply
        return reply

    def fault(
        self, name: str, device: str | None = None, *, clear: bool = False, value: int | None = None
    ) -> None:
        req: dict[str, Any] = {"cmd": "fault", "name": name, "device": device, "clear": clear}
        if value is not None:
            req["value"] = value
        self.request(**req)

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.request(cmd="state")["state"]
        return state

    def agent_config(self, state_dir: Path, *, extra: str = "", poll_interval_s: float = 1.0) -> str:
        prom = "[prometheus]\nenabled = false\n" if "[prometheus]" not in extra else ""
        return render_agent_config(
            self.manifest,
            state_dir=str(state_dir),
            extra=prom + extra,
            poll_interval_s=poll_interval_s,
        )


def start_pod(
    run_dir: Path, pod: str = "tiny", *, seed: int = 1, speed: float = 1.0, extra: list[str] | None = None
) -> SimPod:
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "manifest.json"
    log = (run_dir / "hwsim.log").open("wb")
    cmd = [
        sys.executable,
        "-m",
        "hwsim.cli",
        "run",
        "--pod",
        pod,
        "--run-dir",
        str(run_dir),
        "--manifest",
        str(manifest_path),
        "--seed",
        str(seed),
        "--speed",
        str(speed),
        *(extra or []),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 30
    while not manifest_path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"hwsim exited {proc.returncode}: {(run_dir / 'hwsim.log').read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("hwsim did not write its manifest within 30 s")
        time.sleep(0.05)
    return SimPod(proc, run_dir, json.loads(manifest_path.read_text()))


def stop_pod(pod: SimPod) -> None:
    if pod.proc.poll() is None:
        pod.proc.send_signal(signal.SIGTERM)
        try:
            pod.proc.wait(10)
        except subprocess.TimeoutExpired:
            pod.proc.kill()
            pod.proc.wait()


@pytest.fixture
def tiny_pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimPod]:
    # Short path: Unix socket paths are limited to 108 bytes.
    run_dir = Path(tmp_path_factory.mktemp("pod", numbered=True))
    pod = start_pod(run_dir)
    try:
        yield pod
    finally:
        stop_pod(pod)


@pytest.fixture
def agent_config_path(tiny_pod: SimPod, tmp_path: Path) -> Path:
    path = tmp_path / "podagent.toml"
    path.write_text(tiny_pod.agent_config(tmp_path / "state"))
    return path


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
