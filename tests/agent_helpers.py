"""Helpers for tests that run the agent in-process against a simulated pod."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from agent.app import Agent
from agent.config import load_config
from agent.model import Reading


async def until(agent: Agent, predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Wait until predicate() holds, re-checking on every batch that lands in the store."""
    if predicate():
        return
    changed = asyncio.Event()

    def on_batch(_: Sequence[Reading]) -> None:
        changed.set()

    unsubscribe = agent.store.subscribe(on_batch)
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                changed.clear()
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}") from None
    finally:
        unsubscribe()


@contextlib.asynccontextmanager
async def running_agent(config_path: Path, *, services: Sequence[object] = ()) -> AsyncIterator[Agent]:
    agent = Agent(load_config(config_path), config_path=config_path)
    for s in services:
        agent.add_service(s)
    task = asyncio.create_task(agent.run(), name="agent")
    try:
        async with asyncio.timeout(30):
            await agent.ready.wait()
        yield agent
    finally:
        agent.stop()
        async with asyncio.timeout(15):
            await task
