"""Helpers for the MQTT tests: a real mosquitto on a free port, a tiny hwsim pod, a subscriber.

Imported by tests/test_mqtt_*.py (``from tests.conftest_mqtt import ...``).
mosquitto runs as root here and drops to user ``mosquitto``: its files live in a 0755 directory,
mode 0644, owned by that user; no pid_file; the test keeps the Popen and kills what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {port}")


class Mosquitto:
    """One broker: ``start()``/``stop()`` (for outages) on a fixed port, files mosquitto can read."""

    def __init__(self, *, port: int | None = None, extra: str = "", tls: bool = False) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mqtt-broker-"))
        os.chmod(self.dir, 0o755)
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.tls = tls

    def file(self, name: str, text: str | bytes) -> Path:
        path = self.dir / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        self.own(path)
        return path

    @staticmethod
    def own(path: Path) -> None:
        os.chmod(path, 0o644)
        with contextlib.suppress(KeyError, PermissionError):
            pw = pwd.getpwnam("mosquitto")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def write_conf(self) -> Path:
        conf = (
            f"listener {self.port} 127.0.0.1\n"
            "persistence false\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            "max_inflight_messages 0\nmax_queued_messages 100000\n"
        )
        if "allow_anonymous" not in self.extra:
            conf += "allow_anonymous true\n"
        log = self.dir / "mosquitto.log"
        log.touch()
        self.own(log)
        os.chmod(log, 0o666)
        return self.file("mosquitto.conf", conf + self.extra)

    def start(self) -> None:
        conf = self.write_conf()
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"mosquitto did not start: {(self.dir / 'mosquitto.log').read_text()}"
            ) from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def tiny_pod_process(run_dir: Path) -> Iterator[dict[str, Any]]:
    """A tiny hwsim pod in a subprocess; yields its manifest."""
    manifest_path = run_dir / "manifest.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hwsim.cli",
            "run",
            "--pod",
            "tiny",
            "--run-dir",
            str(run_dir),
            "--manifest",
            str(manifest_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while not manifest_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("hwsim tiny pod did not start")
            time.sleep(0.05)
        yield json.loads(manifest_path.read_text())
    finally:
        # SIGTERM first: the pod stops its helpers (socat for the RTU line) on the way out.
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def mqtt_toml(broker_ports: list[int], **keys: Any) -> str:
    lines = ["[prometheus]", "enabled = false", "", "[mqtt]", "enabled = true"]
    lines.append("brokers = [" + ", ".join(f'"127.0.0.1:{p}"' for p in broker_ports) + "]")
    for k, v in keys.items():
        if isinstance(v, str):
            lines.append(f"{k} = {json.dumps(v)}")
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, list):
            lines.append(f"{k} = [" + ", ".join(_inline(x) for x in v) + "]")
        else:
            lines.append(f"{k} = {v!r}")
    return "\n".join(lines) + "\n"


def _inline(value: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items()) + " }"


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float  # time.time() on arrival

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A fleet-side subscriber collecting everything under a filter, in arrival order."""

    port: int
    filter: str = "podagent/#"
    kwargs: dict[str, Any] = field(default_factory=dict)
    messages: list[Received] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    client: aiomqtt.Client | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Subscriber:
        self._task = asyncio.create_task(self._run(), name="test-subscriber")
        async with asyncio.timeout(10):
            await self._ready.wait()
        return self

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, **self.kwargs) as client:
                    self.client = client
                    await client.subscribe(self.filter, qos=1)
                    self._ready.set()
                    async for m in client.messages:
                        payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
                        self.messages.append(Received(str(m.topic), payload, bool(m.retain), time.time()))
                        self._changed.set()
            except aiomqtt.MqttError:
                self.client = None
                await asyncio.sleep(0.2)  # the broker is down on purpose; try again

    async def stop(self) -> None:
        if self._task is not None:
            # Bounded: on Python 3.11 aiomqtt can swallow one cancel (asyncio.wait_for's race).
            for _ in range(5):
                self._task.cancel()
                done, _ = await asyncio.wait({self._task}, timeout=2)
                if done:
                    break

    async def wait_for(self, pred: Callable[[list[Received]], Any], timeout: float = 20.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                found = pred(self.messages)
                if found:
                    return found
                self._changed.clear()
                await self._changed.wait()

    def on(self, suffix: str) -> list[Received]:
        return [m for m in self.messages if m.topic.endswith(suffix)]

    async def publish(self, topic: str, payload: Any, **kw: Any) -> None:
        assert self.client is not None
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(topic, data, qos=1, **kw)


def seq_report(messages: list[Received]) -> dict[str, list[int]]:
    """Durable-stream seqs (telemetry, event, cmd_reply) per boot_id, in arrival order."""
    out: dict[str, list[int]] = {}
    for m in messages:
        if "/telemetry/" in m.topic or m.topic.endswith(("/event", "/cmd_reply")):
            body = m.json()
            # A replayed message may stand for several spooled ones (docs/mqtt.md, "Replay").
            out.setdefault(body["boot_id"], []).extend(body.get("seqs") or [body["seq"]])
    return out


def assert_no_gaps(seqs: list[int], *, upto: int | None = None) -> None:
    unique = sorted(set(seqs))
    assert unique, "no messages"
    top = upto if upto is not None else unique[-1]
    missing = sorted(set(range(1, top + 1)) - set(unique))
    assert not missing, f"missing seqs: {missing[:20]} ({len(missing)} in all)"
