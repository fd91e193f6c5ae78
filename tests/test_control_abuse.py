"""The control socket as a bounded service, against a read-only local user (uid nobody, a real
separate process) and a tiny hwsim pod with the interlocks on: stalled followers, idle connection
floods and refused-request floods cost a bounded share and never stop the safety functions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agent.app import Agent
from agent.config import load_config
from agent.control.server import ControlServer
from agent.events import Severity
from agent.interlocks.service import InterlockService
from tests.agent_helpers import running_agent
from tests.conftest import SimPod
from tests.test_interlocks_e2e import DEFAULT_W, INTERLOCKS, Truth, event, pod_running
from tests.test_podctl_support import NOBODY, _become_nobody

# A stdlib-only client (uid nobody cannot import this project from /root): opens connections and
# misbehaves as told, prints one JSON line when it has, then waits for stdin to close.
CLIENT = r"""
import json, socket, sys, time
mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
socks, out = [], {}
if mode in ("follow", "idle"):
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            s.connect(path)
        except OSError as err:
            out["connect_error"] = str(err); break
        if mode == "follow":
            s.sendall(b'{"v":1,"op":"follow"}\n')
        socks.append(s)
    out["opened"] = len(socks)
else:  # flood: refused changes, as fast as the daemon lets us
    sent = refused = cut = 0
    deadline = time.monotonic() + 60
    while sent < n and time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        f = s.makefile("rb")
        while sent < n:
            try:
                s.sendall(b'{"v":1,"op":"ack","id":"ev-x-1"}\n')
                sent += 1
                line = f.readline()
            except OSError:
                line = b""
            if not line:
                cut += 1; break
            refused += not json.loads(line)["ok"]
        s.close()
    out.update(sent=sent, refused=refused, cut=cut)
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


def nobody_python() -> str:
    for candidate in ("/usr/bin/python3", shutil.which("python3"), sys.executable):
        if (
            candidate
            and subprocess.run(
                [candidate, "-c", "pass"], preexec_fn=_become_nobody, cwd="/", check=False
            ).returncode
            == 0
        ):
            return candidate
    pytest.skip("no interpreter uid nobody can run")


@contextlib.asynccontextmanager
async def as_nobody(mode: str, path: Path, n: int) -> AsyncIterator[dict[str, int]]:
    """Run the misbehaving client as uid nobody (without blocking the daemon's loop, which is this
    test's loop); yields its report; ends it on exit."""
    proc = await asyncio.create_subprocess_exec(
        nobody_python(),
        "-c",
        CLIENT,
        mode,
        str(path),
        str(n),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=_become_nobody,
        cwd="/",
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(120):
            line = await proc.stdout.readline()
        assert line, f"the {mode} client died"
        yield json.loads(line)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ab-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if want < 4096:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1,100 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


CONTROL = """
[control]
read_group = "nogroup"
max_connections = 256
max_connections_per_uid = 220
max_write_buffer_bytes = 65536
drain_timeout_s = 0.5
refused_per_s = 50.0
refused_burst = 50
"""


@contextlib.asynccontextmanager
async def armed(
    pod: SimPod, tmp: Path, sock_dir: Path
) -> AsyncIterator[tuple[Agent, ControlServer, InterlockService, Truth, Path]]:
    path = tmp / "podagent.toml"
    text = pod.agent_config(tmp / "state", extra=INTERLOCKS + CONTROL)
    text = text.replace(f'socket = "{tmp}/state/podagent.sock"', f'socket = "{sock_dir}/podagent.sock"')
    path.write_text(text)
    config = load_config(path)
    control = ControlServer(config.control, config.paths.socket)
    interlocks = InterlockService(config.interlocks)
    truth = Truth(pod)
    async with running_agent(path, services=[interlocks, control]) as agent:
        await control.listening.wait()
        sampler = asyncio.create_task(truth.run(), name="truth")
        try:
            await truth.until(lambda s: True, within=5, what="a first sample")
            yield agent, control, interlocks, truth, config.paths.socket
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler


async def root_request(path: Path, request: dict[str, object]) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        async with asyncio.timeout(10):
            reply: dict[str, object] = json.loads(await reader.readline())
        return reply
    finally:
        writer.close()


async def test_stalled_followers_and_idle_floods_do_not_stop_the_interlocks(
    tmp_path: Path, sock_dir: Path, many_fds: None
) -> None:
    with pod_running(tmp_path) as pod:
        pod.request(cmd="workload", profile="steady", level=0.95)
        async with (
            armed(pod, tmp_path, sock_dir) as (agent, control, _, truth, path),
            as_nobody("follow", path, 200) as followers,
            as_nobody("idle", path, 1100) as idle,
        ):
            assert followers["opened"] == 200 and idle["opened"] + 200 >= 256
            # At most the cap is open; the rest were turned away at once.
            assert len(control._conns) <= 256 and control.rejected_connections > 0
            # 2,000 events on the bus, each to every follower that does not read.
            for i in range(2000):
                agent.events.emit("test_noise", Severity.INFO, "x" * 300, detail={"n": i})
                if i % 100 == 0:
                    await asyncio.sleep(0)
            pod.fault("gpu-runaway", "gpu3")
            trip = await event(agent, "interlock_trip", device="gpu3", within=20)
            # The cap follows its trip (no wall-clock bound: a loaded CI machine may take a while;
            # bench/interlock_latency.py measures how long).
            applied = await event(agent, "cap_applied", device="gpu3", within=10)
            assert applied.ts_wall >= trip.ts_wall
            await truth.until(lambda s: abs(s.limits[3] - 0.6 * DEFAULT_W) <= 1, within=5, what="cap")
            # The followers that never read are dropped (each after drain_timeout_s).
            async with asyncio.timeout(20):
                while control.dropped_clients < 150:
                    await asyncio.sleep(0.2)
            assert len(agent.events._subscribers) < 10  # their subscriptions and queues are gone
            # Root still gets in, and its answer comes.
            assert (await root_request(path, {"v": 1, "op": "ping"}))["ok"] is True
            reply = await root_request(path, {"v": 1, "op": "status"})
            assert reply["ok"] is True


async def test_refused_flood_leaves_a_leak_trip_ackable_and_the_audit_trips_intact(
    tmp_path: Path, sock_dir: Path
) -> None:
    with pod_running(tmp_path) as pod:
        async with armed(pod, tmp_path, sock_dir) as (agent, control, _, _truth, path):
            pod.fault("coolant-leak")
            trip = await event(agent, "interlock_trip", interlock="coolant_leak", within=20)
            assert trip.needs_ack
            async with as_nobody("flood", path, 3000) as flood:
                assert flood["sent"] == 3000 and flood["refused"] + flood["cut"] >= 1
            refused = [e for e in agent.events.recent(limit=2000) if e.kind == "control_refused"]
            assert 1 <= len(refused) <= 3  # one sampled event, not one per request
            assert refused[0].detail["uid"] == NOBODY
            # Many more events than the recent ring keeps, after the trip.
            for i in range(3000):
                agent.events.emit("test_noise", Severity.INFO, "noise", detail={"n": i})
            assert control._refused_total[NOBODY] >= 3000 - flood["cut"]
            assert trip.id in {e.id for e in agent.events.unacked()}
            pod.fault("coolant-leak", clear=True)
            reply = await root_request(path, {"v": 1, "op": "ack", "id": trip.id})
            assert reply["ok"] is True, reply
            await event(agent, "interlock_clear", interlock="coolant_leak", within=20)
        safety = [json.loads(x) for x in (tmp_path / "state" / "safety.jsonl").read_text().splitlines()]
        assert any(e["id"] == trip.id for e in safety)
        assert any(e["kind"] == "ack" and e["detail"]["event_id"] == trip.id for e in safety)
        audit = [json.loads(x) for x in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
        assert sum(e["kind"] == "control_refused" for e in audit) <= 3
        assert any(e["kind"] == "interlock_trip" and e["id"] == trip.id for e in audit)


async def test_deep_json_and_oversized_requests_get_an_error_reply(sock_dir: Path) -> None:
    from agent.control.server import build_service
    from tests.test_podctl_support import host_only_config

    config = host_only_config(sock_dir)
    async with running_agent(config, services=[build_service(load_config(config))]):
        path = load_config(config).paths.socket
        for deep in (b"[" * 1000 + b"]" * 1000, b'{"v":1,"op":"ping","x":' + b"[" * 50 + b"]" * 50 + b"}"):
            reply = await root_request_raw(path, deep + b"\n")
            assert reply["ok"] is False and "nested too deep" in str(reply["error"]), reply
        assert (await root_request(path, {"v": 1, "op": "ping"}))["ok"] is True


async def root_request_raw(path: Path, data: bytes) -> dict[str, object]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(data)
        async with asyncio.timeout(10):
            reply: dict[str, object] = json.loads(await reader.readline())
        return reply
    finally:
        writer.close()


async def _starve_accept(
    connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]],
    starved: Callable[[], bool],
) -> None:
    """Leave no descriptor for the daemon's accept(): clients' own sockets take the last ones,
    until ``starved()`` holds; then the limit and every descriptor come back."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    clients = []
    try:
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 6, hard))
        with contextlib.suppress(OSError):
            for _ in range(40):
                clients.append(await connect())
        async with asyncio.timeout(10):
            while not starved():
                await asyncio.sleep(0.05)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for _, w in clients:
            w.close()


async def test_out_of_file_descriptors_the_accept_loop_backs_off_and_recovers(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.control.server import build_service
    from tests.test_podctl_support import host_only_config

    config = host_only_config(sock_dir)
    control = build_service(load_config(config))
    assert control is not None
    async with running_agent(config, services=[control]):
        path = load_config(config).paths.socket
        await _starve_accept(
            lambda: asyncio.open_unix_connection(str(path)), lambda: control.accept_failures >= 3
        )
        # Descriptors are back: the daemon answers again, and said so once, not once per failure.
        async with asyncio.timeout(10):
            while True:
                with contextlib.suppress(OSError, json.JSONDecodeError):
                    if (await root_request(path, {"v": 1, "op": "ping"}))["ok"] is True:
                        break
                await asyncio.sleep(0.1)
        out = capsys.readouterr().out
        assert out.count("control socket cannot accept") == 1, out[-2000:]
        assert control.accept_failures >= 3


async def _http_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_prometheus_endpoint_out_of_file_descriptors_backs_off_and_recovers(
    sock_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """asyncio's own server loop logged a traceback per failed accept(); ours says it once."""
    from agent.publish.prometheus import PrometheusExporter
    from tests.conftest_mqtt import free_port
    from tests.test_podctl_support import host_only_config

    port = free_port()
    config = host_only_config(sock_dir)
    config.write_text(config.read_text().replace("enabled = false", f'listen = "127.0.0.1:{port}"'))
    async with running_agent(config) as agent:

        def exporter() -> PrometheusExporter | None:
            owners = (getattr(source, "__self__", None) for source in agent.metric_sources)
            return next((o for o in owners if isinstance(o, PrometheusExporter)), None)

        async with asyncio.timeout(10):
            while exporter() is None:
                await asyncio.sleep(0.05)
        endpoint = exporter()
        assert endpoint is not None
        assert b"200 OK" in await _http_get(port, "/metrics")
        await _starve_accept(
            lambda: asyncio.open_connection("127.0.0.1", port), lambda: endpoint.metrics()[2][2] >= 3
        )
        async with asyncio.timeout(15):
            while True:
                with contextlib.suppress(OSError, TimeoutError):
                    body = await _http_get(port, "/metrics")
                    if b"200 OK" in body:
                        break
                await asyncio.sleep(0.1)
        lines = body.decode().splitlines()
        failures = [line for line in lines if line.startswith("podagent_prometheus_accept_failures")]
        assert failures and float(failures[0].split()[-1]) >= 3, failures
        out = capsys.readouterr().out + capsys.readouterr().err
        assert out.count("prometheus endpoint cannot accept") == 1, out[-2000:]
        assert "out of system resource" not in out  # asyncio's per-failure traceback
