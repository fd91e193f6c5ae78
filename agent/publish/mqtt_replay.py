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
import re
from collections.abc import Sequence
from typing import Any

from agent.publish.spool import SpooledMessage

_HISTORICAL = b'{"historical":true,'

ReplayMessage = tuple[tuple[int, ...], str, bytes]  # spool ids it stands for, topic, payload

# The agent's own telemetry rows (agent/publish/mqtt.py builds them in this key order) are merged
# as bytes, without decoding them: a JSON round trip cost ~50 us a row, a third of a publish.
_HEAD = re.compile(
    rb'\{"ts":\d+,"seq":(\d+),"boot_id":"([0-9A-Za-z_-]*)","device":"(?:[^"\\]|\\.)*","readings":\['
)
_TAIL, _TAIL_FULL = b"]}", b'],"full":true}'


class _Row:
    """One spooled telemetry row in the agent's own layout, split into what a merge needs."""

    __slots__ = ("full", "head", "id", "readings", "samples", "seq")

    def __init__(
        self, rowid: int, head: bytes, seq: bytes, readings: bytes, samples: int, full: bool
    ) -> None:
        self.id, self.head, self.seq = rowid, head, seq
        self.readings, self.samples, self.full = readings, samples, full


def _split(row: SpooledMessage) -> tuple[str, _Row] | None:
    """(boot_id, parts) of a row in the agent's own layout with a known sample count; else None."""
    payload = row.payload
    m = _HEAD.match(payload) if row.samples >= 0 else None
    if m is None:
        return None
    if payload.endswith(_TAIL_FULL):
        full, end = True, len(payload) - len(_TAIL_FULL)
    elif payload.endswith(_TAIL):
        full, end = False, len(payload) - len(_TAIL)
    else:
        return None
    if end < m.end():
        return None
    head = _HISTORICAL + payload[1 : m.end()]  # the fields up to the readings, marked historical
    return m.group(2).decode(), _Row(row.id, head, m.group(1), payload[m.end() : end], row.samples, full)


def _merged_bytes(rows: list[_Row]) -> bytes:
    readings = b",".join(r.readings for r in rows if r.readings)
    seqs = b",".join(r.seq for r in rows)
    counts = ",".join(str(r.samples) for r in rows).encode()
    full = b',"full":true' if any(r.full for r in rows) else b""
    return rows[0].head + readings + b'],"seqs":[' + seqs + b'],"counts":[' + counts + b"]" + full + b"}"


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
    # Per (topic, boot): the agent's own rows (merged as bytes), others (merged through JSON).
    fast: dict[tuple[str, str], list[tuple[_Row, bytes]]] = {}
    slow: dict[tuple[str, str], list[tuple[int, dict[str, Any], bytes]]] = {}

    def close_fast(key: tuple[str, str]) -> None:
        group = fast.pop(key)
        ids = tuple(r.id for r, _ in group)
        payload = mark_historical(group[0][1]) if len(group) == 1 else _merged_bytes([r for r, _ in group])
        out.append((ids[0], (ids, key[0], payload)))

    def close_slow(key: tuple[str, str]) -> None:
        group = slow.pop(key)
        ids = tuple(i for i, _, _ in group)
        payload = mark_historical(group[0][2]) if len(group) == 1 else _merged([b for _, b, _ in group])
        out.append((ids[0], (ids, key[0], payload)))

    for row in rows:
        if max_rows <= 1 or not row.topic.startswith(telemetry_prefix):
            out.append((row.id, ((row.id,), row.topic, mark_historical(row.payload))))
            continue
        split = _split(row)
        if split is not None:
            key = (row.topic, split[0])
            group = fast.setdefault(key, [])
            group.append((split[1], row.payload))
            if len(group) >= max_rows:
                close_fast(key)
            continue
        body = _telemetry(row.payload)
        if body is None:
            out.append((row.id, ((row.id,), row.topic, mark_historical(row.payload))))
            continue
        key = (row.topic, str(body.get("boot_id")))
        others = slow.setdefault(key, [])
        others.append((row.id, body, row.payload))
        if len(others) >= max_rows:
            close_slow(key)
    for key in list(fast):
        close_fast(key)
    for key in list(slow):
        close_slow(key)
    out.sort(key=lambda item: item[0])
    return [message for _, message in out]
