"""The fleet link: MQTT v1 publisher with store-and-forward, birth/death and commands.

Data path: the StateStore's subscriber appends each reading to a pending list (O(1), never
blocks polling); every ``telemetry_period_s`` the flush task turns the pending readings into one
``telemetry/{device}`` message per device (deadbands applied), numbers them (``seq``) and writes
them to the SQLite spool in one transaction. Events and command replies take the same path at
once. While connected, a feeder hands spool rows to a window of publish workers (QoS 1, awaited:
a row is deleted only after its PUBACK): messages made during this connection first, the backlog
(``historical: true``) in between, oldest first.

Connection: brokers tried in order with failover, jittered exponential backoff forever, MQTT 5
with a 3.1.1 fallback, TLS and/or username/password. The will sets the retained ``status`` to
offline; a clean stop publishes offline itself (a clean disconnect never fires the will).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import math
import platform
import random
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import structlog
from aiomqtt import Client, MqttCodeError, MqttError, ProtocolVersion, Will

from agent import __version__
from agent.aio import CLOCK_SLACK_S, raise_if_cancelling
from agent.config import AgentConfig
from agent.events import Event, Severity
from agent.model import Quality, Reading
from agent.publish.commands import CommandHandler
from agent.publish.mqtt_config import Deadband, MqttConfig
from agent.publish.mqtt_replay import ReplayMessage, mark_historical, replay_messages
from agent.publish.spool import EVENT, TELEMETRY, Spool
from agent.publish.topics import Topics
from agent.state import StateStore

log = structlog.get_logger(__name__)

_UNSUPPORTED_PROTOCOL = {1, 132}  # CONNACK codes: 3.1.1 "unacceptable protocol", 5 "unsupported version"
# Spooled rows read per page while replaying (one SQLite query per page, not per message).
_REPLAY_CHUNK = 5000


def _dumps(obj: dict[str, Any]) -> bytes:
    """Everything the agent publishes goes through here, and it can never fail: a non-finite
    number that got past every check (NaN, inf) becomes null, and is logged, rather than kill
    the link on every publish (a ValueError from json.dumps, then a reconnect loop)."""
    try:
        return json.dumps(obj, separators=(",", ":"), default=str, allow_nan=False).encode()
    except ValueError:
        paths: list[str] = []
        clean = _finite_only(obj, "", paths)
        log.error("non-finite numbers in an outgoing message; published as null", fields=paths[:10])
        return json.dumps(clean, separators=(",", ":"), default=str, allow_nan=False).encode()


def _finite_only(value: Any, where: str, paths: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        paths.append(where or ".")
        return None
    if isinstance(value, dict):
        return {k: _finite_only(v, f"{where}.{k}", paths) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_only(v, f"{where}[{i}]", paths) for i, v in enumerate(value)]
    return value


def _ms(wall: float) -> int:
    return int(wall * 1000)


def _num(v: float | None) -> float | int | None:
    if v is None or not math.isfinite(v):  # NaN/inf are not JSON
        return None
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else v


_IDENTITY_KEYS = ("hostname", "gpu", "uuid", "node")


def _gpu_identities(store: StateStore) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for device in store.devices():
        info = store.info(device)
        if "uuid" in info:
            out[device] = {k: info[k] for k in _IDENTITY_KEYS if k in info}
    return out


@dataclass
class _Session:
    """One connection: rows with id <= boundary were spooled before it (the backlog)."""

    boundary: int
    live: deque[tuple[int, str, bytes]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    backlog: deque[ReplayMessage] = field(default_factory=deque)  # the page being replayed
    cursor: int = 0  # last spool id read into the backlog
    replay_started: float = field(default_factory=time.monotonic)
    replayed: int = 0
    replay_done: bool = False


class MqttService:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.cfg: MqttConfig = config.mqtt
        cfg = self.cfg
        self.topics = Topics.for_pod(config.pod.site, config.pod.id, override=cfg.topic_root)
        self.client_id = cfg.client_id or f"podagent-{config.pod.site}-{config.pod.id}"
        self.boot_id = uuid.uuid4().hex
        self.started_wall = time.time()
        # Secrets are read once at start: a missing key file is a refusal to start, not a silent
        # downgrade to unsigned commands.
        self.password = cfg.password_file.read_text().strip() if cfg.password_file else None
        self.hmac_key = cfg.command_hmac_key_file.read_bytes().strip() if cfg.command_hmac_key_file else None
        if cfg.command_hmac_key_file is not None and not self.hmac_key:
            raise ValueError(f"mqtt: command_hmac_key_file {cfg.command_hmac_key_file} is empty")
        self.tls_context = self._tls_context() if cfg.tls_enabled else None
        self.spool_path = cfg.spool_path or Path(config.paths.state_dir) / "mqtt-spool.sqlite"
        self._seq = 0
        self._pending: list[Reading] = []
        self._pending_events: list[bytes] = []
        self._event_wake = asyncio.Event()
        self._next_flush_error_log = 0.0
        self._deadband_cache: dict[tuple[str, str], Deadband | None] = {}
        self._last_sent: dict[tuple[str, str], tuple[float | None, Quality]] = {}
        self._next_full_refresh = 0.0
        self._session: _Session | None = None
        self._acked: list[int] = []
        self._rebirth = asyncio.Event()
        self._protocols: dict[tuple[str, int], ProtocolVersion] = {}
        self.spool: Spool | None = None
        self.agent: Any = None
        self.commands: CommandHandler | None = None
        # Link state and counters (the `mqtt` block of `state` and podctl status).
        self.link = "disconnected"
        self.broker: str | None = None
        self.protocol: str | None = None
        self.connects = 0
        self.messages_spooled = 0
        self.samples_spooled = 0
        self.published = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ setup
    def _tls_context(self) -> ssl.SSLContext:
        cfg = self.cfg
        ctx = ssl.create_default_context(cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cfg.tls_cert_file is not None and cfg.tls_key_file is not None:
            ctx.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file))
        return ctx

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _envelope(self, body: dict[str, Any], *, seq: int | None = None) -> bytes:
        head = {"ts": _ms(time.time()), "seq": self._seq if seq is None else seq, "boot_id": self.boot_id}
        return _dumps({**head, **body})

    def link_status(self) -> dict[str, Any]:
        spool = self.spool
        return {
            "link": self.link,
            "broker": self.broker,
            "protocol": self.protocol,
            "connects": self.connects,
            "boot_id": self.boot_id,
            "seq": self._seq,
            "spool_depth": spool.depth if spool else 0,
            "spool_bytes": spool.bytes if spool else 0,
            "dropped_telemetry": spool.dropped_messages if spool else 0,
            "dropped_samples": spool.dropped_samples if spool else 0,
            "dropped_events": spool.dropped_events if spool else 0,
            "spool_held": spool.held if spool else 0,
            "spool_fault": spool.fault if spool else None,
            "messages_spooled": self.messages_spooled,
            "samples_spooled": self.samples_spooled,
            "published": self.published,
            "commands_accepted": self.commands.accepted if self.commands else 0,
            "commands_refused": self.commands.refused if self.commands else 0,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ inputs (synchronous, cheap)
    def _on_readings(self, readings: Any) -> None:
        self._pending.extend(readings)

    def _on_event(self, event: Event) -> None:
        self._pending_events.append(self._event_body(event))
        self._event_wake.set()
        if event.kind == "config_reloaded":
            # The inventory (devices, their intervals, the interlock hash) may have changed: the
            # fleet gets a new birth, as after a rebirth command.
            self._rebirth.set()

    @staticmethod
    def _event_body(event: Event) -> bytes:
        # Encoded now (the event is immutable); the envelope is added at flush, in order.
        return _dumps(event.to_dict())

    # ------------------------------------------------------------------ lifecycle
    async def run(self, agent: Any) -> None:
        self.agent = agent
        # Never raises for a disk fault (full, read-only, I/O error): it holds in memory and says so.
        self.spool = Spool(
            self.spool_path,
            max_bytes=self.cfg.spool_max_bytes,
            event_max_bytes=self.cfg.spool_event_max_bytes,
            on_fault=self._on_spool_fault,
        )
        agent.metric_sources.append(self.metrics)
        self.commands = CommandHandler(
            agent,
            hmac_key=self.hmac_key,
            max_bytes=self.cfg.command_max_bytes,
            max_ttl_s=self.cfg.command_max_ttl_s,
            rebirth=self._rebirth.set,
            budget_min_w=self.cfg.command_budget_min_w,
            budget_max_w=self.config.power.site_limit_w or 1e8,
            state_path=Path(self.config.paths.state_dir) / "commands.json",
        )
        agent.status_providers["mqtt"] = self.link_status
        unsubscribe = [agent.store.subscribe(self._on_readings), agent.events.subscribe(self._on_event)]
        for event in agent.events.recent(since_wall=self.started_wall - 1):
            self._on_event(event)  # what happened before this service started
        self._next_full_refresh = time.monotonic() + self.cfg.full_refresh_s
        log.info(
            "mqtt publisher starting",
            brokers=self.cfg.brokers,
            topic_root=self.topics.root,
            boot_id=self.boot_id,
            spool=str(self.spool_path),
            spool_depth=self.spool.depth,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._flush_loop(), name="mqtt-flush")
                tg.create_task(self._link_loop(), name="mqtt-link")
        finally:
            for unsub in unsubscribe:
                unsub()
            with contextlib.suppress(Exception):
                self._flush(telemetry=True)  # what is pending survives in the spool
                self._reap()
            self.spool.close()
            with contextlib.suppress(Exception):
                self.commands.close()
            agent.status_providers.pop("mqtt", None)
            with contextlib.suppress(ValueError):
                agent.metric_sources.remove(self.metrics)

    def _on_spool_fault(self, error: str | None) -> None:
        """The spool's disk refused writes (error) or takes them again (None): an event, once each."""
        if self.agent is None:
            return
        where = str(self.spool_path)
        if error is not None:
            self.agent.events.emit(
                "storage_fault",
                Severity.WARNING,
                f"mqtt spool: the disk refuses writes ({error}); holding messages in memory",
                detail={"store": "spool", "path": where, "error": error},
            )
        else:
            self.agent.events.emit(
                "storage_recovered",
                Severity.INFO,
                "mqtt spool: the disk takes writes again",
                detail={"store": "spool", "path": where},
            )

    def metrics(self) -> list[tuple[str, list[tuple[str, str]], float, str]]:
        spool = self.spool
        if spool is None:
            return []
        store = [("store", "spool")]
        return [
            ("podagent_storage_fault", store, 1 if spool.faulty else 0,
             "1 while a state-directory store cannot write (disk full, read-only, I/O error)."),
            ("podagent_storage_faults_total", store, spool.faults, "Times a store's disk refused writes."),
            ("podagent_spool_disk_bytes", [], spool.disk_bytes(),
             "What the MQTT spool's files take on disk (database, WAL, journal)."),
            ("podagent_spool_held_messages", [], spool.held,
             "Messages held in memory because the spool's disk refused them."),
            ("podagent_spool_dropped_events_total", [], spool.dropped_events,
             "Events and command replies dropped from the spool past their allowance."),
        ]  # fmt: skip

    # ------------------------------------------------------------------ flush: pending -> spool
    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.cfg.telemetry_period_s
        next_t = loop.time() + period
        while True:
            raise_if_cancelling()
            remaining = next_t - loop.time()
            if remaining > CLOCK_SLACK_S and not self._event_wake.is_set():
                # asyncio.wait, not timeout(): it can never turn our own cancellation into a
                # suppressed TimeoutError (a 3.11 race), so the agent always stops.
                waiter = asyncio.ensure_future(self._event_wake.wait())
                try:
                    await asyncio.wait({waiter}, timeout=remaining)
                finally:
                    waiter.cancel()
            self._event_wake.clear()
            now = loop.time()
            # Due within the loop clock's resolution counts as due: uvloop's clock counts whole ms,
            # and a float remainder of 1e-16 would otherwise be waited for again, and again.
            full = now >= next_t - CLOCK_SLACK_S
            if full:
                next_t = max(next_t + period, now + period / 10)
            try:
                self._flush(telemetry=full)
            except Exception:  # a bug here must not take the agent (and its interlocks) down
                if now >= self._next_flush_error_log:
                    self._next_flush_error_log = now + 60.0
                    log.exception("mqtt flush failed; going on")

    def _deadband(self, device: str, metric: str) -> Deadband | None:
        key = (device, metric)
        try:
            return self._deadband_cache[key]
        except KeyError:
            found = None
            for db in self.cfg.deadbands:
                if fnmatch.fnmatchcase(metric, db.pattern) or fnmatch.fnmatchcase(
                    f"{device}/{metric}", db.pattern
                ):
                    found = db
                    break
            self._deadband_cache[key] = found
            return found

    def _passes(self, r: Reading) -> bool:
        """Report by exception: send when the change exceeds the band (the larger of absolute and
        relative), on any quality change, and always for metrics without a deadband."""
        db = self._deadband(r.device, r.metric)
        if db is None:
            return True
        key = r.key
        last = self._last_sent.get(key)
        if last is not None and last[1] is r.quality and r.value is not None and last[0] is not None:
            band = max(db.absolute or 0.0, (db.relative or 0.0) * abs(last[0]))
            if abs(r.value - last[0]) <= band:
                return False
        self._last_sent[key] = (r.value, r.quality)
        return True

    @staticmethod
    def _encode_reading(r: Reading) -> dict[str, Any]:
        out: dict[str, Any] = {"m": r.metric, "v": _num(r.value), "t": _ms(r.ts_wall)}
        if r.quality is not Quality.GOOD:
            out["q"] = str(r.quality)
        if r.error:
            out["e"] = r.error
        return out

    def _flush(self, *, telemetry: bool) -> None:
        rows: list[tuple[int, str, bytes, int]] = []
        if self._pending_events:
            bodies, self._pending_events = self._pending_events, []
            for body in bodies:
                seq = self.next_seq()
                head = _dumps({"ts": _ms(time.time()), "seq": seq, "boot_id": self.boot_id})
                rows.append((EVENT, self.topics.event, head[:-1] + b',"event":' + body + b"}", 0))
        if telemetry:
            rows.extend(self._telemetry_rows())
        if not rows or self.spool is None:
            return
        ids = self.spool.append(rows)
        self.messages_spooled += len(rows)
        self.samples_spooled += sum(r[3] for r in rows)
        session = self._session
        if session is not None:
            session.live.extend((i, r[1], r[2]) for i, r in zip(ids, rows, strict=True))
            session.wake.set()

    def _telemetry_rows(self) -> list[tuple[int, str, bytes, int]]:
        readings, self._pending = self._pending, []
        full = time.monotonic() >= self._next_full_refresh
        by_device: dict[str, list[Reading]] = {}
        if full:
            self._next_full_refresh = time.monotonic() + self.cfg.full_refresh_s
            seen = set()
            for r in readings:
                by_device.setdefault(r.device, []).append(r)
                seen.add(r.key)
                if r.key in self._last_sent or self._deadband(r.device, r.metric) is not None:
                    self._last_sent[r.key] = (r.value, r.quality)
            if self.agent is not None:
                for key, r in self.agent.store.readings().items():
                    if key not in seen:
                        by_device.setdefault(r.device, []).append(r)
                        if self._deadband(r.device, r.metric) is not None:
                            self._last_sent[key] = (r.value, r.quality)
        else:
            for r in readings:
                if self._passes(r):
                    by_device.setdefault(r.device, []).append(r)
        rows = []
        now_ms = _ms(time.time())
        enc = self._encode_reading
        for device, items in by_device.items():
            body = {
                "ts": now_ms,
                "seq": self.next_seq(),
                "boot_id": self.boot_id,
                "device": device,
                "readings": [enc(r) for r in items],
            }
            if full:
                body["full"] = True
            rows.append((TELEMETRY, self.topics.telemetry(device), _dumps(body), len(items)))
        return rows

    def _reap(self) -> None:
        if self._acked and self.spool is not None:
            acked, self._acked = self._acked, []
            self.spool.delete(acked)

    # ------------------------------------------------------------------ the connection
    async def _link_loop(self) -> None:
        addresses = self.cfg.broker_addresses()
        idx = 0
        failed_in_row = 0
        while True:
            raise_if_cancelling()
            host, port = addresses[idx]
            self.link = "connecting"
            connected_before = self.connects
            try:
                await self._connection(host, port)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # MqttError, or a group of them from the session's tasks
                reason = _describe(err)
                if reason != self.last_error or self.connects != connected_before:
                    log.warning("mqtt link down", broker=f"{host}:{port}", error=reason)
                self.last_error = reason
            self.link = "disconnected"
            self.broker = None
            if self.connects != connected_before:
                # It was up: retry the same broker first, after the shortest backoff.
                failed_in_row = 0
                await asyncio.sleep(random.uniform(0, self.cfg.reconnect_min_s))
                continue
            failed_in_row += 1
            idx = (idx + 1) % len(addresses)
            if idx == 0 or len(addresses) == 1:
                rounds = failed_in_row // len(addresses)
                cap = min(self.cfg.reconnect_max_s, self.cfg.reconnect_min_s * 2 ** min(rounds, 16))
                low = self.cfg.reconnect_min_s
                await asyncio.sleep(random.uniform(low, max(cap, low)))

    def _client(self, host: str, port: int, protocol: ProtocolVersion) -> Client:
        offline = self._envelope({"status": "offline", "reason": "connection lost"})
        return Client(
            host,
            port,
            username=self.cfg.username,
            password=self.password,
            identifier=self.client_id,
            protocol=protocol,
            will=Will(self.topics.status, offline, qos=1, retain=True),
            keepalive=self.cfg.keepalive_s,
            timeout=self.cfg.connect_timeout_s,
            tls_context=self.tls_context,
            max_inflight_messages=max(self.cfg.replay_window, 20),
            clean_session=True if protocol is not ProtocolVersion.V5 else None,
        )

    async def _connection(self, host: str, port: int) -> None:
        cfg = self.cfg
        if cfg.protocol == "3.1.1":
            protocol = ProtocolVersion.V311
        else:
            protocol = self._protocols.get((host, port), ProtocolVersion.V5)
        client = self._client(host, port, protocol)
        client.pending_calls_threshold = cfg.replay_window + 100  # our window is bounded on purpose
        try:
            await client.__aenter__()
        except MqttCodeError as err:
            code = getattr(err.rc, "value", err.rc)
            if cfg.protocol == "auto" and protocol is ProtocolVersion.V5 and code in _UNSUPPORTED_PROTOCOL:
                log.info("broker refuses MQTT 5; falling back to 3.1.1", broker=f"{host}:{port}")
                self._protocols[(host, port)] = ProtocolVersion.V311
                client = self._client(host, port, ProtocolVersion.V311)
                client.pending_calls_threshold = cfg.replay_window + 100
                await client.__aenter__()
                protocol = ProtocolVersion.V311
            else:
                raise
        self.connects += 1
        self.link = "connected"
        self.broker = f"{host}:{port}"
        self.protocol = "5" if protocol is ProtocolVersion.V5 else "3.1.1"
        self.last_error = None
        assert self.spool is not None
        log.info(
            "mqtt connected",
            broker=self.broker,
            protocol=self.protocol,
            backlog=self.spool.depth,
            connects=self.connects,
        )
        clean = False
        try:
            # Its own task: Python 3.11's TaskGroup leaks a cancel request onto the task that hosts
            # it when a child fails (it uncancels before waiting; fixed in 3.12), which would make
            # this long-lived loop look cancelled for ever after the first lost connection.
            await asyncio.create_task(self._session_run(client), name="mqtt-session")
        except asyncio.CancelledError:
            # The agent is stopping: hand over what we can, then say goodbye ourselves.
            clean = True
            with contextlib.suppress(Exception):
                await self._goodbye(client)
            raise
        finally:
            self._session = None
            self._reap()
            if clean:
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)
            else:
                # Usually the broker is gone already (aexit returns at once); after any other
                # failure this disconnects cleanly and the next connection says online again.
                with contextlib.suppress(Exception):
                    await client.__aexit__(MqttError, None, None)
                # Mark aiomqtt's disconnect error as seen (else asyncio logs "never retrieved").
                gone = getattr(client, "_disconnected", None)
                if isinstance(gone, asyncio.Future) and gone.done() and not gone.cancelled():
                    gone.exception()

    async def _session_run(self, client: Client) -> None:
        await client.subscribe(self.topics.cmd_filter, qos=1)
        await self._publish_status(client)
        await self._publish_birth(client)
        assert self.spool is not None
        self._reap()
        session = _Session(boundary=self.spool.max_id())
        # What the disk refused sits in memory: it goes out with the live messages.
        session.live.extend((m.id, m.topic, m.payload) for m in self.spool.held_messages())
        self._session = session
        if self._pending_events:
            self._event_wake.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._receive(client), name="mqtt-receive")
            for i in range(self.cfg.replay_window):
                tg.create_task(self._worker(client, session), name=f"mqtt-publish[{i}]")
            tg.create_task(self._reaper(), name="mqtt-reaper")
            tg.create_task(self._state_loop(client), name="mqtt-state")

    def _next_message(self, session: _Session) -> ReplayMessage | None:
        """Live messages first; the backlog (rows spooled before this connection) in between,
        read from the spool a page at a time, several rows of a device per message (already
        marked historical). None: nothing to send now."""
        if session.live:
            rowid, topic, payload = session.live.popleft()
            if rowid <= session.boundary:  # held in memory from before this connection
                payload = mark_historical(payload)
                session.replayed += 1
            return (rowid,), topic, payload
        if session.backlog:
            return session.backlog.popleft()
        if session.replay_done:
            return None
        assert self.spool is not None
        rows = self.spool.read(after_id=session.cursor, upto_id=session.boundary, limit=_REPLAY_CHUNK)
        if rows:
            session.cursor = rows[-1].id
            session.replayed += len(rows)
            session.backlog.extend(
                replay_messages(
                    rows, telemetry_prefix=f"{self.topics.root}/telemetry/", max_rows=self.cfg.replay_batch
                )
            )
            return session.backlog.popleft()
        session.replay_done = True
        if session.replayed:
            elapsed = time.monotonic() - session.replay_started
            log.info(
                "spool replayed",
                messages=session.replayed,
                seconds=round(elapsed, 2),
                rate=round(session.replayed / max(elapsed, 1e-6)),
            )
        return None

    async def _worker(self, client: Client, session: _Session) -> None:
        """One of ``replay_window`` publishers: takes the next message itself (no feeder task and
        queue between: one wake-up per message fewer) and waits for its PUBACK."""
        timeout = max(10.0, self.cfg.keepalive_s * 1.5)
        while True:
            raise_if_cancelling()
            item = self._next_message(session)
            if item is None:
                session.wake.clear()
                await session.wake.wait()
                continue
            rowids, topic, payload = item
            await client.publish(topic, payload, qos=1, timeout=timeout)
            self._acked.extend(rowids)
            self.published += 1

    async def _reaper(self) -> None:
        while True:
            raise_if_cancelling()
            await asyncio.sleep(0.25)
            self._reap()

    async def _receive(self, client: Client) -> None:
        assert self.commands is not None
        async for message in client.messages:
            raise_if_cancelling()
            name = self.topics.command_name(str(message.topic))
            if name is None:
                continue
            reply = self.commands.handle(name, message.payload)
            body = _dumps(reply)
            seq = self.next_seq()
            head = _dumps({"ts": _ms(time.time()), "seq": seq, "boot_id": self.boot_id})
            row = (EVENT, self.topics.cmd_reply, head[:-1] + b"," + body[1:], 0)
            assert self.spool is not None
            ids = self.spool.append([row])
            self.messages_spooled += 1
            session = self._session
            if session is not None:
                session.live.append((ids[0], row[1], row[2]))
                session.wake.set()

    # ------------------------------------------------------------------ status, birth, state
    async def _publish_status(self, client: Client, *, online: bool = True, reason: str = "") -> None:
        body: dict[str, Any] = {
            "status": "online" if online else "offline",
            "version": __version__,
            "started_at": _ms(self.started_wall),
            "broker": self.broker,
            "protocol": self.protocol,
        }
        if reason:
            body["reason"] = reason
        await client.publish(self.topics.status, self._envelope(body), qos=1, retain=True)

    def birth_body(self) -> dict[str, Any]:
        agent = self.agent
        metrics: dict[str, dict[str, str]] = {}
        for (device, metric), r in agent.store.readings().items():
            metrics.setdefault(device, {})[metric] = r.unit
        interlocks_hash = None
        provider = agent.status_providers.get("interlocks")
        if provider is not None:
            with contextlib.suppress(Exception):
                info = provider()
                if isinstance(info, dict):
                    interlocks_hash = info.get("config_hash")
        return {
            "pod": {"site": self.config.pod.site, "id": self.config.pod.id},
            "devices": [
                # The config in force (a reload replaces the agent's; this publisher's is its start's).
                {"id": d.id, "kind": d.kind, "poll_interval_s": d.poll_interval_s}
                for d in agent.config.device
            ],
            "metrics": metrics,
            # Each GPU's identity (docs/mqtt.md): the pod-unique device id of its telemetry topic
            # -> the server's hostname, the local index and the UUID (dcgm-exporter's labels).
            "gpus": _gpu_identities(agent.store),
            "interlocks_config_hash": interlocks_hash,
            "telemetry_period_s": self.cfg.telemetry_period_s,
            "full_refresh_s": self.cfg.full_refresh_s,
            "deadbands": [db.model_dump(exclude_none=True) for db in self.cfg.deadbands],
            "versions": {
                "podagent": __version__,
                "python": platform.python_version(),
                "aiomqtt": getattr(aiomqtt, "__version__", "?"),
                "mqtt_protocol": self.protocol,
            },
            "spool_depth": self.spool.depth if self.spool else 0,
        }

    async def _publish_birth(self, client: Client) -> int:
        body = self.birth_body()
        await client.publish(self.topics.birth, self._envelope(body), qos=1)
        return sum(len(m) for m in body["metrics"].values())

    def _state_key(self, summary: dict[str, Any]) -> str:
        """What counts as a change of state: not the clocks (uptime, ages) or counters."""
        stable = {k: v for k, v in summary.items() if k not in ("uptime_s", "mqtt")}
        stable["devices"] = {d: {**h, "age_s": None} for d, h in summary.get("devices", {}).items()}
        mqtt = summary.get("mqtt", {})
        stable["mqtt"] = {k: mqtt.get(k) for k in ("link", "broker", "dropped_telemetry")}
        return json.dumps(stable, sort_keys=True, default=str)

    async def _state_loop(self, client: Client) -> None:
        cfg = self.cfg
        metrics_at_birth = len(self.agent.store.readings())
        last_key = ""
        last_pub = -1e9
        tick = max(0.1, min(0.5, cfg.state_min_interval_s))
        while True:
            raise_if_cancelling()
            now = time.monotonic()
            n_metrics = len(self.agent.store.readings())
            if self._rebirth.is_set() or n_metrics != metrics_at_birth:
                # Sparkplug's rebirth: on request, and when the inventory grew (first polls).
                self._rebirth.clear()
                metrics_at_birth = n_metrics
                await self._publish_birth(client)
            summary = self.agent.summary()
            key = self._state_key(summary)
            since = now - last_pub
            if (key != last_key and since >= cfg.state_min_interval_s) or since >= cfg.state_max_interval_s:
                payload = self._envelope({"state": summary})
                await client.publish(self.topics.state, payload, qos=1, retain=True)
                last_key, last_pub = key, now
            await asyncio.sleep(tick)

    async def _goodbye(self, client: Client) -> None:
        """Clean stop: spool what is pending, send the rest (bounded), final state, then offline."""
        assert self.spool is not None
        self._flush(telemetry=True)
        self._reap()
        deadline = time.monotonic() + self.cfg.drain_on_stop_s
        sem = asyncio.Semaphore(self.cfg.replay_window)
        cursor = 0
        pending: set[asyncio.Task[None]] = set()

        async def one(rowid: int, topic: str, payload: bytes) -> None:
            try:
                await client.publish(topic, payload, qos=1, timeout=max(0.1, deadline - time.monotonic()))
                self._acked.append(rowid)
                self.published += 1
            finally:
                sem.release()

        with contextlib.suppress(Exception):
            while time.monotonic() < deadline:
                rows = self.spool.read(after_id=cursor, upto_id=self.spool.max_id(), limit=_REPLAY_CHUNK)
                if not rows:
                    break
                cursor = rows[-1].id
                for r in rows:
                    await sem.acquire()
                    pending.add(asyncio.create_task(one(r.id, r.topic, r.payload)))
            if pending:
                await asyncio.wait(pending, timeout=max(0.1, deadline - time.monotonic()))
        for t in pending:
            t.cancel()
        self._reap()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await client.publish(
                    self.topics.state, self._envelope({"state": self.agent.summary()}), qos=1, retain=True
                )
                await self._publish_status(client, online=False, reason="stopped")
        log.info("mqtt link closed cleanly", spool_depth=self.spool.depth)


def _describe(err: BaseException) -> str:
    if isinstance(err, BaseExceptionGroup):
        inner = [e for e in err.exceptions if not isinstance(e, asyncio.CancelledError)]
        return "; ".join(_describe(e) for e in inner[:3]) or "cancelled"
    return f"{type(err).__name__}: {err}"


def build_service(config: AgentConfig) -> MqttService | None:
    """The CLI's hook: None when ``[mqtt] enabled = false``."""
    if not config.mqtt.enabled:
        return None
    return MqttService(config)
