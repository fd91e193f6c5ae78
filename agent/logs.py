"""structlog setup: JSON lines for journald, a readable console in a terminal.

Under systemd (stderr is the stream named by ``JOURNAL_STREAM``) every line starts with its syslog
priority as sd-daemon(3) describes, ``<4>{"event": ...}``: journald strips the prefix and files the
line at that priority, so ``journalctl -p warning`` shows what someone should look at. The JSON
after it stays one structured line.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

# sd-daemon(3) / syslog(3) priorities.
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}
_LOGGING_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

Renderer = Callable[[Any, str, MutableMapping[str, Any]], str]


def stream_is_journal(stream: TextIO = sys.stderr, environ: MutableMapping[str, str] = os.environ) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM=dev:inode``):
    a child that inherited the variable but writes elsewhere (a pipe, a file) gets no prefixes."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def never_raises(renderer: Renderer) -> Renderer:
    """Wraps a structlog renderer so that a log line can never take its caller down.

    Rendering can fail for ordinary reasons: out of file descriptors, the console renderer's
    lazy imports (rich's emoji table on an exception's panel) raise EMFILE; a value's ``repr``
    raises. The caller is a poll loop or an interlock step, so the line degrades to its level and
    event, with why, instead."""

    def render(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        try:
            return renderer(logger, method_name, event_dict)
        except Exception as err:
            level = str(event_dict.get("level", method_name))
            event = str(event_dict.get("event", ""))[:500]
            return f"{level} {event} (log line not rendered: {type(err).__name__}: {err})"

    return render


def with_priority(renderer: Renderer) -> Renderer:
    """Wraps a structlog renderer: ``<N>`` + the rendered line, N from the event's level."""

    def render(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        level = str(event_dict.get("level", method_name)).lower()
        return f"<{PRIORITY.get(level, 6)}>{renderer(logger, method_name, event_dict)}"

    return render


class _PriorityFormatter(logging.Formatter):
    """Library lines (pysnmp, pymodbus through stdlib logging) get their priority prefix too."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).replace("\n", " | ")  # one journal entry per record
        return f"<{_LOGGING_PRIORITY.get(record.levelno, 6)}>{text}"


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    journal = stream_is_journal()
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    renderer = never_raises(renderer)
    if journal:
        renderer = with_priority(renderer)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (pysnmp, pymodbus) log through stdlib logging: keep them quiet unless they matter.
    fmt_lib = "%(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PriorityFormatter(fmt_lib) if journal else logging.Formatter(fmt_lib))
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    for noisy in ("pymodbus", "pysnmp", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR if level != "debug" else logging.INFO)
