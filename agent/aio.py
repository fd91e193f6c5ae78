"""Small asyncio helpers shared by the poll loops and the publishers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)


def raise_if_cancelling() -> None:
    """Honour a cancel that was requested but never delivered.

    Python 3.11's ``asyncio.wait_for`` (inside aiomqtt, pymodbus and pysnmp) swallows a cancel that
    lands as its inner future completes: the caller gets the result and carries on, and a loop that
    lost its one cancel holds up shutdown forever (a TaskGroup cancels its children only once). The
    request is still counted by ``Task.cancelling()``; every long-running loop calls this at each
    turn so a lost cancel takes effect at the next one.

    Not in a task that hosts a TaskGroup whose children may fail: 3.11's TaskGroup then leaves a
    cancel request counted on its host for good (fixed in 3.12). Run such a group in a task of its
    own (as the MQTT session does)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def tasks_with_lost_cancel(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[object]]:
    """Tasks asked to cancel that are still running (other than the caller's)."""
    current = asyncio.current_task(loop)
    return [t for t in asyncio.all_tasks(loop) if t is not current and not t.done() and t.cancelling()]


# The event loop the daemons run on: uvloop (libuv, its loop, timers and transports in C) unless
# PODAGENT_EVENT_LOOP=asyncio. Measured on the Modbus bench (4 TCP units, 1 Hz): the agent's CPU
# 10-19% lower (README, 2026-12-07), as its polls are mostly fixed costs per wake-up (the loop's own
# Python: _run_once, TimerHandle heap comparisons, the selector transports), not per register.
EVENT_LOOP_ENV = "PODAGENT_EVENT_LOOP"
# uvloop's loop.time() counts whole milliseconds and its timers fire on them: a loop that waits
# "until loop.time() >= t" treats t as reached within this, or waits again for a float remainder.
CLOCK_SLACK_S = 0.001


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What ``asyncio.Runner(loop_factory=...)`` should build: uvloop's loop, or asyncio's own
    when the environment asks for it (``PODAGENT_EVENT_LOOP=asyncio``: a suspected loop bug) or
    uvloop cannot be imported (a broken install must still poll and run its interlocks)."""
    choice = os.environ.get(EVENT_LOOP_ENV, "uvloop").strip().lower() or "uvloop"
    if choice not in ("uvloop", "asyncio"):
        log.warning(f"{EVENT_LOOP_ENV} is not 'uvloop' or 'asyncio'; using asyncio", value=choice)
        return asyncio.new_event_loop
    if choice == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as err:
        log.warning("uvloop unavailable; using asyncio's event loop", error=str(err))
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """Which loop runs, "uvloop" or "asyncio" (the start-up log line says it)."""
    return type(loop).__module__.split(".", 1)[0]
