"""The MQTT store-and-forward spool: SQLite in WAL mode, bounded on disk, oldest telemetry first.

Every telemetry batch and event is written here before it is published, and deleted only after
its PUBACK. ``synchronous=NORMAL`` in WAL mode survives a killed process (``kill -9``); only a
power cut can lose the last transactions. Rows keep their payload exactly as first built
(``boot_id`` and ``seq`` of the boot that made them), so a replay after a restart is the old boot's
data, as it was.

The bound is on what the spool really occupies on disk: the database's used pages plus the WAL
(and a rollback journal, if one is ever left), not the payload bytes alone. The WAL is kept small
(``wal_autocheckpoint`` and ``journal_size_limit`` sized from the bound). Over the bound, the oldest
telemetry goes first, a few rows at a time; events and command replies have their own, separate
allowance (a quarter of the bound by default) inside it, and only past that are the oldest events
dropped. Both are counted.

A disk fault (ENOSPC, EIO, a read-only filesystem, a database that cannot be opened) is a
condition, never an exception to the caller: rows the disk refuses are held in memory (bounded the
same way) with provisional negative ids, ``fault`` says why, ``on_fault`` hears of each change,
and every later call retries (at most once a second, backing off to 10 s) until the disk takes
them again.

Calls are synchronous and short (one transaction per flush, per replay chunk, per ack batch):
they run on the event loop, a few per second, each well under a millisecond or two.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

TELEMETRY = 0  # dropped first when the spool is full
EVENT = 1  # events and command replies: their own allowance, dropped only past it
ROW_OVERHEAD = 48  # bytes a row costs beyond its payload, roughly, for the logical count
STEP_ROWS = 32  # rows dropped per step when over the bound: a few, not a chunk
RETRY_MIN_S = 1.0
RETRY_MAX_S = 10.0
RECOVERY_QUIET_S = 10.0  # writes working this long after the last refusal: the fault is over

_SCHEMA = """
CREATE TABLE IF NOT EXISTS msgs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    samples INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS msgs_kind ON msgs (kind, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

Row = tuple[int, str, bytes, int]  # kind, topic, payload, samples
FaultListener = Callable[[str | None], None]


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    id: int
    topic: str
    payload: bytes
    samples: int = -1  # the readings in a telemetry payload (-1: not known)


class _DiskFault(Exception):
    pass


class Spool:
    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 1 << 30,
        event_max_bytes: int | None = None,
        memory_max_bytes: int | None = None,
        on_fault: FaultListener | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.event_max_bytes = max_bytes // 4 if event_max_bytes is None else min(event_max_bytes, max_bytes)
        # What the WAL may take of the bound; the rest is for the database's pages.
        # A checkpoint runs once the WAL holds a quarter of its share, leaving the rest for the
        # transaction that crossed it (an insert plus a step of drops writes ~10-15 pages). Under
        # 256 KiB the share is too small for that and the WAL may pass it.
        self.wal_bytes = max(max_bytes // 8, min(64 * 1024, max_bytes // 4))
        self.data_max_bytes = max(max_bytes - self.wal_bytes - 4 * 4096, max_bytes // 2)
        self.memory_max_bytes = min(max_bytes, 16 << 20) if memory_max_bytes is None else memory_max_bytes
        self.on_fault = on_fault
        self._db: sqlite3.Connection | None = None
        self._page_size = 4096
        self.depth = 0
        self.bytes = 0  # logical: payload + ROW_OVERHEAD per row, on disk and held in memory
        self.event_bytes = 0
        self.dropped_messages = 0  # telemetry
        self.dropped_samples = 0
        self.dropped_events = 0
        self.fault: str | None = None  # the last refusal, while the disk refuses
        self._reported = False
        self._last_fault = 0.0
        self.faults = 0  # how many times the disk refused us (a counter for /metrics)
        self._retry_at = 0.0
        self._backoff = RETRY_MIN_S
        # Rows the disk refused, oldest first: provisional id (negative) -> row.
        self._held: OrderedDict[int, Row] = OrderedDict()
        self._held_bytes = 0
        self._held_event_bytes = 0
        self._next_held = -1
        self._moved: dict[int, int] = {}  # provisional id -> id on disk, once it was written
        self._undeleted: list[int] = []  # acked ids the disk could not delete yet
        self._dropped_now = [0, 0]  # telemetry, events dropped since the last log line
        self._next_drop_log = 0.0
        self._open()
        if self.depth:
            log.info("spool holds messages from before; they will be replayed", depth=self.depth)

    # ------------------------------------------------------------------ open / faults
    def _open(self) -> bool:
        db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
            db.execute(f"PRAGMA wal_autocheckpoint={max(1, self.wal_bytes // self._page_size // 4)}")
            db.execute(f"PRAGMA journal_size_limit={self.wal_bytes}")
            db.executescript(_SCHEMA)
            rows = db.execute(
                "SELECT kind, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM msgs GROUP BY kind"
            ).fetchall()
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except (sqlite3.Error, OSError) as err:
            if db is not None:
                db.close()
            self._set_fault(f"cannot open {self.path}: {_why(err)}")
            return False
        self._db = db
        disk_depth = sum(r[1] for r in rows)
        disk_bytes = sum(r[2] + r[1] * ROW_OVERHEAD for r in rows)
        disk_events = sum(r[2] + r[1] * ROW_OVERHEAD for r in rows if r[0] == EVENT)
        self.depth = disk_depth + len(self._held)
        self.bytes = disk_bytes + self._held_bytes
        self.event_bytes = disk_events + self._held_event_bytes
        # Counters only grow: what this run counted while the disk was away is not lost.
        self.dropped_messages = max(self.dropped_messages, int(meta.get("dropped_messages", 0)))
        self.dropped_samples = max(self.dropped_samples, int(meta.get("dropped_samples", 0)))
        self.dropped_events = max(self.dropped_events, int(meta.get("dropped_events", 0)))
        return True

    def _set_fault(self, why: str) -> None:
        now = time.monotonic()
        self._retry_at = now + self._backoff
        self._backoff = min(RETRY_MAX_S, self._backoff * 2)
        self._last_fault = now
        self.fault = why
        if not self._reported:
            self._reported = True
            self.faults += 1
            log.error("spool write failed; holding messages in memory until the disk takes them", error=why)
            self._notify(why)

    def _clear_fault(self) -> None:
        """A write went through. Recovery is reported once writes kept working for a while, so a
        disk that takes one write in two (full, with our drops making room) is one condition."""
        self._backoff = RETRY_MIN_S
        self.fault = None
        if self._reported and time.monotonic() - self._last_fault >= RECOVERY_QUIET_S and not self._held:
            self._reported = False
            log.warning("spool writes again")
            self._notify(None)

    @property
    def faulty(self) -> bool:
        """True from the first refused write until recovery was reported."""
        return self._reported

    def _notify(self, why: str | None) -> None:
        if self.on_fault is not None:
            try:
                self.on_fault(why)
            except Exception:  # a listener's bug must not turn a disk fault into a crash
                log.exception("spool fault listener failed")

    def _disk_ready(self) -> bool:
        """May we try the disk now? (Always when healthy; after a fault, once the backoff ran out.)"""
        if self.fault is not None and time.monotonic() < self._retry_at:
            return False
        if self._db is None:
            return self._open()
        return True

    def _rollback(self) -> None:
        db = self._db
        if db is not None and db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as err:  # the disk is gone: start over with a fresh connection
                log.warning("spool rollback failed; reopening", error=_why(err))
                self._reopen()

    def _reopen(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def close(self) -> None:
        if self._db is not None:
            self.retry()
            try:
                self._db.close()
            except sqlite3.Error as err:
                log.warning("spool close failed", error=_why(err))
            self._db = None
        if self._held:
            log.warning("spool closed with messages the disk refused; they are lost", held=len(self._held))

    # ------------------------------------------------------------------ sizes
    def disk_bytes(self) -> int:
        """What the spool's files take on disk: database, WAL and any rollback journal."""
        total = 0
        for suffix in ("", "-wal", "-journal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def _used_bytes(self) -> int:
        """The database's pages in use (inside the current transaction). The file never grows past
        its used pages plus the free ones it reuses, and the WAL has its own share of the bound."""
        assert self._db is not None
        pages = int(self._db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * self._page_size

    @property
    def held(self) -> int:
        """Messages the disk refused, waiting in memory."""
        return len(self._held)

    # ------------------------------------------------------------------ writes
    def append(self, rows: Sequence[Row]) -> list[int]:
        """Store (kind, topic, payload, samples) rows; returns their ids in order (negative: held in
        memory because the disk refused them). Never raises for a disk fault."""
        if not rows:
            self.retry()
            return []
        if self._disk_ready() and not self._held and not self._undeleted:
            try:
                ids = self._insert(rows)
            except _DiskFault as err:
                self._set_fault(str(err))
            else:
                self._clear_fault()
                return ids
        ids = [self._hold(row) for row in rows]
        self.retry()
        return ids

    def _insert(self, rows: Sequence[Row], *, retry_when_full: bool = True) -> list[int]:
        """One transaction: the rows, then the bound. _DiskFault when the disk refuses (after one
        more try when the filesystem is full and a step of our oldest telemetry could go)."""
        db = self._db
        assert db is not None
        ids: list[int] = []
        added = added_events = 0
        try:
            db.execute("BEGIN IMMEDIATE")
            for kind, topic, payload, samples in rows:
                cur = db.execute(
                    "INSERT INTO msgs (kind, topic, payload, samples) VALUES (?, ?, ?, ?)",
                    (kind, topic, payload, samples),
                )
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
                size = len(payload) + ROW_OVERHEAD
                added += size
                if kind == EVENT:
                    added_events += size
            self.depth += len(rows)
            self.bytes += added
            self.event_bytes += added_events
            self._enforce_bound()
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as err:
            self._rollback()
            self._recount()
            # Once per fault: when a step of our telemetry does not make room, dropping more will not.
            if retry_when_full and self.fault is None and _is_full(err) and self._make_room():
                return self._insert(rows, retry_when_full=False)
            raise _DiskFault(_why(err)) from None
        return ids

    def _make_room(self) -> bool:
        """The filesystem is full (not necessarily by us): drop a step of our oldest telemetry so the
        newest can go in. False when there is nothing of ours to drop."""
        db = self._db
        if db is None:
            return False
        try:
            db.execute("BEGIN IMMEDIATE")
            gone = self._drop(TELEMETRY, STEP_ROWS)
            if gone:
                self._save_counters()
            db.execute("COMMIT")
            # No TRUNCATE checkpoint here: the WAL's existing file is room we still hold on a full disk.
        except (sqlite3.Error, OSError):
            self._rollback()
            self._recount()
            return False
        return gone > 0

    def _hold(self, row: Row) -> int:
        rid = self._next_held
        self._next_held -= 1
        self._held[rid] = row
        size = len(row[2]) + ROW_OVERHEAD
        self._held_bytes += size
        self.bytes += size
        self.depth += 1
        if row[0] == EVENT:
            self._held_event_bytes += size
            self.event_bytes += size
        self._bound_held()
        return rid

    def _bound_held(self) -> None:
        """Memory is bounded like the disk: oldest telemetry first, events past their allowance."""
        event_cap = max(1, self.memory_max_bytes // 4)
        while self._held_event_bytes > event_cap:
            if not self._drop_held(EVENT):
                break
        while self._held_bytes > self.memory_max_bytes:
            if not self._drop_held(TELEMETRY) and not self._drop_held(EVENT):
                break

    def _drop_held(self, kind: int) -> bool:
        for rid, row in self._held.items():
            if row[0] == kind:
                self._forget_held(rid)
                if kind == TELEMETRY:
                    self.dropped_messages += 1
                    self.dropped_samples += row[3]
                else:
                    self.dropped_events += 1
                return True
        return False

    def _forget_held(self, rid: int) -> Row:
        row = self._held.pop(rid)
        size = len(row[2]) + ROW_OVERHEAD
        self._held_bytes -= size
        self.bytes -= size
        self.depth -= 1
        if row[0] == EVENT:
            self._held_event_bytes -= size
            self.event_bytes -= size
        return row

    def retry(self) -> None:
        """Hand held rows and pending deletes to the disk if it takes them again (rate-limited)."""
        if not self._held and not self._undeleted:
            return
        if not self._disk_ready():
            return
        if self._undeleted:
            pending, self._undeleted = self._undeleted, []
            try:
                self._delete_on_disk(pending)
            except _DiskFault as err:
                self._undeleted = pending + self._undeleted
                self._set_fault(str(err))
                return
        while self._held:
            # Small transactions: a big one would grow the WAL past its share of the bound.
            batch: list[tuple[int, Row]] = []
            size = 0
            for item in self._held.items():
                batch.append(item)
                size += len(item[1][2]) + ROW_OVERHEAD
                if size >= self.wal_bytes // 4 or len(batch) >= 500:
                    break
            try:
                ids = self._insert([row for _, row in batch])
            except _DiskFault as err:
                self._set_fault(str(err))
                return
            for (rid, _row), new in zip(batch, ids, strict=True):
                self._forget_held(rid)  # _insert counted it on disk
                self._moved[rid] = new
        self._clear_fault()

    def held_messages(self) -> list[SpooledMessage]:
        """Messages the disk refused (provisional ids), oldest first: a connection sends them too."""
        return [SpooledMessage(rid, row[1], row[2], row[3]) for rid, row in self._held.items()]

    def _enforce_bound(self) -> None:
        """Inside the caller's transaction: events past their allowance, then the oldest telemetry
        until the disk use is back under the bound, a step at a time."""
        guard = 0
        while self.event_bytes > self.event_max_bytes and guard < 1000:
            guard += 1
            over = self.event_bytes - self.event_max_bytes
            if not self._drop(EVENT, self._rows_for(over, EVENT)):
                break
        guard = 0
        while guard < 1000:
            guard += 1
            over = max(self._used_bytes() - self.data_max_bytes, self.bytes - self.max_bytes)
            if over <= 0:
                break
            if not self._drop(TELEMETRY, self._rows_for(over, TELEMETRY)) and not self._drop(EVENT, 1):
                log.warning("spool over its bound and nothing left to drop", bytes=self.bytes)
                break
        if any(self._dropped_now):
            self._save_counters()
            now = time.monotonic()
            if now >= self._next_drop_log:  # a full spool drops on every flush: say so once a minute
                self._next_drop_log = now + 60.0
                log.warning(
                    "spool full: dropping the oldest messages",
                    telemetry=self._dropped_now[0],
                    events=self._dropped_now[1],
                    dropped_total=self.dropped_messages,
                    dropped_events=self.dropped_events,
                )
                self._dropped_now = [0, 0]

    def _rows_for(self, over: int, kind: int) -> int:
        """How many of the oldest rows of a kind to drop for ``over`` bytes: a small step."""
        count = self.depth or 1
        avg = max(1, self.bytes // count)
        return max(1, min(STEP_ROWS, math.ceil(over / avg)))

    def _drop(self, kind: int, limit: int) -> int:
        assert self._db is not None
        gone = self._db.execute(
            "DELETE FROM msgs WHERE id IN (SELECT id FROM msgs WHERE kind = ? ORDER BY id LIMIT ?) "
            "RETURNING LENGTH(payload), samples",
            (kind, limit),
        ).fetchall()
        if not gone:
            return 0
        size = sum(g[0] for g in gone) + ROW_OVERHEAD * len(gone)
        self.bytes -= size
        self.depth -= len(gone)
        if kind == TELEMETRY:
            self.dropped_messages += len(gone)
            self.dropped_samples += sum(g[1] for g in gone)
            self._dropped_now[0] += len(gone)
        else:
            self.event_bytes -= size
            self.dropped_events += len(gone)
            self._dropped_now[1] += len(gone)
        return len(gone)

    def _save_counters(self) -> None:
        assert self._db is not None
        self._db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (
                ("dropped_messages", self.dropped_messages),
                ("dropped_samples", self.dropped_samples),
                ("dropped_events", self.dropped_events),
            ),
        )

    def delete(self, ids: Iterable[int]) -> int:
        """Forget acknowledged messages (ids already gone are ignored). Returns how many went.
        When the disk refuses the delete, the ids are kept and deleted on a later call."""
        on_disk: list[int] = []
        removed = 0
        for rid in ids:
            if rid < 0:
                if rid in self._held:
                    self._forget_held(rid)
                    removed += 1
                elif rid in self._moved:
                    on_disk.append(self._moved.pop(rid))
            else:
                on_disk.append(rid)
        if not on_disk:
            return removed
        if not self._disk_ready():
            self._undeleted.extend(on_disk)
            return removed
        try:
            removed += self._delete_on_disk(on_disk)
        except _DiskFault as err:
            self._undeleted.extend(on_disk)
            self._set_fault(str(err))
            return removed
        self.retry()
        return removed

    def _delete_on_disk(self, id_list: list[int]) -> int:
        db = self._db
        assert db is not None
        removed = 0
        try:
            db.execute("BEGIN IMMEDIATE")
            for start in range(0, len(id_list), 500):
                chunk = id_list[start : start + 500]
                marks = ",".join("?" * len(chunk))
                gone = db.execute(
                    f"DELETE FROM msgs WHERE id IN ({marks}) RETURNING LENGTH(payload), kind", chunk
                ).fetchall()
                removed += len(gone)
                self.bytes -= sum(g[0] for g in gone) + ROW_OVERHEAD * len(gone)
                self.event_bytes -= sum(g[0] + ROW_OVERHEAD for g in gone if g[1] == EVENT)
                self.depth -= len(gone)
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as err:
            self._rollback()
            self._recount()
            raise _DiskFault(_why(err)) from None
        return removed

    def _recount(self) -> None:
        db = self._db
        if db is None:
            return
        try:
            rows = db.execute(
                "SELECT kind, COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM msgs GROUP BY kind"
            ).fetchall()
        except sqlite3.Error:
            return
        self.depth = sum(r[1] for r in rows) + len(self._held)
        self.bytes = sum(r[2] + r[1] * ROW_OVERHEAD for r in rows) + self._held_bytes
        self.event_bytes = (
            sum(r[2] + r[1] * ROW_OVERHEAD for r in rows if r[0] == EVENT) + self._held_event_bytes
        )

    # ------------------------------------------------------------------ reads
    def max_id(self) -> int:
        if self._db is None:
            return 0
        try:
            row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM msgs").fetchone()
        except sqlite3.Error as err:
            self._set_fault(_why(err))
            return 0
        return int(row[0])

    def read(self, *, after_id: int, upto_id: int, limit: int = 500) -> list[SpooledMessage]:
        """The oldest messages on disk with after_id < id <= upto_id, in order ([] if unreadable)."""
        if self._db is None:
            return []
        try:
            rows = self._db.execute(
                "SELECT id, topic, payload, samples FROM msgs WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                (after_id, upto_id, limit),
            ).fetchall()
        except sqlite3.Error as err:
            self._set_fault(_why(err))
            return []
        return [SpooledMessage(r[0], r[1], bytes(r[2]), r[3]) for r in rows]


def _why(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _is_full(err: BaseException) -> bool:
    text = str(err).lower()
    return "full" in text or getattr(err, "errno", None) == 28
