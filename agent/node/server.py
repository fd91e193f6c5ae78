"""The node's pod-network server: authenticated reads and cap leases (agent/node/protocol.py).

Each connection is read frame by frame; a bad frame is refused with a signed error answer and the
connection stays usable. A client that sends nothing is dropped after ``IDLE_S``. Nothing a client
sends can reach NVML except through ``NodeAgent.on_request`` with a checked request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import structlog

from agent.node.protocol import (
    FULL_EVERY,
    MAX_FRAME,
    REQ,
    RSP,
    ProtocolError,
    ReplayGuard,
    check_request,
    decode,
    encode,
    now_ms,
)

if TYPE_CHECKING:
    from agent.node.app import NodeAgent

log = structlog.get_logger("podagent.node")

IDLE_S = 300.0  # an authenticated connection (the controller's) may idle this long
FIRST_FRAME_S = 5.0  # a connection that has sent no valid request yet is dropped after this
MAX_CLIENTS = 64  # with FIRST_FRAME_S, a LAN peer cannot hold the controller out for long


class NodeServer:
    def __init__(self, node: NodeAgent) -> None:
        self.node = node
        self.guard = ReplayGuard(window_s=node.cfg.max_clock_skew_s)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        host, port = self.node.cfg.listen_host_port()
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_FRAME + 2)
        log.info("node listening", listen=self.node.cfg.listen, node=self.node.cfg.node.id)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        peer = str(writer.get_extra_info("peername"))
        if len(self._clients) >= MAX_CLIENTS:
            writer.close()
            return
        if task is not None:
            self._clients.add(task)
        trusted = False
        sent = SentReadings()
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_S if trusted else FIRST_FRAME_S):
                        line = await reader.readline()
                except (TimeoutError, ValueError):  # idle, or a line over MAX_FRAME
                    if not reader.at_eof():
                        self.node.on_rejected("frame", "over the size limit or idle", peer)
                    return
                if not line:
                    return
                answer = await self._answer(line, peer, sent)
                trusted = trusted or bool(answer.get("ok"))
                writer.write(encode(self.node.key, RSP, answer))
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes, peer: str, sent: SentReadings) -> dict[str, Any]:
        node = self.node
        re: dict[str, Any] | None = None
        try:
            body = decode(node.key, REQ, line.rstrip(b"\n"))
            re = {"boot": body.get("boot"), "seq": body.get("seq")}
            req = check_request(
                body, node=node.cfg.node.id, guard=self.guard, max_skew_s=node.cfg.max_clock_skew_s
            )
        except ProtocolError as err:
            node.on_rejected(err.reason, err.detail, peer)
            # A forged request gets no echo of what it claimed (re stays null): the answer cannot
            # be taken for the answer to a real request.
            return {"ok": False, "error": err.reason, "re": re if err.reason != "mac" else None}
        self.guard.accept(req.boot, req.seq, time.time())
        if not node.ready.is_set():
            node.lease.accept(
                None if req.caps is None else {f"gpu{i}": w for i, w in req.caps.items()},
                expires_wall=req.expires_at_ms / 1000,
                now=time.monotonic(),
                lease_id=req.lease_id,
            )
            return {"ok": False, "error": "starting", "re": re, "node_boot": node.boot_id}
        applied = await node.on_request(req)
        answer: dict[str, Any] = {
            "ok": True,
            "re": re,
            "node": node.cfg.node.id,
            "node_boot": node.boot_id,
            "hostname": node.hostname,
            "ts": now_ms(),
            "mode": node.lease.mode,
            "lease_v": None if node.lease.lease_id is None else node.lease.lease_id[1],
            "applied_w": {k.removeprefix("gpu"): round(v, 3) for k, v in applied.items()},
        }
        if req.op == "settings" and req.settings is not None:
            answer["settings"] = await node.on_settings(req.settings)
        if req.op == "poll":
            full = sent.answers % FULL_EVERY == 0
            sent.answers += 1
            answer["full"] = full
            answer["gpus"] = node.gpu_report(None if full else sent.last, sent.last)
            status = node.status_readings()
            if not full:  # the node's own counters, as its GPUs' readings: what changed
                status = {k: v for k, v in status.items() if sent.status.get(k) != v and k != "uptime_s"}
            sent.status.update(status)
            answer["status"] = status
        return answer


class SentReadings:
    """One connection's poll answers so far: what each GPU reading was when last sent."""

    def __init__(self) -> None:
        self.answers = 0
        self.last: dict[tuple[str, str], tuple[object, ...]] = {}
        self.status: dict[str, float] = {}


__all__ = ["NodeServer", "SentReadings"]
