"""The replay's messages: a page of spooled rows grouped into fewer MQTT messages.

A publish costs the agent far more (paho, asyncio, a PUBACK to await) than a small JSON merge,
so a replayed telemetry message carries the rows of up to ``max_rows`` spooled messages of the
same device and boot (docs/mqtt.md, "Replay"): ``readings`` holds every sample, each with its own
``t``, so a consumer that knows nothing of batches still gets them all; ``seqs`` lists the seqs
the message stands for and ``counts`` how many of ``readings`` came from each, in order, so a
backend dedupes and counts gaps per seq as before. Events and command replies go one per message.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from agent.publish.spool import SpooledMessage

_HISTORICAL = b'{"historical":true,'

ReplayMessage = tuple[tuple[int, ...], str, bytes]  # spool ids it stands for, topic, payload


def mark_historical(payload: bytes) -> bytes:
    """Add ``"historical": true`` to a spooled JSON object without decoding it."""
    return _HISTORICAL + payload[1:] if payload[:1] == b"{" and payload != b"{}" else payload


def _telemetry(payload: bytes) -> dict[str, Any] | None:
    """The body of a spooled telemetry row, or None if it is not one this module may merge."""
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("readings"), list)
        or not isinstance(body.get("seq"), int)
        or "seqs" in body
    ):
        return None
    return body


def _merged(bodies: list[dict[str, Any]]) -> bytes:
    first = bodies[0]
    out: dict[str, Any] = {"historical": True}
    out.update(first)
    readings: list[Any] = []
    for b in bodies:
        readings.extend(b["readings"])
    out["readings"] = readings
    out["seqs"] = [b["seq"] for b in bodies]
    out["counts"] = [len(b["readings"]) for b in bodies]
    if any(b.get("full") for b in bodies):
        out["full"] = True
    return json.dumps(out, separators=(",", ":"), allow_nan=False).encode()


def replay_messages(
    rows: Sequence[SpooledMessage], *, telemetry_prefix: str, max_rows: int
) -> list[ReplayMessage]:
    """The page ``rows`` (oldest first) as replay messages, in the order of their oldest row."""
    out: list[tuple[int, ReplayMessage]] = []
    open_groups: dict[tuple[str, str], tuple[list[int], list[dict[str, Any]], list[bytes]]] = {}

    def close(key: tuple[str, str]) -> None:
        ids, bodies, raw = open_groups.pop(key)
        payload = mark_historical(raw[0]) if len(bodies) == 1 else _merged(bodies)
        out.append((ids[0], (tuple(ids), key[0], payload)))

    for row in rows:
        body = _telemetry(row.payload) if max_rows > 1 and row.topic.startswith(telemetry_prefix) else None
        if body is None:
            out.append((row.id, ((row.id,), row.topic, mark_historical(row.payload))))
            continue
        key = (row.topic, str(body.get("boot_id")))
        group = open_groups.setdefault(key, ([], [], []))
        group[0].append(row.id)
        group[1].append(body)
        group[2].append(row.payload)
        if len(group[0]) >= max_rows:
            close(key)
    for key in list(open_groups):
        close(key)
    out.sort(key=lambda item: item[0])
    return [message for _, message in out]
