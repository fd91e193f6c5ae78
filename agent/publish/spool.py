"""The MQTT store-and-forward spool: SQLite in WAL mode, bounded, oldest telemetry dropped first.

Every telemetry batch and event is written here before it is published, and deleted only after
its PUBACK. ``synchronous=NORMAL`` in WAL mode survives a killed process (``kill -9``); only a
power cut can lose the last transactions. Rows keep their payload exactly as first built
(``boot_id`` and ``seq`` of the boot that made them), so a replay after a restart is the old boot's
data, as it was.

Calls are synchronous and short (one transaction per flush, per replay chunk, per ack batch):
they run on the event loop, a few per second, each well under a millisecond or two.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

TELEMETRY = 0  # may be dropped when the spool is full
EVENT = 1  # never dropped (events, command replies)
ROW_OVERHEAD = 48  # bytes a row costs beyond its payload, roughly, for the bound

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


@dataclass(frozen=True, slots=True)
class SpooledMessage:
    id: int
    topic: str
    payload: bytes


class Spool:
    def __init__(self, path: Path, *, max_bytes: int = 1 << 30) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM msgs").fetchone()
        self.depth: int = row[0]
        self.bytes: int = row[1] + row[0] * ROW_OVERHEAD
        self.dropped_messages = self._meta("dropped_messages")
        self.dropped_samples = self._meta("dropped_samples")
        if self.depth:
            log.info("spool holds messages from before; they will be replayed", depth=self.depth)

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writes
    def append(self, rows: Sequence[tuple[int, str, bytes, int]]) -> list[int]:
        """Store (kind, topic, payload, samples) rows in one transaction; returns their ids in order."""
        if not rows:
            return []
        ids: list[int] = []
        db = self._db
        db.execute("BEGIN")
        try:
            for kind, topic, payload, samples in rows:
                cur = db.execute(
                    "INSERT INTO msgs (kind, topic, payload, samples) VALUES (?, ?, ?, ?)",
                    (kind, topic, payload, samples),
                )
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
                self.bytes += len(payload) + ROW_OVERHEAD
            self.depth += len(rows)
            if self.bytes > self.max_bytes:
                self._enforce_bound()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        return ids

    def _enforce_bound(self) -> None:
        """Drop the oldest telemetry until 95% of the bound; events are never dropped."""
        target = int(self.max_bytes * 0.95)
        dropped = samples = 0
        while self.bytes > target:
            gone = self._db.execute(
                "DELETE FROM msgs WHERE id IN (SELECT id FROM msgs WHERE kind = ? ORDER BY id LIMIT 256) "
                "RETURNING LENGTH(payload), samples",
                (TELEMETRY,),
            ).fetchall()
            if not gone:
                log.warning("spool over its bound with events only; keeping them", bytes=self.bytes)
                break
            for size, n in gone:
                self.bytes -= size + ROW_OVERHEAD
                samples += n
            dropped += len(gone)
            self.depth -= len(gone)
        if dropped:
            self.dropped_messages += dropped
            self.dropped_samples += samples
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (("dropped_messages", self.dropped_messages), ("dropped_samples", self.dropped_samples)),
            )
            log.warning(
                "spool full: dropped oldest telemetry",
                messages=dropped,
                samples=samples,
                dropped_total=self.dropped_messages,
            )

    def delete(self, ids: Iterable[int]) -> int:
        """Forget acknowledged messages (ids already gone are ignored). Returns how many went."""
        id_list = list(ids)
        if not id_list:
            return 0
        removed = 0
        db = self._db
        db.execute("BEGIN")
        try:
            for start in range(0, len(id_list), 500):
                chunk = id_list[start : start + 500]
                marks = ",".join("?" * len(chunk))
                gone = db.execute(
                    f"DELETE FROM msgs WHERE id IN ({marks}) RETURNING LENGTH(payload)", chunk
                ).fetchall()
                removed += len(gone)
                self.bytes -= sum(g[0] for g in gone) + ROW_OVERHEAD * len(gone)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        self.depth -= removed
        return removed

    def _recount(self) -> None:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM msgs").fetchone()
        self.depth = row[0]
        self.bytes = row[1] + row[0] * ROW_OVERHEAD

    # ------------------------------------------------------------------ reads
    def max_id(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM msgs").fetchone()
        return int(row[0])

    def read(self, *, after_id: int, upto_id: int, limit: int = 500) -> list[SpooledMessage]:
        """The oldest messages with after_id < id <= upto_id, in order."""
        rows = self._db.execute(
            "SELECT id, topic, payload FROM msgs WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
            (after_id, upto_id, limit),
        ).fetchall()
        return [SpooledMessage(r[0], r[1], bytes(r[2])) for r in rows]
