"""Small state files under the state directory (command replay memory, the fleet budget in force):
written atomically (a temporary file, fsync, rename, fsync of the directory), read tolerantly.

A write that the disk refuses raises OSError for the caller to treat as a condition; a file that
is missing, unreadable or not what it should be reads as None (and says why in the log).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MAX_STATE_BYTES = 16 << 20  # a state file larger than this is not ours


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader (or a crash) sees the old file or the new one,
    never a mix. OSError (ENOSPC, EROFS, EIO) leaves the old file in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing, unreadable, too large or corrupt."""
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            log.warning("state file too large; ignored", path=str(path))
            return None
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as err:
        log.warning("state file unreadable or corrupt; starting without it", path=str(path), error=str(err))
        return None
