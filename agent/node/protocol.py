"""The pod-network protocol between the controller and a node agent (docs/node.md).

One TCP connection carries newline-terminated frames, request then answer, in order. Every frame
is ``v2 <MAC> <BODY>\n``: BODY is a JSON object (one line), MAC is the hex HMAC-SHA256 under the
pod key of the direction tag (``req`` or ``rsp``) followed by BODY's bytes exactly as sent: no
canonical re-serialization on either side, and nothing is parsed before its MAC checks. The tag
stops a node's answer from being reflected back to it as a request. (v1 wrapped the body in a JSON
envelope and signed its canonical form: twice the JSON work per frame.)

Request (controller -> node): ``node`` (the node's id: a request for another node is refused),
``boot`` (the controller's boot id), ``seq`` (per boot, strictly increasing), ``issued_at`` and
``expires_at`` (ms since the epoch, UTC), ``op`` (``poll``, ``caps`` or ``settings``) and ``caps``: the
controller's lease, {local GPU index: W} (an empty map is a lease with no cap), or null: no
decision yet (a controller's first poll after its start: the node keeps what it enforces). Every
request, polls included, renews the lease until ``expires_at``. A ``settings`` request carries
``settings``: {local GPU index: {"smoothing": null (off) or {floor_pct, ramp_up_w_per_s,
ramp_down_w_per_s, hysteresis_ms}, "filler_w": W (0: off), "workload_profile": null (none) or an
NVML workload power profile name}}, each key optional; it is applied before the answer, whose
``settings`` says per GPU what was read back or why it was refused. Optional ``ctl`` (the
controller's instance id) and ``lease_v`` (its lease version, raised on every change): polls and
caps travel on two connections, so an older lease can arrive after a newer one; the node keeps the
newer one's caps (the older request still renews). A new ``ctl`` starts a new version sequence.

Answer (node -> controller): ``re`` (the request's ``boot`` and ``seq``: an answer to another
request is refused), ``ok``, ``lease_v`` (the version of the lease the node holds), and for polls
the readings (see ``agent/node/server.py``).

Checked by the node, in order, each failure with its own reason (and counter): frame (not JSON, too
long, wrong shape), mac, node, expired (``expires_at`` <= now), skew (``issued_at`` more than
``max_clock_skew_s`` from now, either side), replay (``seq`` not above the highest seen for that
boot; boots older than the skew window are forgotten: their requests fail ``skew``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.drivers.smoothing import WORKLOAD_PROFILES, GpuSettingsAsk, SmoothingSettings

VERSION = 2
_PREFIX = b"v2 "
_MAC_HEX = 64  # HMAC-SHA256, hex
MAX_FRAME = 1 << 20  # a 144-tray answer is ~10 kB; anything near a MiB is not ours
REQ = b"req\n"
RSP = b"rsp\n"
MIN_KEY_BYTES = 16
JsonObj = dict[str, Any]
# The request ops. An op is "poll" (readings back) or a write the node applies at once; a new op
# is added here and answered in NodeServer._answer (agent/node/server.py).
OPS: frozenset[str] = frozenset({"poll", "caps", "settings"})
# Poll answers on one connection are sparse: a GPU reading is sent when its value, quality or
# error changed since the last answer on that connection, and every reading (and the GPUs' info)
# in every FULL_EVERY-th answer, the first included. What the safety rules and the power budget
# read is in every answer. The controller judges the sparse ones stale after FULL_EVERY x its
# usual limit (Poller cadence), as the NVML driver's slow metrics.
FULL_EVERY = 10
ALWAYS_SENT: frozenset[str] = frozenset(
    {
        "temp_c",
        "power_w",
        "power_instant_w",
        "power_limit_w",
        "enforced_power_limit_w",
        "util_gpu_pct",
        "util_mem_pct",
    }
)


class ProtocolError(Exception):
    """A frame refused; ``reason`` is one short word (the counter's label)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_key(path: Path) -> bytes:
    """The pod key: the file's content, stripped (e.g. ``openssl rand -hex 32``)."""
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: {len(key)} bytes is too short a pod key (at least {MIN_KEY_BYTES})")
    return key


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def mac(key: bytes, tag: bytes, data: bytes) -> bytes:
    return hmac.new(key, tag + data, hashlib.sha256).hexdigest().encode()


def encode(key: bytes, tag: bytes, body: JsonObj) -> bytes:
    data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return b"%s%s %s\n" % (_PREFIX, mac(key, tag, data), data)


def decode(key: bytes, tag: bytes, line: bytes) -> JsonObj:
    """The body of an authentic frame; ProtocolError("frame"|"mac") otherwise. The MAC is checked
    over the bytes as received, before any JSON is parsed."""
    if len(line) > MAX_FRAME:
        raise ProtocolError("frame", f"{len(line)} bytes")
    head = len(_PREFIX) + _MAC_HEX
    if not line.startswith(_PREFIX) or line[head : head + 1] != b" ":
        raise ProtocolError("frame", f"not a v{VERSION} frame")
    sig, data = line[len(_PREFIX) : head], line[head + 1 :]
    if not hmac.compare_digest(mac(key, tag, data), sig.lower()):
        raise ProtocolError("mac", "bad signature")
    try:
        body = json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError("frame", f"not JSON: {err}") from None
    if not isinstance(body, dict):
        raise ProtocolError("frame", "body not an object")
    return body


def now_ms() -> int:
    return int(time.time() * 1000)


MAX_FILLER_W = 5000.0  # above any GPU's TMP: a bigger floor is not a GPU's


@dataclass(frozen=True)
class CapRequest:
    """A checked request."""

    boot: str
    seq: int
    op: str
    issued_at_ms: int
    expires_at_ms: int
    caps: dict[int, float] | None  # local GPU index -> W; None: no decision yet (keep the lease)
    settings: dict[int, GpuSettingsAsk] | None = None  # op "settings" only
    lease_id: tuple[str, int] | None = None  # (controller instance, lease version), if sent


class ReplayGuard:
    """Per controller boot, the highest ``seq`` accepted; boots unseen for longer than the skew
    window are dropped (their requests are outside the window anyway)."""

    def __init__(self, *, window_s: float, keep: int = 64) -> None:
        self.window_s = window_s
        self.keep = keep
        self._high: OrderedDict[str, tuple[int, float]] = OrderedDict()  # boot -> (seq, last wall)

    def check(self, boot: str, seq: int, now_wall: float) -> None:
        for old in [b for b, (_, t) in self._high.items() if now_wall - t > 2 * self.window_s]:
            del self._high[old]
        high = self._high.get(boot)
        if high is not None and seq <= high[0]:
            raise ProtocolError("replay", f"seq {seq} <= {high[0]} of boot {boot}")

    def accept(self, boot: str, seq: int, now_wall: float) -> None:
        self._high[boot] = (seq, now_wall)
        self._high.move_to_end(boot)
        while len(self._high) > self.keep:
            self._high.popitem(last=False)


def check_request(
    body: JsonObj, *, node: str, guard: ReplayGuard, max_skew_s: float, now_wall: float | None = None
) -> CapRequest:
    """Validate a decoded request body; raises ProtocolError with the reason. Does not accept it
    into the replay guard (the caller does, once it acted on it)."""
    now = time.time() if now_wall is None else now_wall
    try:
        boot, seq, op = body["boot"], body["seq"], body["op"]
        issued, expires, raw_caps, target = body["issued_at"], body["expires_at"], body["caps"], body["node"]
    except KeyError as err:
        raise ProtocolError("frame", f"missing {err}") from None
    if not (
        isinstance(boot, str)
        and isinstance(seq, int)
        and isinstance(issued, int)
        and isinstance(expires, int)
        and (raw_caps is None or isinstance(raw_caps, dict))
        and isinstance(target, str)
        and op in OPS
    ):
        raise ProtocolError("frame", "bad field types")
    if target != node:
        raise ProtocolError("node", f"for node {target!r}, this is {node!r}")
    if expires <= now * 1000:
        raise ProtocolError("expired", f"expired {now - expires / 1000:.1f} s ago")
    if abs(issued / 1000 - now) > max_skew_s:
        raise ProtocolError("skew", f"issued {issued / 1000 - now:+.1f} s from now")
    parsed: dict[int, float] = {}
    for k, v in (raw_caps or {}).items():
        try:
            index, watts = int(k), float(v)
        except (TypeError, ValueError):
            raise ProtocolError("frame", f"bad cap {k!r}: {v!r}") from None
        if index < 0 or not math.isfinite(watts) or watts <= 0:
            raise ProtocolError("frame", f"bad cap {k!r}: {v!r}")
        parsed[index] = watts
    settings = _settings(body.get("settings")) if op == "settings" else None
    ctl, lease_v = body.get("ctl"), body.get("lease_v")
    lease_id: tuple[str, int] | None = None
    if ctl is not None or lease_v is not None:
        if not (isinstance(ctl, str) and isinstance(lease_v, int) and not isinstance(lease_v, bool)):
            raise ProtocolError("frame", "bad ctl / lease_v")
        lease_id = (ctl, lease_v)
    guard.check(boot, seq, now)
    caps = None if raw_caps is None else parsed
    return CapRequest(
        boot=boot,
        seq=seq,
        op=op,
        issued_at_ms=issued,
        expires_at_ms=expires,
        caps=caps,
        lease_id=lease_id,
        settings=settings,
    )


_SMOOTHING_KEYS = ("floor_pct", "ramp_up_w_per_s", "ramp_down_w_per_s", "hysteresis_ms")


def _settings(raw: Any) -> dict[int, GpuSettingsAsk]:
    """A ``settings`` map, checked whole: one bad entry refuses the request (nothing applied)."""
    if not isinstance(raw, dict) or not raw:
        raise ProtocolError("frame", "settings: a non-empty map of GPU index to settings")
    out: dict[int, GpuSettingsAsk] = {}
    for k, entry in raw.items():
        if not (isinstance(k, str) and k.isdigit()) or not isinstance(entry, dict) or not entry:
            raise ProtocolError("frame", f"settings {k!r}: {entry!r}")
        unknown = set(entry) - {"smoothing", "filler_w", "workload_profile"}
        if unknown:
            raise ProtocolError("frame", f"settings {k}: unknown {sorted(unknown)}")
        smoothing: SmoothingSettings | None = None
        if "smoothing" in entry:
            sm = entry["smoothing"]
            if sm is None:
                pass
            elif isinstance(sm, dict) and set(sm) == set(_SMOOTHING_KEYS):
                values = [sm[key] for key in _SMOOTHING_KEYS]
                if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                    raise ProtocolError("frame", f"settings {k}: smoothing {sm!r}")
                smoothing = SmoothingSettings(*(float(v) for v in values))
                if not smoothing.valid():
                    raise ProtocolError("frame", f"settings {k}: smoothing out of range {sm!r}")
            else:
                raise ProtocolError("frame", f"settings {k}: smoothing {sm!r}")
        filler: float | None = None
        if "filler_w" in entry:
            w = entry["filler_w"]
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= w <= MAX_FILLER_W:
                raise ProtocolError("frame", f"settings {k}: filler_w {w!r}")
            filler = float(w)
        workload = entry.get("workload_profile")
        if workload is not None and workload not in WORKLOAD_PROFILES:
            raise ProtocolError("frame", f"settings {k}: workload_profile {workload!r}")
        out[int(k)] = GpuSettingsAsk(
            "smoothing" in entry, smoothing, filler, "workload_profile" in entry, workload
        )
    return out


__all__ = [
    "ALWAYS_SENT",
    "FULL_EVERY",
    "OPS",
    "REQ",
    "RSP",
    "CapRequest",
    "GpuSettingsAsk",
    "ProtocolError",
    "ReplayGuard",
    "check_request",
    "decode",
    "encode",
    "load_key",
    "now_ms",
]
