"""The control protocol's pure parts: the access policy with fake peer credentials, request
validation, and the units podctl prints."""

from __future__ import annotations

import json

import pytest

from agent.control.podctl import parse_duration
from agent.control.protocol import (
    ALL_OPS,
    READ_OPS,
    WRITE_OPS,
    Ack,
    Override,
    PeerCred,
    ProtocolError,
    authorize,
    parse_request,
)
from agent.control.render import fmt_value, style_for

ADMIN = frozenset({990})
ROOT = PeerCred(pid=1, uid=0, gid=0)
NOBODY = PeerCred(pid=2, uid=65534, gid=65534)
READER = PeerCred(pid=3, uid=1000, gid=1000, groups=frozenset({1000, 991}))  # in the read group only
ADMIN_PRIMARY = PeerCred(pid=4, uid=1001, gid=990)
ADMIN_SUPPLEMENTARY = PeerCred(pid=5, uid=1002, gid=1002, groups=frozenset({1002, 990}))


def test_changing_ops_need_root_or_the_admin_group() -> None:
    assert sorted(WRITE_OPS) == ["ack", "override", "override_clear", "poll", "reload"]
    for op in WRITE_OPS:
        assert not authorize(op, NOBODY, ADMIN), op
        assert not authorize(op, READER, ADMIN), op
        assert authorize(op, ROOT, ADMIN), op
        assert authorize(op, ADMIN_PRIMARY, ADMIN), op
        assert authorize(op, ADMIN_SUPPLEMENTARY, ADMIN), op
        # No admin group on this host: only root.
        assert not authorize(op, ADMIN_PRIMARY, frozenset()), op
        assert authorize(op, ROOT, frozenset()), op


def test_read_ops_for_whoever_can_open_the_socket_and_unknown_ops_for_nobody() -> None:
    for op in READ_OPS:
        assert authorize(op, NOBODY, ADMIN), op
    assert not authorize("shutdown", ROOT, ADMIN)
    assert not authorize("", ROOT, ADMIN)
    assert ALL_OPS == READ_OPS | WRITE_OPS and not READ_OPS & WRITE_OPS


def line(**obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_valid_requests_parse_into_their_models() -> None:
    req = parse_request(line(v=1, op="ack", id="ev-abc-1"), max_bytes=1024)
    assert isinstance(req, Ack) and req.id == "ev-abc-1"
    req = parse_request(
        line(v=1, op="override", interlock="gpu_overtemp", device="gpu3", duration_s=1800, reason="burn-in"),
        max_bytes=1024,
    )
    assert isinstance(req, Override) and req.duration_s == 1800 and req.force is False


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json\n", "not JSON"),
        (b"\xff\xfe\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (line(op="status"), "version"),
        (line(v=2, op="status"), "version"),
        (line(v=1, op="shutdown"), "unknown op"),
        (line(v=1, op="ack"), "bad arguments for ack: id"),
        (line(v=1, op="ack", id="x y; rm -rf /"), "bad arguments for ack"),
        (line(v=1, op="status", extra=1), "bad arguments for status"),
        (
            line(v=1, op="override", interlock="gpu_overtemp", device="gpu3", duration_s=-5, reason="x"),
            "duration_s",
        ),
        (
            line(v=1, op="override", interlock="gpu_overtemp", device="gpu3", duration_s=60, reason=""),
            "reason",
        ),
        (line(v=1, op="events", limit=10**9), "limit"),
        (line(v=1, op="device", id="../../etc/passwd"), "bad arguments for device"),
        (line(v=1, op="status", pad="x" * 2000), "too large"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_request(raw, max_bytes=1024)


def test_durations_and_units_read_at_a_glance() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("10m") == 600
    assert parse_duration("2h") == 7200
    assert parse_duration("1.5d") == 1.5 * 86400
    with pytest.raises(Exception, match="duration"):
        parse_duration("ten minutes")
    assert fmt_value("power_w", 12345.0) == "12.35 kW"
    assert fmt_value("power_w", 650.0) == "650 W"
    assert fmt_value("supply_temp_c", 31.24) == "31.2 C"
    assert fmt_value("phase1_current_a", 12.345) == "12.35 A"
    assert fmt_value("flow_lpm", 20.0) == "20.0 L/min"
    assert fmt_value("leak", 1.0) == "yes"
    assert fmt_value("pump_running", 0.0) == "off"
    assert fmt_value("temp_c", None) == "n/a"  # missing is never shown as 0
    assert style_for("leak", 1.0) == "bold red"
    assert style_for("pump_running", 0.0) == "bold red"
    assert style_for("temp_c", 88.0) == "bold red"
    assert style_for("temp_c", 60.0) == ""
    assert style_for("temp_c", 60.0, "error") == "bold red"


def test_status_screen_shows_budget_and_battery_when_the_power_service_runs() -> None:
    from agent.control.render import _grid_line

    power = {
        "budget": {"pod_budget_w": 66000.0, "source": "fleet"},
        "allocation": {"capped_gpus": 12},
        "battery": {"soc_pct": 59.5, "power_w": 1200.0, "faults": 0, "error": None},
        "ramp": {"limit_w_per_s": 1000.0, "grid_w": 65000.0, "grid_ramp_w_per_s": 800.0},
    }
    line = _grid_line(power)
    assert line is not None
    text = line.plain
    assert "budget 66.00 kW (fleet)" in text and "12 GPUs capped" in text and "battery 60%" in text
    assert _grid_line(None) is None
    assert _grid_line({"budget": {}, "allocation": {}, "battery": None, "ramp": {}}) is None
