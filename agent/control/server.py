"""The control socket: podctl's API into the running daemon (a Unix socket, JSON lines, v1).

Reads come straight from the StateStore, the EventBus and the interlock service, inside one
synchronous step of the loop, so a slow client never holds anything up. Changes (ack, override,
override clear, poll now, reload) are checked with the caller's SO_PEERCRED credentials by
``protocol.authorize`` and audited as events, refused ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.accept import AcceptLoop
from agent.config import AgentConfig
from agent.control import protocol as p
from agent.control.config import ControlConfig
from agent.events import Event, Severity
from agent.model import Reading
from agent.state import POD_DEVICE

if TYPE_CHECKING:
    from agent.app import Agent

log = structlog.get_logger(__name__)

# What `podctl status` shows of each cooling unit, in this order.
CDU_METRICS = (
    "supply_temp_c",
    "return_temp_c",
    "flow_lpm",
    "diff_pressure_kpa",
    "pump_running",
    "pump_fault",
    "leak",
    "setpoint_c",
    "heat_removed_kw",
    "gpu_heat_load_kw",
)
CHILLER_METRICS = ("supply_temp_c", "return_temp_c", "setpoint_c", "running", "tripped", "load_kw", "alarms")
FOLLOW_QUEUE = 1000


def build_service(config: AgentConfig) -> ControlServer | None:
    """The factory ``podagent run`` calls (agent/cli.py ``_services``)."""
    if not config.control.enabled:
        return None
    return ControlServer(config.control, config.paths.socket)


def peer_credentials(sock: socket.socket) -> p.PeerCred:
    """SO_PEERCRED (pid, uid, gid) of the process that connected, plus its supplementary groups."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return p.PeerCred(pid=pid, uid=uid, gid=gid, groups=_supplementary_groups(pid, uid))


def _supplementary_groups(pid: int, uid: int) -> frozenset[int]:
    # /proc/<pid>/status "Groups:" is the connecting process's own list; if it is gone (it exited
    # after connecting), fall back to the group database for its user.
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return frozenset()
    return frozenset(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _group_gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def reading_dict(agent: Agent, r: Reading, now: float) -> dict[str, Any]:
    return {
        "device": r.device,
        "metric": r.metric,
        "value": r.value,
        "unit": r.unit,
        "age_s": round(now - r.ts_mono, 2),
        "quality": str(agent.store.effective_quality(r, now)),
        "error": r.error,
        "ts": int(r.ts_wall * 1000),
    }


def jsonable_raw(item: Any) -> Any:
    """Raw points from a driver's ``poll_raw`` (NamedTuples, (oid, value) pairs) as JSON."""
    as_dict = getattr(item, "_asdict", None)
    if callable(as_dict):
        return {k: jsonable_raw(v) for k, v in as_dict().items()}
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return {"oid": item[0], "value": jsonable_raw(item[1])}
    if isinstance(item, list | tuple):
        return [jsonable_raw(v) for v in item]
    if item is None or isinstance(item, bool | int | float | str):
        return item
    return str(item)


class ControlServer:
    def __init__(self, config: ControlConfig, path: Path) -> None:
        self.config = config
        self.path = Path(path)
        self.listening = asyncio.Event()
        self._agent: Agent | None = None
        self._conns: set[socket.socket] = set()
        self._per_uid: dict[int, int] = {}
        self.rejected_connections = 0
        self.dropped_clients = 0
        self._accept = AcceptLoop("control socket")
        # Refused requests: a token bucket per uid (rate limit) and a sampled audit event.
        self._refused_tokens: dict[int, tuple[float, float]] = {}  # uid -> (tokens, at)
        self._refused_total: dict[int, int] = {}
        self._refused_since_event: dict[int, int] = {}
        self._refused_event_at: dict[int, float] = {}
        self._line_cache: dict[str, bytes] = {}  # event id -> its follow line (shared by followers)
        self._handlers: dict[str, Callable[..., Any]] = {
            "ping": self._ping,
            "status": self._status,
            "devices": self._devices,
            "device": self._device,
            "interlocks": self._interlocks,
            "events": self._events,
            "ack": self._ack,
            "override": self._override,
            "override_clear": self._override_clear,
            "poll": self._poll,
            "reload": self._reload,
        }

    # ------------------------------------------------------------------ lifecycle
    def admin_gids(self) -> frozenset[int]:
        gid = _group_gid(self.config.admin_group)
        return frozenset() if gid is None else frozenset({gid})

    async def run(self, agent: Agent) -> None:
        self._agent = agent
        agent.metric_sources.append(self.metrics)
        self._prepare_path()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            listener.listen(128)
            listener.setblocking(False)
            self._set_permissions()
            log.info("control socket listening", path=str(self.path))
            self.listening.set()
            async with asyncio.TaskGroup() as tg:
                await self._accept.run(listener, lambda conn: self._admit(conn, tg))
        finally:
            listener.close()
            with contextlib.suppress(ValueError):
                agent.metric_sources.remove(self.metrics)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(self.path.lstat().st_mode):
                    self.path.unlink()

    def _admit(self, conn: socket.socket, tg: asyncio.TaskGroup) -> None:
        """Caps on connections, overall and per uid, checked before any task or buffer exists."""
        try:
            peer = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        cfg = self.config
        per_uid = self._per_uid.get(peer.uid, 0)
        if len(self._conns) >= cfg.max_connections or per_uid >= cfg.max_connections_per_uid:
            self.rejected_connections += 1
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(p.encode(p.error("too many connections; try again later")))
            conn.close()
            return
        self._per_uid[peer.uid] = per_uid + 1
        self._conns.add(conn)
        tg.create_task(self._connection(conn, peer), name=f"control[{peer.uid}:{peer.pid}]")

    async def _connection(self, conn: socket.socket, peer: p.PeerCred) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(
                sock=conn, limit=self.config.max_request_bytes + 1
            )
        except OSError:
            self._release(conn, peer)
            conn.close()
            return
        try:
            await self._client(reader, writer, peer)
        except Exception:  # one connection's bug must not stop the accept loop
            log.exception("control connection failed")
        finally:
            self._release(conn, peer)
            await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Hand over what is buffered (bounded in time), then close; a stalled client is cut off."""
        if writer.transport.is_closing() or not writer.transport.get_write_buffer_size():
            writer.transport.abort()
            return
        writer.close()
        try:
            async with asyncio.timeout(self.config.drain_timeout_s):
                await writer.wait_closed()
        except (TimeoutError, OSError):
            writer.transport.abort()

    def _release(self, conn: socket.socket, peer: p.PeerCred) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            left = self._per_uid.get(peer.uid, 1) - 1
            if left > 0:
                self._per_uid[peer.uid] = left
            else:
                self._per_uid.pop(peer.uid, None)

    @property
    def accept_failures(self) -> int:
        return self._accept.failures

    def metrics(self) -> list[tuple[str, list[tuple[str, str]], float, str]]:
        out: list[tuple[str, list[tuple[str, str]], float, str]] = [
            ("podagent_control_connections", [], len(self._conns), "Open control socket connections."),
            ("podagent_control_rejected_connections_total", [], self.rejected_connections,
             "Connections closed at once: over the overall or per-uid cap."),
            ("podagent_control_dropped_clients_total", [], self.dropped_clients,
             "Connections dropped because the client did not read (write buffer over its limit)."),
            ("podagent_control_accept_failures_total", [], self.accept_failures,
             "accept() failures for lack of file descriptors or memory."),
        ]  # fmt: skip
        for uid, n in sorted(self._refused_total.items()):
            out.append(
                ("podagent_control_refused_total", [("uid", str(uid))], n,
                 "Control requests refused (permission denied), by uid.")
            )  # fmt: skip
        return out

    def _prepare_path(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if not self.path.exists() and not self.path.is_symlink():
            return
        if not stat.S_ISSOCK(self.path.lstat().st_mode):
            raise RuntimeError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()  # left behind by a daemon that died
        else:
            raise RuntimeError(f"another podagent is serving {self.path}")
        finally:
            probe.close()

    def _set_permissions(self) -> None:
        gid = _group_gid(self.config.read_group)
        if gid is not None:
            try:
                os.chown(self.path, -1, gid)
            except PermissionError:
                log.warning("cannot give the control socket its group", group=self.config.read_group)
        os.chmod(self.path, 0o660)

    # ------------------------------------------------------------------ connections
    async def _client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: p.PeerCred
    ) -> None:
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as err:
                    if err.partial.strip():
                        await self._reply(writer, p.error("request not terminated by a newline"))
                    break
                except asyncio.LimitOverrunError:
                    # The rest of the line is unread: answer and hang up rather than parse garbage.
                    limit = self.config.max_request_bytes
                    await self._reply(writer, p.error(f"request too large (the limit is {limit} bytes)"))
                    break
                if not line.strip():
                    continue
                if not await self._serve(line, peer, reader, writer):
                    break
        except (ConnectionError, BrokenPipeError, _ClientStalled):
            pass

    async def _reply(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        await self._send(writer, p.encode(obj))

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write without ever waiting long on a client: past the buffer limit it gets
        ``drain_timeout_s`` to read, then it is dropped (_ClientStalled)."""
        if writer.transport.is_closing():
            raise _ClientStalled
        writer.write(data)
        if writer.transport.get_write_buffer_size() <= self.config.max_write_buffer_bytes:
            return
        try:
            async with asyncio.timeout(self.config.drain_timeout_s):
                await writer.drain()
        except TimeoutError:
            self.dropped_clients += 1
            if self.dropped_clients == 1 or self.dropped_clients % 100 == 0:
                log.warning("control client does not read; dropped", dropped_total=self.dropped_clients)
            writer.transport.abort()
            raise _ClientStalled from None

    async def _serve(
        self, line: bytes, peer: p.PeerCred, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request. False: the connection is done (after a follow)."""
        agent = self._agent
        assert agent is not None
        try:
            req = p.parse_request(
                line, max_bytes=self.config.max_request_bytes, max_depth=self.config.max_json_depth
            )
        except p.ProtocolError as err:
            await self._reply(writer, p.error(str(err)))
            return True
        user = user_name(peer.uid)
        if not p.authorize(req.op, peer, self.admin_gids()):
            within_rate = self._refused(agent, req.op, peer, user)
            await self._reply(
                writer,
                p.error(f"permission denied: {req.op} needs root or membership of {self.config.admin_group}")
                if within_rate
                else p.error("permission denied, and too many refused requests: slow down"),
            )
            return within_rate  # past the rate: the connection is closed
        if isinstance(req, p.Follow):
            await self._follow(req, reader, writer)
            return False
        args = req.model_dump(exclude={"v", "op"})
        by = f"{user} (uid {peer.uid}) via podctl"
        try:
            result = self._handlers[req.op](agent, req, by)
            if asyncio.iscoroutine(result):
                result = await result
            reply: dict[str, Any] = result
        except _Refused as err:
            reply = p.error(str(err))
        except Exception as err:  # a bug answers with an error; the daemon lives on
            log.exception("control request failed", op=req.op)
            reply = p.error(f"internal error: {type(err).__name__}: {err}")
        if req.op in p.WRITE_OPS:
            outcome = "done" if reply.get("ok") else f"failed: {reply.get('error')}"
            agent.events.emit(
                "control_command",
                Severity.INFO,
                f"control: {req.op} by {user} (uid {peer.uid}) {outcome}",
                detail={"op": req.op, "args": args, "uid": peer.uid, "user": user, "pid": peer.pid,
                        "ok": bool(reply.get("ok")), "error": reply.get("error")},
            )  # fmt: skip
        await self._reply(writer, reply)
        return True

    def _refused(self, agent: Agent, op: str, peer: p.PeerCred, user: str) -> bool:
        """Count a refused request; one sampled ``control_refused`` event per uid and interval
        carries the count (a flood is not a flood of audit records). False: over the uid's rate."""
        cfg = self.config
        uid = peer.uid
        now = time.monotonic()
        tokens, at = self._refused_tokens.get(uid, (float(cfg.refused_burst), now))
        tokens = min(float(cfg.refused_burst), tokens + (now - at) * cfg.refused_per_s)
        within = tokens >= 1.0
        self._refused_tokens[uid] = (tokens - 1.0 if within else tokens, now)
        self._refused_total[uid] = self._refused_total.get(uid, 0) + 1
        self._refused_since_event[uid] = self._refused_since_event.get(uid, 0) + 1
        last = self._refused_event_at.get(uid)
        if last is None or now - last >= cfg.refused_event_interval_s:
            count = self._refused_since_event.pop(uid)
            self._refused_event_at[uid] = now
            agent.events.emit(
                "control_refused",
                Severity.WARNING,
                f"control: {op} refused for {user} (uid {uid}): not root or in {cfg.admin_group}"
                + (f" ({count} refused since the last report)" if count > 1 else ""),
                detail={"op": op, "uid": uid, "user": user, "pid": peer.pid, "count": count,
                        "total": self._refused_total[uid]},
            )  # fmt: skip
        return within

    # ------------------------------------------------------------------ read ops
    def _ping(self, agent: Agent, _req: p.Ping, _by: str) -> dict[str, Any]:
        from agent import __version__

        return p.ok(version=__version__, site=agent.config.pod.site, pod=agent.config.pod.id, pid=os.getpid())

    def _status(self, agent: Agent, _req: p.Status, _by: str) -> dict[str, Any]:
        now = time.monotonic()
        summary = agent.summary()
        cooling = []
        for cfg in agent.config.device:
            kind = agent.inventory.role(cfg.id)  # the profile's [device] kind
            if kind not in ("cdu", "chiller"):
                continue
            names = CDU_METRICS if kind == "cdu" else CHILLER_METRICS
            metrics = {}
            for m in names:
                r = agent.store.get(cfg.id, m)
                if r is not None:
                    metrics[m] = reading_dict(agent, r, now)
            cooling.append({"device": cfg.id, "kind": kind, "metrics": metrics})
        gpus = []
        for dev in agent.store.devices():
            temp = agent.store.get(dev, "temp_c")
            if temp is None or agent.store.get(dev, "power_limit_w") is None:
                continue
            row: dict[str, Any] = {"device": dev}
            for m in ("temp_c", "power_w", "power_limit_w", "default_power_limit_w"):
                r = agent.store.get(dev, m)
                row[m] = None if r is None else reading_dict(agent, r, now)
            gpus.append(row)
        budget = agent.fleet_budget
        pod_power = agent.store.get(POD_DEVICE, "power_w")
        interlocks = getattr(agent, "interlocks", None)
        return p.ok(
            status={
                **summary,
                "pod_power": None if pod_power is None else reading_dict(agent, pod_power, now),
                "budget_w": budget.watts if budget is not None and budget.active() else None,
                "cooling": cooling,
                "gpus": gpus,
                # The interlock service's own view (None: not running); replaces its status provider's.
                "interlocks": None if interlocks is None else interlocks.status(),
                "ts": int(time.time() * 1000),
            }
        )

    def _devices(self, agent: Agent, _req: p.Devices, _by: str) -> dict[str, Any]:
        now = time.monotonic()
        health = agent.store.health()
        kinds = {d.id: d.kind for d in agent.config.device}
        out = []
        for dev in sorted(set(agent.store.devices()) | set(health) - {POD_DEVICE}):
            parent = agent.store.parent_of(dev)
            h = health.get(parent)
            readings = agent.store.device_readings(dev)
            qualities = [str(agent.store.effective_quality(r, now)) for r in readings.values()]
            out.append(
                {
                    "id": dev,
                    "kind": kinds.get(parent, "derived"),
                    "parent": None if parent == dev else parent,
                    "status": "derived" if h is None else str(h.current_status(now)),
                    "age_s": None if h is None or h.last_ok_mono is None else round(now - h.last_ok_mono, 2),
                    "error": None if h is None else h.last_error,
                    "metrics": len(qualities),
                    "not_good": sum(q != "good" for q in qualities),
                    "polls": None if h is None else h.polls,
                    "failures": None if h is None else h.failures,
                }
            )
        return p.ok(devices=out)

    def _device(self, agent: Agent, req: p.DeviceDetail, _by: str) -> dict[str, Any]:
        now = time.monotonic()
        readings = agent.store.device_readings(req.id)
        known = {d.id for d in agent.config.device}
        if not readings and req.id not in known:
            raise _Refused(f"no device {req.id!r} (podctl devices lists them)")
        parent = agent.store.parent_of(req.id)
        h = agent.store.health().get(parent)
        return p.ok(
            device={
                "id": req.id,
                "parent": None if parent == req.id else parent,
                "status": None if h is None else str(h.current_status(now)),
                "error": None if h is None else h.last_error,
                "info": dict(agent.store.info(req.id)),
                "metrics": [reading_dict(agent, r, now) for _, r in sorted(readings.items())],
            }
        )

    def _interlocks(self, agent: Agent, _req: p.Interlocks, _by: str) -> dict[str, Any]:
        service = getattr(agent, "interlocks", None)
        return p.ok(running=service is not None, interlocks=None if service is None else service.status())

    def _events(self, agent: Agent, req: p.Events, _by: str) -> dict[str, Any]:
        events = (
            agent.events.unacked()
            if req.unacked
            else agent.events.recent(since_wall=req.since_wall, limit=req.limit)
        )
        if req.unacked and req.since_wall is not None:
            events = [e for e in events if e.ts_wall >= req.since_wall]
        return p.ok(events=[self._event_dict(agent, e) for e in events[-req.limit :]])

    @staticmethod
    def _event_dict(agent: Agent, e: Event) -> dict[str, Any]:
        d = e.to_dict()
        ack = agent.events.acks.get(e.id)
        d["acked_by"] = None if ack is None else ack.by
        return d

    async def _follow(
        self, req: p.Follow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        agent = self._agent
        assert agent is not None
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=FOLLOW_QUEUE)
        dropped = 0

        def on_event(e: Event) -> None:
            nonlocal dropped
            try:
                queue.put_nowait(e)
            except asyncio.QueueFull:
                dropped += 1  # a stalled client loses events, the bus never waits for it

        backlog = [] if req.since_wall is None else agent.events.recent(since_wall=req.since_wall, limit=2000)
        unsubscribe = agent.events.subscribe(on_event)
        hangup = asyncio.create_task(reader.read(), name="control-follow-eof")
        try:
            await self._reply(writer, p.ok(follow=True))
            for e in backlog:
                await self._send(writer, self._follow_line(agent, e))
            while not hangup.done():
                getter = asyncio.create_task(queue.get(), name="control-follow-get")
                await asyncio.wait({getter, hangup}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                if dropped:
                    await self._send(writer, p.encode({"v": p.PROTOCOL_VERSION, "dropped": dropped}))
                    dropped = 0
                await self._send(writer, self._follow_line(agent, getter.result()))
        finally:
            unsubscribe()
            hangup.cancel()

    def _follow_line(self, agent: Agent, e: Event) -> bytes:
        """An event's follow line, encoded once for all followers (acked_by read at encoding)."""
        line = self._line_cache.get(e.id)
        if line is None:
            line = p.encode({"v": p.PROTOCOL_VERSION, "event": self._event_dict(agent, e)})
            if len(self._line_cache) >= 4096:
                self._line_cache.pop(next(iter(self._line_cache)))
            self._line_cache[e.id] = line
        return line

    # ------------------------------------------------------------------ changing ops
    def _ack(self, agent: Agent, req: p.Ack, by: str) -> dict[str, Any]:
        event = agent.events.ack(req.id, by=by)
        if event is None:
            raise _Refused(f"no event {req.id!r} among the recent ones")
        return p.ok(ack=event.to_dict())

    def _service(self, agent: Agent) -> Any:
        service = getattr(agent, "interlocks", None)
        if service is None:
            raise _Refused("the interlock service is not running")
        return service

    def _override(self, agent: Agent, req: p.Override, by: str) -> dict[str, Any]:
        service = self._service(agent)
        try:
            override = service.add_override(
                req.interlock,
                req.device,
                duration_s=req.duration_s,
                reason=req.reason,
                by=by,
                force=req.force,
            )
        except ValueError as err:
            raise _Refused(str(err)) from None
        return p.ok(override=override)

    def _override_clear(self, agent: Agent, req: p.OverrideClear, by: str) -> dict[str, Any]:
        service = self._service(agent)
        try:
            cleared = service.clear_override(req.id, by=by)
        except KeyError:
            raise _Refused(f"no override {req.id!r}") from None
        return p.ok(override=cleared)

    async def _poll(self, agent: Agent, req: p.Poll, _by: str) -> dict[str, Any]:
        parent = agent.store.parent_of(req.device)
        poller = agent.pollers.get(parent)
        if poller is None:
            raise _Refused(f"no device {req.device!r} (podctl devices lists them)")
        now_before = time.monotonic()
        try:  # (a scheduled cycle in flight goes first: the device's lock)
            async with asyncio.timeout(2 * poller.budget_s + 1.0):
                readings = await poller.poll_once()
        except TimeoutError:
            raise _Refused(f"{parent}: no answer within {2 * poller.budget_s + 1.0:.1f} s") from None
        health = agent.store.health().get(parent)
        failed = health is not None and (health.last_poll_mono or 0) >= now_before and health.last_error
        if req.device != parent:
            readings = [r for r in readings if r.device == req.device]
        now = time.monotonic()
        raw: Any = None
        raw_error = None
        if req.raw and poller.has_raw and not failed:
            try:
                async with asyncio.timeout(2 * poller.budget_s):
                    raw = jsonable_raw(await poller.poll_raw())
            except Exception as err:  # a raw read is a diagnostic: report why it failed, go on
                raw_error = f"{type(err).__name__}: {err}"
        return p.ok(
            device=req.device,
            polled=parent,
            error=health.last_error if failed and health is not None else None,
            readings=[reading_dict(agent, r, now) for r in readings],
            raw=raw,
            raw_error=raw_error,
        )

    async def _reload(self, agent: Agent, _req: p.Reload, _by: str) -> dict[str, Any]:
        if agent.config_path is None:
            raise _Refused("the daemon was started without a config file; nothing to reload")
        applied = await agent.reload()
        if not applied:
            why = agent.last_reload_error or f"{agent.config_path} is invalid"
            raise _Refused(f"reload refused (invalid config); the running config is kept:\n{why}")
        return p.ok(applied=True, reloads=agent.reloads)


class _ClientStalled(Exception):
    """The client stopped reading and its write buffer is full: the connection is dropped."""


class _Refused(Exception):
    """A valid request the daemon will not carry out (unknown id, interlocks not running...)."""
