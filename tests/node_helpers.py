"""Real node-agent processes (``podagent node``) against a simulated pod, and a raw pod-network client."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.node.protocol import REQ, RSP, decode, encode, now_ms
from hwsim.agentconf import NodeLayout, render_agent_config, render_node_config
from hwsim.podspec import POD_DIR
from tests.conftest import ROOT, SimPod
from tests.conftest_mqtt import free_port

# Two servers of 4 GPUs on one loop: the smallest pod with more than one node.
DUO_SERVERS, DUO_PER_SERVER = 2, 4


def duo_pod_file(tmp: Path) -> Path:
    text = (POD_DIR / "tiny.toml").read_text()
    text = text.replace('name = "tiny"', 'name = "duo"')
    text = text.replace(
        "count = 1\ngpus_per_server = 8", f"count = {DUO_SERVERS}\ngpus_per_server = {DUO_PER_SERVER}"
    )
    text = text.replace("servers = [0]", "servers = [0, 1]")
    path = tmp / "duo.toml"
    path.write_text(text)
    return path


@dataclass
class NodeProc:
    server: int
    port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False

    @property
    def id(self) -> str:
        return NodeLayout.node_id(self.server)

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "node", "--config", str(self.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.stopped:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def hang(self) -> None:
        """SIGSTOP: the kernel still accepts connections (listen backlog), nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


@dataclass
class NodeFleet:
    pod: SimPod
    key_file: Path
    layout: NodeLayout
    nodes: list[NodeProc] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.key_file.read_bytes().strip()

    def controller_config(self, state_dir: Path, *, extra: str = "", poll_interval_s: float = 0.5) -> str:
        prom = "[prometheus]\nenabled = false\n"
        return render_agent_config(
            self.pod.manifest,
            state_dir=str(state_dir),
            extra=prom + extra,
            poll_interval_s=poll_interval_s,
            nodes=self.layout,
        )


@contextlib.contextmanager
def node_fleet(
    pod: SimPod, tmp: Path, *, lost_after_s: float = 3.0, poll_interval_s: float = 0.5, extra: str = ""
) -> Iterator[NodeFleet]:
    key_file = tmp / "pod.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    key_file.chmod(0o600)
    servers = sorted(int(s) for s in pod.manifest["topology"]["servers"])
    layout = NodeLayout(key_file=str(key_file), ports={s: free_port() for s in servers})
    fleet = NodeFleet(pod, key_file, layout)
    for s in servers:
        cfg = tmp / f"node-{s}.toml"
        cfg.write_text(
            render_node_config(
                pod.manifest,
                s,
                layout,
                poll_interval_s=poll_interval_s,
                controller_lost_after_s=lost_after_s,
                extra='[logging]\nformat = "json"\n' + extra,
            )
        )
        node = NodeProc(server=s, port=layout.ports[s], config=cfg, log=tmp / f"node-{s}.log")
        node.start()
        fleet.nodes.append(node)
    try:
        for node in fleet.nodes:
            wait_armed(node)
        yield fleet
    finally:
        for node in fleet.nodes:
            node.kill()


def wait_armed(node: NodeProc, timeout: float = 30.0) -> None:
    """Listening, and its first NVML poll done (a controller started now sees every GPU)."""
    wait_listening(node, timeout)
    deadline = time.monotonic() + timeout
    while not any(r.get("event") == "node interlocks armed" for r in node.log_lines()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {node.id} not armed within {timeout} s: {node.log.read_text()}")
        time.sleep(0.05)


def wait_listening(node: NodeProc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert node.proc is not None
        if node.proc.poll() is not None:
            raise RuntimeError(f"node {node.id} exited {node.proc.returncode}: {node.log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", node.port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"node {node.id} not listening within {timeout} s")


class RawClient:
    """A hand-made pod-network client: sends exactly the frame it is given."""

    def __init__(self, port: int, key: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 5.0)
        self.file = self.sock.makefile("rb")
        self.key = key

    def send_raw(self, frame: bytes) -> dict[str, Any]:
        self.sock.sendall(frame)
        line = self.file.readline()
        assert line, "node closed the connection"
        return decode(self.key, RSP, line.rstrip(b"\n"))

    def frame(self, key: bytes | None = None, **body: Any) -> bytes:
        return encode(self.key if key is None else key, REQ, body)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def request_body(
    node: str,
    boot: str,
    seq: int,
    caps: dict[str, float],
    *,
    op: str = "caps",
    lease_s: float = 5.0,
    issued_at: int | None = None,
    expires_at: int | None = None,
) -> dict[str, Any]:
    issued = now_ms() if issued_at is None else issued_at
    return {
        "node": node,
        "boot": boot,
        "seq": seq,
        "op": op,
        "issued_at": issued,
        "expires_at": issued + int(lease_s * 1000) if expires_at is None else expires_at,
        "caps": caps,
    }
