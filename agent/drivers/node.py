"""Node driver: one GPU server's node agent, over the pod network (agent/node/protocol.py).

Polled like any device. A poll reads every GPU of the server (its readings keep the node's sample
age, so staleness is judged on when NVML was read, not when the answer came) and renews the cap
lease; ``set_power_limits`` sends a new lease at once and returns what the node read back. GPUs
are sub-devices ``{gpu_prefix}{local index}``; their info carries the dcgm-exporter identity
(``hostname``, ``gpu`` = local index, ``uuid``).

Two connections, each a request/answer stream with its own boot id (so the node's replay guard
sees two ordered streams): one for polls, one for caps, so a cap never waits behind a poll.

The lease is one map for every GPU the controller governs, changed at once when a cap is asked
(before anything is awaited, so two sets in flight never undo each other) and carried whole by
every request with its version: the node keeps the newest version whatever connection it came on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from agent.config import NodeDevice
from agent.drivers.base import AuthError, DeviceError, DeviceUnavailable, DriverError, register
from agent.drivers.smoothing import GpuSettingsAsk, GpuSettingsOutcome, SmoothingReadback
from agent.model import Quality, Reading, unit_of
from agent.node.protocol import (
    ALWAYS_SENT,
    FULL_EVERY,
    MAX_FRAME,
    REQ,
    RSP,
    JsonObj,
    ProtocolError,
    decode,
    encode,
    load_key,
    now_ms,
)

log = structlog.get_logger(__name__)

CAP_TOLERANCE_W = 1.0
_QUALITIES = {q.value: q for q in Quality}


class _Link:
    """One connection to the node: signed requests, answers checked against the request."""

    def __init__(self, cfg: NodeDevice, key: bytes, instance: str, stream: str) -> None:
        self.cfg = cfg
        self.key = key
        self.instance = instance
        self.boot = f"{instance}-{stream}"
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self,
        op: str,
        caps: Mapping[int, float] | None,
        lease_s: float,
        lease_v: int,
        *,
        extra: JsonObj | None = None,
        timeout_s: float | None = None,
    ) -> JsonObj:
        timeout = self.cfg.timeout_s if timeout_s is None else timeout_s
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    return await self._request(op, caps, lease_s, lease_v, extra)
            except TimeoutError:
                await self.close()
                raise DeviceUnavailable(self.cfg.id, f"no answer within {timeout:g} s") from None
            except (ConnectionError, OSError, asyncio.IncompleteReadError, ValueError) as err:
                await self.close()
                raise DeviceUnavailable(self.cfg.id, f"{type(err).__name__}: {err}") from None

    async def _request(
        self, op: str, caps: Mapping[int, float] | None, lease_s: float, lease_v: int, extra: JsonObj | None
    ) -> JsonObj:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(
                self.cfg.host, self.cfg.port, limit=MAX_FRAME + 2
            )
        assert self._reader is not None
        issued = now_ms()
        seq = next(self._seq)
        body = {
            "node": self.cfg.id,
            "boot": self.boot,
            "seq": seq,
            "op": op,
            "issued_at": issued,
            "expires_at": issued + int(lease_s * 1000),
            "caps": None if caps is None else {str(i): round(w, 3) for i, w in caps.items()},
            "ctl": self.instance,
            "lease_v": lease_v,
            **(extra or {}),
        }
        self._writer.write(encode(self.key, REQ, body))
        await self._writer.drain()
        line = await self._reader.readline()
        if not line:
            raise ConnectionError("node closed the connection")
        try:
            answer = decode(self.key, RSP, line.rstrip(b"\n"))
        except ProtocolError as err:
            await self.close()
            raise DeviceError(self.cfg.id, f"answer refused: {err}") from None
        re = answer.get("re")
        if not isinstance(re, dict) or re.get("boot") != self.boot or re.get("seq") != seq:
            if answer.get("error") == "mac":
                raise AuthError(self.cfg.id, "the node refused our signature (different pod key?)")
            await self.close()
            raise DeviceError(self.cfg.id, f"answer to another request ({re!r})")
        if not answer.get("ok"):
            error = str(answer.get("error"))
            if error == "starting":
                raise DeviceUnavailable(self.cfg.id, "node agent starting")
            raise DeviceError(self.cfg.id, f"node refused the request: {error}")
        return answer

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


@register("node")
class NodeDriver:
    """All GPUs of one server, through its node agent; device ids f"{gpu_prefix}{index}"."""

    def __init__(self, cfg: NodeDevice) -> None:
        self.cfg = cfg
        self.device_id = cfg.id
        self.prefix = cfg.gpu_prefix if cfg.gpu_prefix is not None else f"{cfg.id}-gpu"
        self.lease_s = cfg.lease_s if cfg.lease_s is not None else 3 * cfg.poll_interval_s
        self._key: bytes | None = None
        self._poll: _Link | None = None
        self._act: _Link | None = None
        self._settings: _Link | None = None  # smoothing and filler sets: slower than a cap
        # local index -> W, renewed with every poll. None until the first answer: the lease then
        # starts as the limits the GPUs have (as the interlock engine reconciles at start), so a
        # controller restart never releases a cap the node enforces.
        self._lease: dict[int, float] | None = None
        self._lease_v = 0  # raised on every change of _lease; the node keeps the newest
        self._instance = os.urandom(6).hex()
        self._info: dict[str, dict[str, str]] = {}
        self._devices: dict[int, str] = {}  # local index -> device id (built once per GPU)
        self._constraints: dict[str, tuple[float, float, float]] = {}
        self.hostname: str | None = None
        self._gpus_seen: int | None = None
        self.node_boot: str | None = None
        self.mode: str | None = None
        self.last_ack_mono: float | None = None  # the node's last answer that took our lease

    # -- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        if self._key is None:
            try:
                self._key = load_key(Path(self.cfg.key_file))
            except (OSError, ValueError) as err:
                raise DeviceError(self.device_id, f"pod key: {err}") from None
            self._poll = _Link(self.cfg, self._key, self._instance, "poll")
            self._act = _Link(self.cfg, self._key, self._instance, "caps")
            self._settings = _Link(self.cfg, self._key, self._instance, "settings")

    async def close(self) -> None:
        for link in (self._poll, self._act, self._settings):
            if link is not None:
                await link.close()

    async def poll(self) -> list[Reading]:
        if self._poll is None:
            raise DeviceUnavailable(self.device_id, "not open")
        for attempt in range(self.cfg.retries + 1):  # within the poller's budget for this device
            try:
                answer = await self._poll.request("poll", self._lease, self.lease_s, self._lease_v)
                break
            except DeviceUnavailable:
                if attempt == self.cfg.retries:
                    raise
        readings = self._readings(answer)
        self.last_ack_mono = time.monotonic()
        if self._lease is None:
            self._lease = self._applied(answer)
        return readings

    @staticmethod
    def _applied(answer: JsonObj) -> dict[int, float]:
        raw = answer.get("applied_w")
        out: dict[int, float] = {}
        for k, v in (raw if isinstance(raw, dict) else {}).items():
            if isinstance(v, int | float) and math.isfinite(v) and v > 0 and str(k).isdigit():
                out[int(k)] = float(v)
        return out

    # -- answers -------------------------------------------------------------------------------
    def _readings(self, answer: JsonObj) -> list[Reading]:
        now_m, now_w = time.monotonic(), time.time()
        out: list[Reading] = []
        hostname = str(answer.get("hostname") or "")
        boot = answer.get("node_boot")
        if self.node_boot is not None and boot != self.node_boot:
            log.warning("node restarted", device=self.device_id, node_boot=boot)
        self.node_boot = str(boot)
        self.hostname = hostname
        mode = str(answer.get("mode"))
        if mode != self.mode:
            if self.mode is not None or mode == "failsafe":
                log.info("node lease mode", device=self.device_id, mode=mode)
            self.mode = mode
        gpus = answer.get("gpus")
        if not isinstance(gpus, list):
            raise DeviceError(self.device_id, "poll answer without gpus")
        if self.cfg.gpus is not None and len(gpus) != self.cfg.gpus and len(gpus) != self._gpus_seen:
            # The interlocks' topology and the wiring use the configured count: a GPU beyond it is
            # read but on no loop or feed (a lost one: sensor_stale holds its cap).
            log.warning(
                "node reports a GPU count other than its config's",
                device=self.device_id,
                reported=len(gpus),
                configured=self.cfg.gpus,
            )
        self._gpus_seen = len(gpus)
        devices = self._devices
        for gpu in gpus:
            if not isinstance(gpu, dict):
                continue
            index = gpu.get("index")
            readings = gpu.get("readings")
            if type(index) is not int or not isinstance(readings, dict):
                continue
            dev = devices.get(index)
            if dev is None:
                dev = devices[index] = f"{self.prefix}{index}"
            out.extend(_gpu_readings(dev, readings, now_m, now_w))
            raw_info = gpu.get("info")
            if isinstance(raw_info, dict) or dev not in self._info:  # sparse answers carry none
                info = {str(k): str(v) for k, v in raw_info.items()} if isinstance(raw_info, dict) else {}
                info.update(hostname=hostname, gpu=str(index), node=self.device_id)
                self._info[dev] = info
            if "min_power_limit_w" in readings:  # the three come together (full answers only)
                lim = [
                    readings.get(m)
                    for m in ("min_power_limit_w", "max_power_limit_w", "default_power_limit_w")
                ]
                values = [v[0] if isinstance(v, list) and v and _finite(v[0]) else None for v in lim]
                if all(v is not None for v in values):
                    lo, hi, default = (float(v) for v in values if v is not None)
                    self._constraints[dev] = (lo, hi, default)
        status = answer.get("status")
        if isinstance(status, dict):
            device_id = self.device_id
            for metric, value in status.items():
                if metric == "rejected_total":
                    continue  # the sum of the per-reason counters (one family, labelled by reason)
                if _finite(value):
                    name = f"node_{metric}"
                    out.append(Reading(device_id, name, float(value), unit_of(name), now_m, now_w))
        return out

    @staticmethod
    def metric_every(metric: str) -> int:
        """Poll answers are sparse (agent/node/protocol.py): a reading that did not change (a GPU's
        or the node's own) is re-sent only every FULL_EVERY answers: stale only after that many x."""
        return 1 if metric in ALWAYS_SENT else FULL_EVERY

    # -- what the interlocks and budgets use ----------------------------------------------------
    def device_info(self) -> dict[str, dict[str, str]]:
        return {d: dict(i) for d, i in self._info.items()}

    def gpu_ids(self) -> list[str]:
        return sorted(self._info, key=lambda d: int(d.removeprefix(self.prefix)))

    def constraints(self, device: str) -> tuple[float, float, float]:
        c = self._constraints.get(device)
        if c is None:
            raise DeviceUnavailable(device, "power-limit constraints unknown (node not read yet)")
        return c

    def _index(self, device: str) -> int | None:
        if not device.startswith(self.prefix):
            return None
        try:
            return int(device.removeprefix(self.prefix))
        except ValueError:
            return None

    async def set_caps(self, caps: Mapping[str, float]) -> Mapping[str, float]:
        """The power-limiter shape (agent/actuators.py): set caps, return the limits now applied.
        A GPU that failed is left out of the answer."""
        results = await self.set_power_limits(caps)
        return {g: v for g, v in results.items() if not isinstance(v, DriverError)}

    async def set_power_limits(self, limits: Mapping[str, float]) -> dict[str, float | DriverError]:
        """Send the new lease now; per GPU, the cap the node honours (it holds this lease and its
        limit is at or under the cap: a lower one, from the node's own rules or its ramp, honours
        it too) or the error. The lease changes here, before the request: a failed request leaves
        it to the next poll to deliver (and the caller retries)."""
        out: dict[str, float | DriverError] = {}
        lease = dict(self._lease or {})
        asked: dict[str, tuple[int, float]] = {}
        for device, requested in limits.items():
            index = self._index(device)
            if index is None or not math.isfinite(requested) or requested <= 0:
                out[device] = DeviceError(device, f"not a GPU of {self.device_id} or bad limit {requested!r}")
                continue
            watts = requested
            if device in self._constraints:
                lo, hi, _ = self._constraints[device]
                watts = min(max(requested, lo), hi)
            lease[index] = watts
            asked[device] = (index, watts)
        if not asked:
            return out
        self._lease = lease
        self._lease_v += 1
        version = self._lease_v
        if self._act is None:
            await self.open()
        assert self._act is not None
        try:
            answer = await self._act.request("caps", lease, self.lease_s, version)
        except DriverError as err:
            for device in asked:
                out[device] = type(err)(device, err.reason)
            return out
        self.last_ack_mono = time.monotonic()
        held = answer.get("lease_v")
        applied = answer.get("applied_w")
        applied = applied if isinstance(applied, dict) else {}
        for device, (index, watts) in asked.items():
            now_w = applied.get(str(index))
            if not isinstance(held, int) or held < version:
                out[device] = DeviceError(device, f"node holds lease {held!r}, not {version}")
            elif not isinstance(now_w, int | float) or not math.isfinite(now_w):
                out[device] = DeviceError(device, "node did not report its limit")
            elif now_w <= watts + CAP_TOLERANCE_W:
                out[device] = watts
            else:
                out[device] = float(now_w)  # over the cap: the interlock service reports it
        return out

    async def set_power_limit(self, device: str, watts: float) -> float:
        result = (await self.set_power_limits({device: watts}))[device]
        if isinstance(result, DriverError):
            raise result
        return result

    async def set_gpu_settings(self, asks: Mapping[str, GpuSettingsAsk]) -> dict[str, GpuSettingsOutcome]:
        """GPU smoothing and filler floors through the node (op ``settings``, on its own
        connection: a smoothing set waits for the GPU's tick, a cap must not); per GPU what the
        node read back or why not. Never raises for one GPU."""
        out: dict[str, GpuSettingsOutcome] = {}
        body: dict[str, JsonObj] = {}
        index_of: dict[str, int] = {}
        for device, ask in asks.items():
            index = self._index(device)
            if index is None:
                out[device] = GpuSettingsOutcome(smoothing_error=f"not a GPU of {self.device_id}")
                continue
            entry: JsonObj = {}
            if ask.set_smoothing:
                sm = ask.smoothing
                entry["smoothing"] = (
                    None
                    if sm is None
                    else {
                        "floor_pct": sm.floor_pct,
                        "ramp_up_w_per_s": sm.ramp_up_w_per_s,
                        "ramp_down_w_per_s": sm.ramp_down_w_per_s,
                        "hysteresis_ms": sm.hysteresis_ms,
                    }
                )
            if ask.filler_w is not None:
                entry["filler_w"] = round(ask.filler_w, 1)
            if ask.set_workload:
                entry["workload_profile"] = ask.workload_profile
            if entry:
                body[str(index)] = entry
                index_of[device] = index
        if not body:
            return out
        if self._settings is None:
            await self.open()
        assert self._settings is not None
        try:
            # It carries the lease in force, as a poll does (renews it; the version keeps order).
            answer = await self._settings.request(
                "settings",
                self._lease,
                self.lease_s,
                self._lease_v,
                extra={"settings": body},
                timeout_s=max(self.cfg.timeout_s, SETTINGS_TIMEOUT_S),
            )
        except DriverError as err:
            for device in index_of:
                out[device] = GpuSettingsOutcome(
                    smoothing_error=err.reason, filler_error=err.reason, workload_error=err.reason
                )
            return out
        got = answer.get("settings")
        got = got if isinstance(got, dict) else {}
        for device, index in index_of.items():
            out[device] = _outcome(got.get(str(index)))
        return out

    def submit_power_limits(
        self, limits: Mapping[str, float]
    ) -> asyncio.Future[dict[str, float | DriverError]]:
        """Start the lease now (a task), for callers that collect the answer later."""
        return asyncio.ensure_future(self.set_power_limits(dict(limits)))


_GOOD = Quality.GOOD
_ERROR = Quality.ERROR
_INF = math.inf
_MAX_INT = 2**53  # JSON integers are unbounded; past this one is no reading (and float() may overflow)
_UNITS: dict[str, str] = {}  # metric -> unit_of(metric): the node's metric names are few
_UNITS_KEPT = 1024


def _finite(value: object) -> bool:
    """A JSON number that is a reading (bool is not; NaN and Inf never are)."""
    t = type(value)
    return (t is float and math.isfinite(value)) or (t is int and -_MAX_INT < value < _MAX_INT)  # type: ignore[operator,arg-type]


def _gpu_readings(dev: str, readings: dict[str, Any], now_m: float, now_w: float) -> list[Reading]:
    """One GPU's ``{metric: [value|null, quality, error|null, age_s]}``, checked item by item: a
    malformed item is dropped, a bad value (not a finite number) is ERROR, never a number. The hot
    path of the controller per node (~12 items per GPU per poll): no per-item function call."""
    out: list[Reading] = []
    append = out.append
    qualities, units, make = _QUALITIES, _UNITS, tuple.__new__
    for metric, item in readings.items():
        if type(item) is not list or len(item) != 4:
            continue
        value, quality, error, age = item
        q = qualities.get(quality) if type(quality) is str else None
        t = type(age)
        # (metric is a str: a JSON object's keys always are.)
        if q is None or not ((t is float and 0 <= age < _INF) or (t is int and 0 <= age < _MAX_INT)):
            continue  # age: a finite number >= 0 (NaN fails both comparisons)
        if value is not None:
            t = type(value)
            if t is float:  # the usual case: kept as is
                if not -_INF < value < _INF:  # NaN, Inf
                    value, q, error = None, _ERROR, "bad value from node"
            elif t is int and -_MAX_INT < value < _MAX_INT:
                value = float(value)
            else:  # a string, a bool, or a 400-digit integer: missing, never a number
                value, q, error = None, _ERROR, "bad value from node"
        elif q is _GOOD:
            q = _ERROR
        unit = units.get(metric)
        if unit is None:
            unit = unit_of(metric)
            if len(units) < _UNITS_KEPT:  # an authenticated node still cannot grow it without end
                units[metric] = unit
        # Reading's own __new__ only fills default timestamps, which every field here has: the
        # tuple is built directly (half the cost; ~50 of these per node answer).
        append(
            make(
                Reading,
                (
                    dev,
                    metric,
                    value,
                    unit,
                    now_m - age,
                    now_w - age,
                    q,
                    None if error is None else str(error),
                ),
            )
        )
    return out


SETTINGS_TIMEOUT_S = 5.0  # a smoothing profile is several NVML calls, each up to a GPU tick


def _outcome(raw: Any) -> GpuSettingsOutcome:
    """One GPU's entry of a ``settings`` answer (agent/node/app.py ``settings_json``)."""
    if not isinstance(raw, dict):
        return GpuSettingsOutcome(smoothing_error="node did not report this GPU")

    def text(key: str) -> str | None:
        v = raw.get(key)
        return None if v is None else str(v)

    def number(v: Any) -> float | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else None

    sm = raw.get("smoothing")
    readback = None
    if isinstance(sm, dict) and isinstance(sm.get("enabled"), bool):
        profile = sm.get("profile")
        readback = SmoothingReadback(
            enabled=sm["enabled"],
            profile=profile if isinstance(profile, int) and not isinstance(profile, bool) else None,
            floor_w=number(sm.get("floor_w")),
        )
    return GpuSettingsOutcome(
        smoothing=readback,
        smoothing_error=text("smoothing_error"),
        unsupported=raw.get("unsupported") is True,
        filler_w=number(raw.get("filler_w")),
        filler_error=text("filler_error"),
        workload=text("workload"),
        workload_error=text("workload_error"),
        workload_unsupported=raw.get("workload_unsupported") is True,
    )


__all__ = ["NodeDriver"]
