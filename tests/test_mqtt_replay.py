"""The replay's grouping of spooled rows into MQTT messages (agent/publish/mqtt_replay.py)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.publish.mqtt_replay import mark_historical, replay_messages
from agent.publish.spool import SpooledMessage

ROOT = "podagent/v1/lab/tiny"
PREFIX = f"{ROOT}/telemetry/"


def telemetry(
    rowid: int, device: str, seq: int, n: int, boot: str = "b1", *, known: bool = False, **extra: Any
) -> SpooledMessage:
    """A spooled telemetry row as the agent writes it; ``known``: with its sample count (the
    spool's column), which lets the replay merge it as bytes."""
    body = {
        "ts": 1000 + seq,
        "seq": seq,
        "boot_id": boot,
        "device": device,
        "readings": [{"m": f"m{i}", "v": seq + i / 10, "t": 1000 + seq} for i in range(n)],
        **extra,
    }
    payload = json.dumps(body, separators=(",", ":")).encode()
    return SpooledMessage(rowid, PREFIX + device, payload, n if known else -1)


def event(rowid: int, seq: int) -> SpooledMessage:
    body = {"ts": 1, "seq": seq, "boot_id": "b1", "event": {"kind": "x"}}
    return SpooledMessage(rowid, f"{ROOT}/event", json.dumps(body).encode())


def test_rows_of_one_device_share_a_message_with_every_sample_and_seq() -> None:
    rows = [telemetry(1, "gpu0", 1, 2), telemetry(2, "gpu1", 2, 1), telemetry(3, "gpu0", 3, 3), event(4, 4)]
    out = replay_messages(rows, telemetry_prefix=PREFIX, max_rows=16)
    assert [ids for ids, _, _ in out] == [(1, 3), (2,), (4,)]
    merged = json.loads(out[0][2])
    assert merged["historical"] is True and merged["seq"] == 1 and merged["boot_id"] == "b1"
    assert merged["seqs"] == [1, 3] and merged["counts"] == [2, 3]
    assert [r["v"] for r in merged["readings"]] == [1.0, 1.1, 3.0, 3.1, 3.2]
    # A row alone is the spooled message itself, marked historical: byte for byte otherwise.
    assert out[1][2] == mark_historical(rows[1].payload)
    assert json.loads(out[2][2])["event"] == {"kind": "x"} and json.loads(out[2][2])["historical"]


def test_boots_full_refreshes_and_the_row_limit() -> None:
    rows = [
        telemetry(1, "gpu0", 1, 1, boot="old"),
        telemetry(2, "gpu0", 1, 1, boot="new"),
        telemetry(3, "gpu0", 2, 1, boot="new", full=True),
        telemetry(4, "gpu0", 3, 1, boot="new"),
    ]
    out = replay_messages(rows, telemetry_prefix=PREFIX, max_rows=2)
    assert [ids for ids, _, _ in out] == [(1,), (2, 3), (4,)]  # never across boots; 2 rows at most
    assert json.loads(out[1][2])["full"] is True
    assert [ids for ids, _, _ in replay_messages(rows, telemetry_prefix=PREFIX, max_rows=1)] == [
        (1,),
        (2,),
        (3,),
        (4,),
    ]


def test_a_row_that_is_not_json_goes_alone_untouched() -> None:
    bad = SpooledMessage(2, PREFIX + "gpu0", b"not json")
    out = replay_messages([telemetry(1, "gpu0", 1, 1), bad], telemetry_prefix=PREFIX, max_rows=8)
    assert [ids for ids, _, _ in out] == [(1,), (2,)] and out[1][2] == b"not json"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["gpu0", "gpu1", "pdu-a", "event"]), st.integers(0, 4)), max_size=60),
    st.integers(1, 20),
)
def test_every_row_goes_exactly_once_with_its_samples(
    rows_spec: list[tuple[str, int]], max_rows: int
) -> None:
    rows = [
        event(i + 1, i + 1) if dev == "event" else telemetry(i + 1, dev, i + 1, n)
        for i, (dev, n) in enumerate(rows_spec)
    ]
    out = replay_messages(rows, telemetry_prefix=PREFIX, max_rows=max_rows)
    ids = [i for group, _, _ in out for i in group]
    assert sorted(ids) == [r.id for r in rows]
    assert [group[0] for group, _, _ in out] == sorted(group[0] for group, _, _ in out)  # oldest first
    samples: dict[int, int] = {}
    for group, topic, payload in out:
        body = json.loads(payload)
        assert body["historical"] is True and len(group) <= max_rows
        seqs, counts = body.get("seqs", [body["seq"]]), body.get("counts", [len(body.get("readings", []))])
        assert seqs == list(group)  # seq == row id in this test
        for seq, n in zip(seqs, counts, strict=True):
            samples[seq] = n
        if len(group) > 1:
            assert topic.startswith(PREFIX) and len(body["readings"]) == sum(counts)
    for i, (dev, n) in enumerate(rows_spec):
        assert samples[i + 1] == (0 if dev == "event" else n)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["gpu0", "gpu1", "event"]), st.integers(0, 3), st.booleans(), st.booleans()
        ),
        max_size=40,
    ),
    st.integers(2, 8),
)
def test_merging_as_bytes_gives_what_merging_as_json_gives(
    spec: list[tuple[str, int, bool, bool]], max_rows: int
) -> None:
    def rows(known: bool) -> list[SpooledMessage]:
        out = []
        for i, (dev, n, full, old_boot) in enumerate(spec):
            if dev == "event":
                out.append(event(i + 1, i + 1))
                continue
            extra: dict[str, Any] = {"full": True} if full else {}
            boot = "a0" if old_boot else "b1"
            out.append(telemetry(i + 1, dev, i + 1, n, boot, known=known, **extra))
        return out

    as_bytes = replay_messages(rows(True), telemetry_prefix=PREFIX, max_rows=max_rows)
    as_json = replay_messages(rows(False), telemetry_prefix=PREFIX, max_rows=max_rows)
    assert [(i, t) for i, t, _ in as_bytes] == [(i, t) for i, t, _ in as_json]
    assert [json.loads(p) for _, _, p in as_bytes] == [json.loads(p) for _, _, p in as_json]
