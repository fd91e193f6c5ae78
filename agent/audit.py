"""The local audit log: every event (trips, clears, actions, read-backs, failures, overrides,
commands) appended as one JSON line under the state directory, rotated by size.

Safety records (``events.is_safety``: trips, clears, actions, overrides, acks, critical events)
also go to a second file, ``safety.jsonl``, whose rotated copies are removed only once they are
older than ``safety_keep_s``: however much other traffic fills ``audit.jsonl`` and its backups,
the safety history of that period stays (bounded by ``safety_max_backups`` files).

A disk fault (full, read-only, I/O error) is a condition: lines the disk refuses wait in memory
(bounded; safety lines are the last to go), the first refusal is an event (``storage_fault``) and
a metric, later writes retry, and recovery is an event too. A short write is cut back, so the
file never holds half a line. Nothing here raises into the event bus.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from pathlib import Path

import structlog

from agent.events import Event, EventBus, Severity, is_safety

log = structlog.get_logger(__name__)

PENDING_MAX_BYTES = 4 << 20  # lines held in memory while the disk refuses them
RETRY_S = 1.0


class _LogFile:
    """One append-only JSON-lines file with size rotation; raw fd writes of whole lines."""

    def __init__(self, path: Path, *, max_bytes: int, backups: int, keep_s: float | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.keep_s = keep_s  # None: a plain count of backups; else keep backups younger than this
        self.fd: int | None = None
        self.size = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def write(self, data: bytes) -> None:
        """Append whole lines; OSError when the disk refuses (the file is left as it was)."""
        if self.fd is None:
            self.open()
        fd = self.fd
        assert fd is not None
        start = self.size
        try:
            done = 0
            while done < len(data):
                n = os.write(fd, data[done:])
                if n <= 0:
                    raise OSError(28, "short write")
                done += n
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)  # no half line left behind
            raise
        self.size = start + len(data)
        if self.size >= self.max_bytes:
            try:
                self.rotate()
            except OSError as err:  # the line is written; rotation is tried again on the next one
                log.warning("audit log rotation failed", path=str(self.path), error=str(err))
                if self.fd is None:
                    with contextlib.suppress(OSError):
                        self.open()

    def rotate(self) -> None:
        self.close()
        name = self.path.name
        if self.keep_s is None:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{name}.1"))
        else:
            # Time-kept backups carry their rotation time, so none is renamed or lost to a count.
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            target = self.path.with_name(f"{name}.{stamp}")
            n = 0
            while target.exists():
                n += 1
                target = self.path.with_name(f"{name}.{stamp}-{n}")
            os.replace(self.path, target)
            self._expire()
        self.open()

    def _expire(self) -> None:
        assert self.keep_s is not None
        backups = sorted(self.path.parent.glob(f"{self.path.name}.*"), key=lambda p: p.name)
        now = time.time()
        for i, old in enumerate(backups):
            too_many = len(backups) - i > self.backups
            try:
                expired = now - old.stat().st_mtime > self.keep_s
            except OSError:
                continue
            if expired or too_many:
                with contextlib.suppress(OSError):
                    old.unlink()

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


class AuditLog:
    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 10 * 2**20,
        backups: int = 5,
        safety_keep_s: float = 90 * 86400.0,
        safety_max_backups: int = 200,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._all = _LogFile(path, max_bytes=max_bytes, backups=backups)
        self._safety = _LogFile(
            path.with_name("safety.jsonl"),
            max_bytes=max_bytes,
            backups=safety_max_backups,
            keep_s=safety_keep_s,
        )
        self.written = 0
        self._bus: EventBus | None = None
        self._opened = False
        # Lines the disk refused: (safety?, file, bytes), oldest first.
        self._pending: deque[tuple[bool, _LogFile, bytes]] = deque()
        self._pending_bytes = 0
        self.dropped = 0  # lines lost because memory was full too
        self.fault: str | None = None
        self.faults = 0
        self._retry_at = 0.0
        self._in_write = False

    @property
    def safety_path(self) -> Path:
        return self._safety.path

    def open(self) -> None:
        """Open both files; OSError if the directory refuses (the caller decides; writes retry)."""
        self._opened = True
        self._all.open()
        self._safety.open()

    def attach(self, bus: EventBus) -> None:
        self._bus = bus
        self._opened = True
        try:
            self._all.open()
            self._safety.open()
        except OSError as err:  # a full or read-only disk at start: a condition, not a refusal to run
            self._set_fault(err)
        bus.subscribe(self.write)

    def write(self, event: Event) -> None:
        if not self._opened:
            return
        line = (json.dumps(event.to_dict(), separators=(",", ":"), default=str) + "\n").encode()
        safety = is_safety(event)
        self._queue(False, self._all, line)
        if safety:
            self._queue(True, self._safety, line)
        self.written += 1
        self._drain()

    def _queue(self, safety: bool, target: _LogFile, line: bytes) -> None:
        self._pending.append((safety, target, line))
        self._pending_bytes += len(line)
        while self._pending_bytes > PENDING_MAX_BYTES and self._pending:
            # Memory is bounded too: the oldest ordinary line goes first, safety lines last.
            victim = next((i for i, p in enumerate(self._pending) if not p[0]), 0)
            gone = self._pending[victim]
            del self._pending[victim]
            self._pending_bytes -= len(gone[2])
            self.dropped += 1

    def _drain(self) -> None:
        if self._in_write:
            return  # the fault event itself, written from inside a write: it is queued already
        if self.fault is not None and time.monotonic() < self._retry_at:
            return
        self._in_write = True
        try:
            for _ in range(2):  # a second pass writes the recovery event itself
                while self._pending:
                    _, target, line = self._pending[0]
                    try:
                        target.write(line)
                    except OSError as err:
                        self._set_fault(err)
                        return
                    self._pending.popleft()
                    self._pending_bytes -= len(line)
                if self.fault is None:
                    break
                self._recovered()
        finally:
            self._in_write = False

    def _set_fault(self, err: OSError) -> None:
        self._retry_at = time.monotonic() + RETRY_S
        why = f"{type(err).__name__}: {err}"
        if self.fault is None:
            self.fault = why
            self.faults += 1
            log.error("audit log write failed; holding lines in memory", path=str(self.path), error=why)
            self._emit(
                "storage_fault",
                Severity.WARNING,
                f"audit log: the disk refuses writes ({why}); holding lines in memory",
                {"store": "audit", "path": str(self.path), "error": why},
            )
        self.fault = why

    def _recovered(self) -> None:
        log.warning("audit log writes again", path=str(self.path), was=self.fault, lost=self.dropped)
        self.fault = None
        self._emit(
            "storage_recovered",
            Severity.INFO,
            "audit log: the disk takes writes again",
            {"store": "audit", "path": str(self.path), "lost_lines": self.dropped},
        )

    def _emit(self, kind: str, severity: Severity, message: str, detail: dict[str, object]) -> None:
        if self._bus is None:
            return
        was = self._in_write
        self._in_write = True  # the event comes back to write(): queue it, do not recurse
        try:
            self._bus.emit(kind, severity, message, detail=detail)
        finally:
            self._in_write = was

    def metrics(self) -> list[tuple[str, list[tuple[str, str]], float, str]]:
        store = [("store", "audit")]
        return [
            ("podagent_storage_fault", store, 1 if self.fault is not None else 0,
             "1 while a state-directory store cannot write (disk full, read-only, I/O error)."),
            ("podagent_storage_faults_total", store, self.faults, "Times a store's disk refused writes."),
            ("podagent_audit_pending_lines", [], len(self._pending),
             "Audit lines held in memory because the disk refused them."),
            ("podagent_audit_lost_lines_total", [], self.dropped,
             "Audit lines lost because the disk refused them and memory was full."),
        ]  # fmt: skip

    def close(self) -> None:
        if self._pending:
            self._retry_at = 0.0
            self._drain()
        self._all.close()
        self._safety.close()
        self._opened = False
