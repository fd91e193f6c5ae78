"""One accept loop for every listening socket of the daemon (control socket, /metrics).

asyncio's own server loop (``start_server``) logs every failed ``accept()`` through the loop's
exception handler and retries once a second: out of descriptors, that is one traceback a second
for as long as it lasts, and a client flood keeps it so. Here a listener that cannot accept (EMFILE,
ENFILE, ENOBUFS, ENOMEM, ...) logs once when it starts failing and once when it accepts again,
backs off (the pending connections wait in the kernel's backlog) and counts the failures.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

FIRST_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0


class AcceptLoop:
    """Accepts for ever on ``listener`` and hands each connection to ``admit``.

    ``admit`` runs synchronously on the loop and owns the socket from then on (it closes it or
    starts the connection's task)."""

    def __init__(self, what: str) -> None:
        self.what = what  # "control socket", "prometheus endpoint": the subject of the log lines
        self.failures = 0

    async def run(self, listener: socket.socket, admit: Callable[[socket.socket], None]) -> None:
        loop = asyncio.get_running_loop()
        backoff = FIRST_BACKOFF_S
        starved = False
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as err:
                # Out of descriptors or memory (or anything else accept() can say): never fatal.
                self.failures += 1
                if not starved:
                    starved = True
                    level = log.error if err.errno in (errno.EMFILE, errno.ENFILE) else log.warning
                    level(f"{self.what} cannot accept; backing off", error=str(err))
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            if starved:
                starved = False
                log.warning(f"{self.what} accepts again", failed_accepts=self.failures)
            backoff = FIRST_BACKOFF_S
            admit(conn)
