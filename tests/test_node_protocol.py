"""The pod-network protocol and cap leases, as pure functions (agent/node/protocol.py, lease.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.cli import main as podagent
from agent.node.lease import LeaseState
from agent.node.protocol import (
    REQ,
    RSP,
    CapRequest,
    ProtocolError,
    ReplayGuard,
    check_request,
    decode,
    encode,
)

KEY = b"0123456789abcdef0123456789abcdef"
NOW = 1_800_000_000.0


def body(seq: int = 1, **kw: object) -> dict[str, object]:
    b: dict[str, object] = {
        "node": "srv-0",
        "boot": "b1",
        "seq": seq,
        "op": "caps",
        "issued_at": int(NOW * 1000),
        "expires_at": int(NOW * 1000) + 3000,
        "caps": {"0": 400.0},
    }
    b.update(kw)
    return b


def check(b: dict[str, object], guard: ReplayGuard | None = None) -> object:
    return check_request(
        b, node="srv-0", guard=guard or ReplayGuard(window_s=5.0), max_skew_s=5.0, now_wall=NOW
    )


def test_round_trip_and_direction_tag() -> None:
    frame = encode(KEY, REQ, body())
    assert decode(KEY, REQ, frame.rstrip(b"\n")) == body()
    with pytest.raises(ProtocolError) as err:
        decode(KEY, RSP, frame.rstrip(b"\n"))  # a request reflected as an answer
    assert err.value.reason == "mac"
    with pytest.raises(ProtocolError) as err:
        decode(b"another-pod-key-another-pod-key!", REQ, frame.rstrip(b"\n"))
    assert err.value.reason == "mac"


@given(st.binary(max_size=300))
def test_garbage_is_a_frame_or_mac_error(data: bytes) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(KEY, REQ, data)
    assert err.value.reason in ("frame", "mac")


@given(st.integers(min_value=0), st.integers(min_value=0, max_value=7))
def test_a_flipped_bit_never_passes_as_another_request(pos: int, bit: int) -> None:
    frame = bytearray(encode(KEY, REQ, body()).rstrip(b"\n"))
    frame[pos % len(frame)] ^= 1 << bit
    try:
        decoded = decode(KEY, REQ, bytes(frame))
    except ProtocolError:
        return
    assert decoded == body()  # only a harmless flip (the mac's hex case) may decode at all


def test_request_checks() -> None:
    req = check(body())
    assert req.caps == {0: 400.0}  # type: ignore[attr-defined]
    assert check(body(caps=None)).caps is None  # type: ignore[attr-defined]
    for bad, reason in (
        (body(node="srv-1"), "node"),
        (body(expires_at=int(NOW * 1000)), "expired"),
        (body(issued_at=int((NOW + 6) * 1000), expires_at=int((NOW + 9) * 1000)), "skew"),
        (body(issued_at=int((NOW - 6) * 1000)), "skew"),
        (body(caps={"0": float("nan")}), "frame"),
        (body(caps={"0": -5}), "frame"),
        (body(caps={"x": 5}), "frame"),
        (body(op="set_default"), "frame"),
        (body(seq="1"), "frame"),
        ({"node": "srv-0"}, "frame"),
    ):
        with pytest.raises(ProtocolError) as err:
            check(bad)
        assert err.value.reason == reason, bad


def test_replay_guard_per_boot() -> None:
    guard = ReplayGuard(window_s=5.0)
    guard.accept("b1", 5, NOW)
    for seq in (1, 5):
        with pytest.raises(ProtocolError) as err:
            check(body(seq=seq), guard)
        assert err.value.reason == "replay"
    check(body(seq=6), guard)
    check(body(seq=1, boot="b2"), guard)  # another stream (the controller's other link or boot)


def test_lease_modes() -> None:
    lease = LeaseState(lost_after_s=10.0, started=0.0, held={"gpu0": 500.0})
    failsafe = {"gpu0": 420.0, "gpu1": 420.0}
    assert lease.update(1.0) is None and lease.mode == "hold"
    assert lease.external_caps(failsafe) == {"gpu0": (500.0, "hold")}  # a restart keeps its limit
    t = lease.update(10.0)
    assert t is not None and t.mode == "failsafe"
    assert lease.external_caps(failsafe) == {"gpu0": (420.0, "failsafe"), "gpu1": (420.0, "failsafe")}
    lease.accept({"gpu0": 300.0}, expires_wall=NOW + 3, now=11.0)
    t = lease.update(11.0)
    assert t is not None and (t.previous, t.mode) == ("failsafe", "controller")
    assert lease.external_caps(failsafe) == {"gpu0": (300.0, "controller")}
    # Silence again: the lower of the last lease and the fail-safe.
    lease.update(21.5)
    assert lease.mode == "failsafe" and lease.failsafe_entered == 2
    assert lease.external_caps(failsafe) == {"gpu0": (300.0, "controller"), "gpu1": (420.0, "failsafe")}
    # A restarted controller that has not decided yet: what is enforced stays, no step up.
    lease.accept(None, expires_wall=NOW + 3, now=22.0)
    lease.update(22.0)
    assert lease.mode == "controller"
    assert lease.external_caps(failsafe) == {"gpu0": (300.0, "controller"), "gpu1": (420.0, "controller")}


def test_a_valid_request_ends_the_failsafe_at_once() -> None:
    """A lease, then a no-decision poll before the safety loop's next update: the fail-safe ended
    with the lease, so the poll must not turn the fail-safe caps into the controller's lease."""
    lease = LeaseState(lost_after_s=10.0, started=0.0, held={"gpu0": 700.0})
    failsafe = {"gpu0": 420.0}
    lease.update(10.0)
    assert lease.external_caps(failsafe) == {"gpu0": (420.0, "failsafe")}
    lease.accept({"gpu0": 700.0}, expires_wall=NOW + 3, now=11.0, lease_id=("c", 1))
    assert lease.mode == "controller"
    lease.accept(None, expires_wall=NOW + 3, now=11.1, lease_id=("c", 1))
    t = lease.update(11.2)
    assert t is not None and (t.previous, t.mode) == ("failsafe", "controller")
    assert lease.update(11.3) is None  # one event for the return
    assert lease.external_caps(failsafe) == {"gpu0": (700.0, "controller")}


def test_an_older_lease_renews_but_never_replaces_a_newer_one() -> None:
    lease = LeaseState(lost_after_s=10.0, started=0.0)
    lease.accept({"gpu0": 500.0}, expires_wall=NOW + 3, now=1.0, lease_id=("c", 2))
    lease.accept({"gpu0": 300.0}, expires_wall=NOW + 3, now=2.0, lease_id=("c", 1))  # overtaken
    assert lease.caps == {"gpu0": 500.0} and lease.stale_leases == 1
    assert lease.last_valid == 2.0  # still a sign of life
    lease.accept({"gpu0": 600.0}, expires_wall=NOW + 3, now=3.0, lease_id=("c", 2))  # a renewal
    assert lease.caps == {"gpu0": 600.0}
    lease.accept({"gpu0": 250.0}, expires_wall=NOW + 3, now=4.0, lease_id=("d", 1))  # a new controller
    assert lease.caps == {"gpu0": 250.0} and lease.lease_id == ("d", 1)


def test_lease_version_must_be_well_formed() -> None:
    assert isinstance(check(body(ctl="c", lease_v=3)), CapRequest)
    for bad in ({"ctl": "c"}, {"lease_v": 1}, {"ctl": 1, "lease_v": 1}, {"ctl": "c", "lease_v": True}):
        with pytest.raises(ProtocolError) as err:
            check(body(**bad))
        assert err.value.reason == "frame"


def test_no_decision_yet_keeps_held_limits() -> None:
    lease = LeaseState(lost_after_s=10.0, started=0.0, held={"gpu0": 500.0})
    lease.accept(None, expires_wall=NOW + 3, now=1.0)
    assert lease.update(1.0) is not None and lease.mode == "controller"
    assert lease.external_caps({"gpu0": 420.0}) == {"gpu0": (500.0, "controller")}


def test_check_config_takes_a_node_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "pod.key"
    key.write_text(os.urandom(16).hex())
    cfg = tmp_path / "node.toml"
    example = (Path(__file__).resolve().parent.parent / "config" / "node.example.toml").read_text()
    cfg.write_text(example.replace('key_file = "/etc/podagent/pod.key"', f'key_file = "{key}"'))
    assert podagent(["check-config", str(cfg)]) == 0
    assert "ok (node srv-0" in capsys.readouterr().out
    cfg.write_text(cfg.read_text() + "\n[interlocks.coolant_leak]\nenabled = true\n")
    assert podagent(["check-config", str(cfg)]) == 1
    assert "interlocks: coolant_leak are pod rules" in capsys.readouterr().err
    key.write_text("short")
    cfg.write_text(example.replace('key_file = "/etc/podagent/pod.key"', f'key_file = "{key}"'))
    assert podagent(["check-config", str(cfg)]) == 1
    assert "key_file: " in capsys.readouterr().err
