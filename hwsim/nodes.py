"""``hwsim nodes``: a real ``podagent node`` process per simulated server, each behind a TCP proxy.

The controller talks to the proxies (the "pod network"); the node faults act where they would in a
real pod:
- ``node-kill``: the node agent process is SIGKILLed (``--clear`` starts it again; it keeps each
  GPU's limit until the controller decides).
- ``node-hang``: the process is SIGSTOPped: the kernel still accepts connections (listen backlog),
  nothing answers, and the node's own rules stop too (a hung agent). ``--clear``: SIGCONT.
- ``node-partition``: the proxy cuts both directions: bytes either way are dropped (no RST: the
  peers see silence, as with a pulled cable), new connections are accepted and black-holed. The node
  keeps running (its local rules act; it goes to its fail-safe when the controller falls silent).
  ``--clear``: the stalled connections are closed and traffic flows again.

A proxy rather than firewall rules: it needs no root, no network namespace, and acts per node.
Writes ``nodes.json`` (next to the pod's manifest): every node's id, proxy port, pid, config and log,
the pod key file and this process's control socket (``hwsim fault node-*`` finds it there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from hwsim.agentconf import NodeLayout, render_node_config

log = structlog.get_logger("hwsim.nodes")

NODE_FAULTS: dict[str, str] = {
    "node-kill": "the server's node agent is killed (--clear starts it again)",
    "node-hang": "the server's node agent hangs: connections accepted, never answered (SIGSTOP)",
    "node-partition": "the pod network to the server is cut, both directions (the node keeps running)",
}
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class _Node:
    server: int
    id: str
    port: int  # the proxy's: what the controller dials
    node_port: int  # the agent's own, on loopback
    config: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    faults: set[str] = field(default_factory=set)
    pipes: set[asyncio.Task[None]] = field(default_factory=set)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    server_obj: asyncio.Server | None = None

    def start(self) -> None:
        out = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "node", "--config", str(self.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        out.close()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeFleet:
    def __init__(
        self,
        manifest: dict[str, Any],
        run_dir: Path,
        *,
        key_file: Path | None = None,
        poll_interval_s: float = 1.0,
        controller_lost_after_s: float = 10.0,
        base_port: int = 0,
    ) -> None:
        self.manifest = manifest
        self.run_dir = run_dir
        self.key_file = key_file or run_dir / "pod.key"
        self.poll_interval_s = poll_interval_s
        self.lost_after_s = controller_lost_after_s
        self.base_port = base_port
        self.nodes: dict[str, _Node] = {}
        self.control_path = run_dir / "nodes.sock"
        self.manifest_path = run_dir / "nodes.json"
        self._control: asyncio.Server | None = None
        self._stop = asyncio.Event()

    async def start(self) -> dict[str, Any]:
        if not self.key_file.exists():
            self.key_file.write_text(os.urandom(32).hex() + "\n")
            self.key_file.chmod(0o600)
        servers = sorted(int(s) for s in self.manifest["topology"]["servers"])
        ports = {s: (self.base_port + s if self.base_port else _free_port()) for s in servers}
        # The nodes' configs name their own loopback port; the controller's names the proxy's.
        node_ports = {s: _free_port() for s in servers}
        layout = NodeLayout(key_file=str(self.key_file), ports=node_ports)
        for s in servers:
            nid = layout.node_id(s)
            cfg = self.run_dir / f"node-{nid}.toml"
            cfg.write_text(
                render_node_config(
                    self.manifest,
                    s,
                    layout,
                    poll_interval_s=self.poll_interval_s,
                    controller_lost_after_s=self.lost_after_s,
                    extra='[logging]\nformat = "json"\n',
                )
            )
            node = _Node(s, nid, ports[s], node_ports[s], cfg, self.run_dir / f"node-{nid}.log")
            node.start()
            node.server_obj = await asyncio.start_server(
                lambda r, w, n=node: self._proxy(n, r, w), "127.0.0.1", node.port
            )
            self.nodes[nid] = node
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()
        self._control = await asyncio.start_unix_server(self._serve_control, path=str(self.control_path))
        manifest = {
            "pid": os.getpid(),
            "key_file": str(self.key_file),
            "control": str(self.control_path),
            "nodes": [
                {
                    "id": n.id,
                    "server": n.server,
                    "host": "127.0.0.1",
                    "port": n.port,
                    "node_port": n.node_port,
                    "pid": n.proc.pid if n.proc else None,
                    "config": str(n.config),
                    "log": str(n.log_path),
                }
                for n in self.nodes.values()
            ],
        }
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(self.manifest_path)
        return manifest

    # -- the pod network -----------------------------------------------------------------------
    async def _proxy(self, node: _Node, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        node.writers.add(writer)
        try:
            if "node-partition" in node.faults:
                await self._blackhole(reader)
                return
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", node.node_port)
            except OSError:
                return  # the agent is down: the controller sees a refused connection... once closed
            node.writers.add(up_w)
            a = asyncio.create_task(self._pipe(node, reader, up_w), name=f"proxy[{node.id}]>")
            b = asyncio.create_task(self._pipe(node, up_r, writer), name=f"proxy[{node.id}]<")
            node.pipes |= {a, b}
            await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
            for t in (a, b):
                t.cancel()
            node.pipes -= {a, b}
            node.writers.discard(up_w)
            up_w.close()
        finally:
            node.writers.discard(writer)
            writer.close()

    @staticmethod
    async def _blackhole(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    @staticmethod
    async def _pipe(node: _Node, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if "node-partition" in node.faults:
                    continue  # cut: dropped, both directions
                dst.write(data)
                await dst.drain()

    # -- faults --------------------------------------------------------------------------------
    def fault(self, name: str, device: str | None, *, clear: bool) -> dict[str, Any]:
        if name not in NODE_FAULTS:
            raise ValueError(f"unknown node fault {name!r}; known: {', '.join(NODE_FAULTS)}")
        node = self.nodes.get(device) if device else next(iter(self.nodes.values()), None)
        if node is None:
            raise ValueError(
                f"fault {name}: {device!r} is not a node (have: {', '.join(list(self.nodes)[:8])})"
            )
        if name == "node-kill":
            if clear:
                if node.proc is None or node.proc.poll() is not None:
                    node.start()
            else:
                node.signal(signal.SIGCONT)
                node.signal(signal.SIGKILL)
                if node.proc is not None:
                    node.proc.wait(10)
        elif name == "node-hang":
            node.signal(signal.SIGCONT if clear else signal.SIGSTOP)
        elif name == "node-partition" and clear:
            # The stalled connections lost bytes: close them; the peers reconnect.
            for w in list(node.writers):
                w.close()
        if clear:
            node.faults.discard(name)
        else:
            node.faults.add(name)
        log.info("node fault", name=name, node=node.id, active=not clear)
        return {
            "fault": {"name": name, "device": node.id, "active": not clear, "description": NODE_FAULTS[name]}
        }

    async def _serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or req.get("cmd") != "fault":
                        raise ValueError("expected {cmd: fault, name, device, clear}")
                    reply = {
                        "ok": True,
                        **self.fault(str(req.get("name")), req.get("device"), clear=bool(req.get("clear"))),
                    }
                except ValueError as err:
                    reply = {"ok": False, "error": str(err)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    # -- lifecycle -----------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()

    async def close(self) -> None:
        for node in self.nodes.values():
            if node.server_obj is not None:
                node.server_obj.close()
            for t in list(node.pipes):
                t.cancel()
            for w in list(node.writers):
                w.close()
            node.signal(signal.SIGCONT)
            node.signal(signal.SIGTERM)
        for node in self.nodes.values():
            if node.proc is not None:
                try:
                    await asyncio.to_thread(node.proc.wait, 10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
        if self._control is not None:
            self._control.close()
        for path in (self.control_path, self.manifest_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


__all__ = ["NODE_FAULTS", "NodeFleet"]
