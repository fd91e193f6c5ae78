"""The local audit log: every event (trips, clears, actions, read-backs, failures, overrides,
commands) appended as one JSON line under the state directory, rotated by size."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

import structlog

from agent.events import Event, EventBus

log = structlog.get_logger(__name__)


class AuditLog:
    def __init__(self, path: Path, *, max_bytes: int = 10 * 2**20, backups: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: IO[str] | None = None
        self.written = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open(
            "a", encoding="utf-8", buffering=1
        )  # line-buffered: a crash loses nothing

    def attach(self, bus: EventBus) -> None:
        if self._file is None:
            self.open()
        bus.subscribe(self.write)

    def write(self, event: Event) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(event.to_dict(), separators=(",", ":"), default=str) + "\n")
            self.written += 1
            if self._file.tell() >= self.max_bytes:
                self._rotate()
        except OSError as err:  # a full disk must not stop the interlocks
            log.error("audit log write failed", path=str(self.path), error=str(err))

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.open()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
