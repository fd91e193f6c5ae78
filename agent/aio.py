"""Small asyncio helpers shared by the poll loops and the publishers."""

from __future__ import annotations

import asyncio


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
