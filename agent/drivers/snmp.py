"""SNMP PDUs (APC rPDU2, Raritan PDU2, ... as profiles): v2c or v3 authPriv, tables by GETBULK.

What to read is data: ``config/profiles/<profile>.toml`` lists tables (a conceptual row OID, the
columns the metrics need, how often to walk them) and metrics (column, index pattern, scale or
decimal-digits column, enum map) and the outlet control object. This module knows SNMP, not PDUs.

Cost: SNMP is the costliest thing the agent polls (a 32-PDU pod at 1 s), so:
- Transport per device: v2c by podagent's own client (``agent/drivers/snmp_v2c.py``: requests kept
  as bytes, one-pass decoding, and an answer with the last one's byte layout read by one struct
  unpack; ~0.65x the whole agent's CPU with net-snmp, measured side by side);
  v3 through net-snmp's C library (netsnmp-cffi, ``agent/drivers/snmp_transport.py``) when it is
  installed, ~5-10x cheaper per value than pysnmp; v3 with AES256 privacy (and everything without
  netsnmp-cffi, or with ``transport = "pysnmp"``) through pysnmp with MIB lookup off.
- Cadence per table, as real pollers do: the tables interlocks read (device, phases) every poll,
  the big outlet tables every ``every`` polls (profile; ``slow_table_every`` in the device config
  overrides it). A table not walked this poll is not re-emitted: the store keeps its last readings
  with their own timestamps, so their age is honest. A SET or ``refresh_all()`` makes the next poll
  walk everything.
- Each table is one GETBULK walk with all its columns in every request, and max-repetitions adapts
  to the rows the table had last time (+1 to see its end), so an agent's answer carries few values
  past the table's end (the device table of 1 row x 3 columns: 6 varbinds, not 3 x 25). Due tables
  of alike size walk together, one request for all their columns (APC: device + phase tables in
  one, both outlet tables in another); a refused combined walk is retried table by table.
- Configuration tables (Raritan decimal digits) are read once per session.
- Per value, as little Python as the common case allows: on an answer of the same layout as the
  last to the same request (``Response.layout``), or with the same names and endOfMibView markers,
  a walk replays what it took from that one (each column's rows, one zip); a column whose values
  are all plain integers in range becomes its Readings in one map; everything else goes value by
  value through the rules (``_convert``, ``_reading``).
- PDUs share a poll instant (``poll_phase = "pdus"``, agent/poller.py): a poll woken on its own
  pays for its cold code and data several times what it costs right after another.

Isolation: every driver has its own transport (own UDP socket), and every request is awaited under
``asyncio.timeout``: a dead PDU costs its own poller a timeout, nobody else anything. The first
failure after a session has worked rebuilds the transport on the next poll, so that SNMPv3 engine
discovery and boots/time sync start afresh (a rebooted PDU has a new engineBoots, a replaced card a
new engineID: an engine that cached the old ones gets no answers). A transport that never had an
answer cached nothing, so a long outage costs one rebuild (~60-100 ms of CPU for pysnmp, which loads
its MIB modules), not one per poll.
"""

from __future__ import annotations

import asyncio
import functools
import math
import operator
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import compress, count, repeat
from pathlib import Path
from typing import Any

import structlog
from pysnmp.hlapi.v3arch.asyncio import CommunityData, UsmUserData

from agent.config import SnmpDevice, profile_path, read_secret
from agent.drivers.base import AuthError, DeviceError, DeviceUnavailable, register
from agent.drivers.snmp_transport import (
    AUTH_PROTOCOLS,
    PRIV_PROTOCOLS,
    NetsnmpTransport,
    PysnmpTransport,
    Response,
    Special,
    Transport,
    TransportAuthError,
    TransportError,
    TransportTimeout,
    UsmCredentials,
    Value,
    error_status_name,
    netsnmp_available,
    netsnmp_supports_v3,
    resolve,
)
from agent.drivers.snmp_v2c import NativeV2cTransport
from agent.drivers.values import isfinite, untrusted
from agent.model import Quality, Reading, unit_of

log = structlog.get_logger(__name__)

Oid = tuple[int, ...]
Rows = dict[tuple[str, int], dict[Oid, Value]]  # (table, column) -> row index -> raw value
CHANNEL = "n"  # the index element that is the channel (phase / outlet number)

# (the answer's layout, per column walked (column, its position in the request, row indexes, last
# OID), the columns it ended, the answer's OIDs, where it said endOfMibView)
_Step = tuple[
    object,
    tuple[tuple[int, int, tuple[Oid, ...], Oid], ...],
    frozenset[int],
    tuple[Oid, ...],
    tuple[int, ...],
]
_MAX_STEPS = 256
_oid_of, _value_of = operator.itemgetter(0), operator.itemgetter(1)  # a varbind's name, value


def _ends(binds: list[tuple[Oid, Value]]) -> tuple[int, ...]:
    """Where the varbinds say endOfMibView (in C: this runs on every answer not replayed)."""
    return tuple(compress(count(), map(operator.is_, map(_value_of, binds), repeat(Special.END_OF_MIB_VIEW))))


_INT_ONLY = {int}
# A Reading from its 8 fields in one tuple, called from C (map): what Reading.__new__ ends in.
_new_reading = functools.partial(tuple.__new__, Reading)

# Margin on top of the transport's own timeout x (retries + 1), for the asyncio.timeout guard.
TIMEOUT_MARGIN_S = 0.5


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


# ---------------------------------------------------------------------------------------------
# Profile


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    entry: Oid
    columns: tuple[int, ...]
    static: bool = False
    every: int = 1  # walked every N-th poll (1: every poll)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str  # may contain "{n}"
    table: str
    column: int
    index: tuple[int | None, ...]  # None = the channel
    scale: float = 1.0
    unit: str = ""
    digits: tuple[str, int] | None = None  # (table, column) holding decimal digits, same index
    value_map: dict[int, float] | None = None
    optional: bool = False  # absent on some firmware: no reading rather than an ERROR one
    valid_range: tuple[float, float] | None = None  # physical range; outside: an ERROR reading

    def match(self, index: Oid) -> int | None:
        """The channel if ``index`` fits this metric's pattern (0 when it has no channel), else None."""
        pattern = self.index
        if len(index) != len(pattern):
            return None
        if pattern == (None,):  # the common case: one index, the channel (outlet, phase)
            return index[0]
        channel = 0
        for want, got in zip(self.index, index, strict=True):
            if want is None:
                channel = got
            elif want != got:
                return None
        return channel

    def index_for(self, channel: int) -> Oid:
        return tuple(channel if x is None else x for x in self.index)

    def metric_name(self, channel: int) -> str:
        return _channel_name(self.name, channel) if None in self.index else self.name


@functools.cache
def _channel_name(template: str, channel: int) -> str:
    """``outlet{n}_power_w`` -> ``outlet7_power_w`` (built once per metric and channel)."""
    return template.replace("{n}", str(channel))


@dataclass(frozen=True, slots=True)
class Control:
    oid: Oid
    index: tuple[int | None, ...]
    on: int
    off: int


@dataclass(frozen=True, slots=True)
class SnmpProfile:
    name: str
    tables: dict[str, Table]
    metrics: tuple[Metric, ...]
    control: Control | None = None
    description: str = ""


def _oid(text: object, where: str) -> Oid:
    if not isinstance(text, str):
        raise ProfileError(f"{where}: expected an OID string like '1.3.6.1...'")
    try:
        oid = tuple(int(x) for x in text.strip(".").split("."))
    except ValueError:
        raise ProfileError(f"{where}: {text!r} is not a numeric OID") from None
    if len(oid) < 2:
        raise ProfileError(f"{where}: OID {text!r} too short")
    return oid


def _index(raw: object, where: str, *, need_channel: bool) -> tuple[int | None, ...]:
    if not isinstance(raw, list) or not raw:
        raise ProfileError(f'{where}.index: expected a non-empty list of integers and/or "n"')
    out: list[int | None] = []
    for x in raw:
        if x == CHANNEL:
            out.append(None)
        elif isinstance(x, int) and not isinstance(x, bool) and x >= 0:
            out.append(x)
        else:
            raise ProfileError(f'{where}.index: {x!r} is neither a sub-identifier nor "n"')
    if out.count(None) > 1:
        raise ProfileError(f'{where}.index: at most one "n"')
    if need_channel and out.count(None) != 1:
        raise ProfileError(f'{where}.index: needs exactly one "n"')
    return tuple(out)


def _valid_range(raw: object, where: str) -> tuple[float, float] | None:
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in raw)
        or not raw[0] < raw[1]
    ):
        raise ProfileError(f"{where}.valid_range: expected [low, high] with low < high")
    return float(raw[0]), float(raw[1])


def load_profile(name: str) -> SnmpProfile:
    """Read and validate an SNMP profile (``apc-rpdu2`` or a path); ProfileError names what is wrong."""
    path = profile_path(name)
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ProfileError(f"SNMP profile {path}: {err}") from err
    where = str(path)

    tables: dict[str, Table] = {}
    for tname, t in (data.get("tables") or {}).items():
        tw = f"{where}: tables.{tname}"
        cols = t.get("columns")
        if not isinstance(cols, list) or not cols or not all(isinstance(c, int) and c > 0 for c in cols):
            raise ProfileError(f"{tw}.columns: expected a non-empty list of column numbers")
        every = t.get("every", 1)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ProfileError(f"{tw}.every: expected a positive integer (walk every N-th poll)")
        tables[tname] = Table(
            tname, _oid(t.get("entry"), f"{tw}.entry"), tuple(cols), bool(t.get("static")), every
        )
    if not tables:
        raise ProfileError(f"{where}: no [tables.*]")

    metrics: list[Metric] = []
    for i, m in enumerate(data.get("metrics") or []):
        mw = f"{where}: metrics[{i}]"
        mname = m.get("name")
        if not isinstance(mname, str) or not mname:
            raise ProfileError(f"{mw}.name: required")
        mw = f"{where}: metrics[{i}] ({mname})"
        table = tables.get(m.get("table", ""))
        if table is None:
            raise ProfileError(f"{mw}.table: {m.get('table')!r} is not one of {sorted(tables)}")
        column = m.get("column")
        if column not in table.columns:
            raise ProfileError(f"{mw}.column: {column!r} is not in tables.{table.name}.columns")
        index = _index(m.get("index"), mw, need_channel="{n}" in mname)
        if None in index and "{n}" not in mname:
            raise ProfileError(f'{mw}.name: an index with "n" needs "{{n}}" in the name')
        digits = None
        if "digits" in m:
            d = m["digits"]
            dt = tables.get(d.get("table", "")) if isinstance(d, dict) else None
            if dt is None or d.get("column") not in dt.columns:
                raise ProfileError(f"{mw}.digits: needs {{ table, column }} of a listed table column")
            digits = (dt.name, int(d["column"]))
        value_map = None
        if "map" in m:
            try:
                value_map = {int(k): float(v) for k, v in m["map"].items()}
            except (AttributeError, TypeError, ValueError):
                raise ProfileError(f'{mw}.map: expected {{ "raw" = value, ... }}') from None
        scale = m.get("scale", 1.0)
        if not isinstance(scale, int | float) or isinstance(scale, bool):
            raise ProfileError(f"{mw}.scale: expected a number")
        unit = m.get("unit", unit_of(mname))
        metrics.append(
            Metric(
                name=mname,
                table=table.name,
                column=int(column),
                index=index,
                scale=float(scale),
                unit=str(unit),
                digits=digits,
                value_map=value_map,
                optional=bool(m.get("optional", False)),
                valid_range=_valid_range(m.get("valid_range"), mw),
            )
        )
    if not metrics:
        raise ProfileError(f"{where}: no [[metrics]]")

    control = None
    if "control" in data:
        c = data["control"]
        cw = f"{where}: control"
        if not isinstance(c.get("on"), int) or not isinstance(c.get("off"), int):
            raise ProfileError(f"{cw}: needs integer on and off values")
        control = Control(_oid(c.get("oid"), f"{cw}.oid"), _index(c.get("index"), cw, need_channel=True),
                          c["on"], c["off"])  # fmt: skip
    desc = str((data.get("device") or {}).get("description", ""))
    return SnmpProfile(path.stem, tables, tuple(metrics), control, desc)


# ---------------------------------------------------------------------------------------------
# Driver


def choose_transport(cfg: SnmpDevice) -> str:
    """``"native"``, ``"netsnmp"`` or ``"pysnmp"`` for this device (auto: native for v2c, netsnmp
    for v3 when importable)."""
    if cfg.transport in ("pysnmp", "native"):
        return cfg.transport
    if cfg.transport == "auto" and cfg.version == "2c":
        return "native"
    if cfg.version == "3" and not netsnmp_supports_v3(cfg.auth_protocol, cfg.priv_protocol):
        return "pysnmp"  # AES256 (config refuses transport=netsnmp with it)
    if cfg.transport == "netsnmp":
        if not netsnmp_available():
            raise ValueError(f"{cfg.id}: transport = 'netsnmp' but netsnmp-cffi is not installed")
        return "netsnmp"
    return "netsnmp" if netsnmp_available() else "pysnmp"


@register("snmp")
class SnmpDriver:
    """One SNMP PDU. ``poll()`` walks the profile's due tables; ``set_outlet()`` switches an outlet."""

    def __init__(self, cfg: SnmpDevice) -> None:
        self.cfg = cfg
        self.device_id = cfg.id
        self.profile = load_profile(cfg.profile)
        self.transport_name = choose_transport(cfg)
        self._transport: Transport | None = None
        self._rebuild = False
        self._session_ok = False  # the current transport has had an answer (so it caches state)
        # Static tables (decimal digits), read once per session: (table, column) -> index -> value.
        self._static: dict[tuple[str, int], dict[Oid, int]] | None = None
        # Channels seen per table in its last good walk: what to report as ERROR when it fails.
        self._last_rows: dict[str, Rows] = {}
        self._by_table: dict[str, list[Metric]] = {}
        # (metric template, index pattern) -> channel -> metric name ("outlet7_power_w")
        self._names: dict[tuple[str, tuple[int | None, ...]], dict[int, str]] = {}
        for m in self.profile.metrics:
            self._by_table.setdefault(m.table, []).append(m)
        self._dynamic = [t for t in self.profile.tables.values() if not t.static]
        slow = cfg.slow_table_every
        self.table_every: dict[str, int] = {
            t.name: t.every if t.every == 1 or slow is None else slow for t in self._dynamic
        }
        self._poll_no = 0
        self._next_due: dict[str, int] = {}  # table -> poll number it is due at (absent: now)
        # max-repetitions per table: rows seen last walk + 1, capped by the config's.
        self._reps: dict[str, int] = {}
        # What each request of a walk took from its last answer, to replay on an answer of the
        # same layout: (tables, OIDs asked, max-repetitions) -> (the answer's layout, per column
        # walked (column, its position in the request, row indexes, last OID), columns ended).
        self._steps: dict[tuple[tuple[str, ...], tuple[Oid, ...], int], _Step] = {}
        # tables walked together -> (column roots, their lengths, (table, column) keys, "walk a+b")
        self._walk_plans: dict[
            tuple[str, ...], tuple[tuple[Oid, ...], tuple[int, ...], tuple[tuple[str, int], ...], str]
        ] = {}
        # (metric template, index pattern, the column's row indexes) -> the Readings' names
        self._column_names: dict[tuple[str, tuple[int | None, ...], tuple[Oid, ...]], tuple[str, ...]] = {}
        # Guards against a transport hang: the transport's own timeout fires first.
        self._request_timeout_s = cfg.timeout_s * (cfg.retries + 1) + TIMEOUT_MARGIN_S

    # -- lifecycle

    async def open(self) -> None:
        await self._connect()

    async def close(self) -> None:
        self._drop_transport()

    def _drop_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _auth(self) -> CommunityData | UsmUserData:
        cfg = self.cfg
        if cfg.version == "3":
            return UsmUserData(
                cfg.user,
                authKey=read_secret(cfg.auth_key, cfg.auth_key_file),
                privKey=read_secret(cfg.priv_key, cfg.priv_key_file),
                authProtocol=AUTH_PROTOCOLS[cfg.auth_protocol],
                privProtocol=PRIV_PROTOCOLS[cfg.priv_protocol],
            )
        return CommunityData(read_secret(cfg.community, cfg.community_file), mpModel=1)

    def _usm(self) -> UsmCredentials:
        cfg = self.cfg
        return UsmCredentials(
            user=cfg.user or "",
            auth_key=read_secret(cfg.auth_key, cfg.auth_key_file) or "",
            priv_key=read_secret(cfg.priv_key, cfg.priv_key_file) or "",
            auth_protocol=cfg.auth_protocol,
            priv_protocol=cfg.priv_protocol,
        )

    async def _connect(self) -> None:
        self._drop_transport()
        cfg = self.cfg
        try:
            async with asyncio.timeout(self._request_timeout_s):
                if self.transport_name == "netsnmp" and cfg.version == "3":
                    address = await resolve(cfg.host, cfg.port)
                    transport: Transport = await NetsnmpTransport.create_v3(
                        address, cfg.port, self._usm(), cfg.timeout_s, cfg.retries
                    )
                elif self.transport_name == "native":
                    address = await resolve(cfg.host, cfg.port)
                    community = read_secret(cfg.community, cfg.community_file) or ""
                    transport = await NativeV2cTransport.create(
                        address, cfg.port, community, cfg.timeout_s, cfg.retries
                    )
                elif self.transport_name == "netsnmp":
                    address = await resolve(cfg.host, cfg.port)
                    community = read_secret(cfg.community, cfg.community_file) or ""
                    transport = NetsnmpTransport.create(
                        address, cfg.port, community, cfg.timeout_s, cfg.retries
                    )
                else:
                    transport = await PysnmpTransport.create(
                        cfg.host, cfg.port, self._auth(), cfg.timeout_s, cfg.retries
                    )
        except TransportAuthError as err:
            raise AuthError(self.device_id, f"connect: {err}") from err
        except (TransportError, TransportTimeout, TimeoutError) as err:
            raise DeviceUnavailable(self.device_id, str(err) or f"cannot reach {cfg.host}") from err
        self._transport = transport
        self._static = None
        self._session_ok = False
        self._rebuild = False

    async def _ensure_transport(self) -> Transport:
        if self._transport is None or self._rebuild:
            await self._connect()
        assert self._transport is not None
        return self._transport

    # -- requests: the one place where transport outcomes become driver errors

    def _failed(self) -> None:
        """A request got no usable answer: rebuild the transport next time if it has state to lose."""
        if self._session_ok:
            self._rebuild = True

    async def _request(self, what: str, send: Callable[[Transport], Awaitable[Response]]) -> Response:
        # Every coroutine awaited on this path is created and resumed per request: the common
        # case (a transport in place, the native client) awaits the request alone.
        transport = self._transport
        if transport is None or self._rebuild:
            transport = await self._ensure_transport()
        try:
            if transport.name == "native":
                resp = await send(transport)  # it times out by itself (one timer per request)
            else:
                # The libraries' own timeouts, guarded against a request that never completes.
                async with asyncio.timeout(self._request_timeout_s):
                    resp = await send(transport)
        except (TimeoutError, TransportTimeout):
            self._failed()
            hint = ""
            if self.cfg.version == "2c" and not self._session_ok:
                # An agent drops a v2c request with the wrong community silently: a timeout says
                # nothing else, so name the two usual causes (the technician reads it in podctl).
                hint = f" (SNMP v2c: check the community and port {self.cfg.port})"
            raise DeviceUnavailable(self.device_id, f"{what}: timeout{hint}") from None
        except TransportAuthError as err:
            self._failed()
            raise AuthError(self.device_id, f"{what}: {err}") from err
        except TransportError as err:
            self._failed()
            raise DeviceError(self.device_id, f"{what}: {err}") from err
        self._session_ok = True  # an answer, even an error status: the session is in sync
        if resp.error_status:
            at = ""
            if 0 < resp.error_index <= len(resp.varbinds):
                at = " at " + ".".join(map(str, resp.varbinds[resp.error_index - 1][0]))
            raise DeviceError(self.device_id, f"{what}: {error_status_name(resp.error_status)}{at}")
        return resp

    async def _walk(self, *tables: Table) -> Rows:
        """All rows of the tables' columns, by GETBULK with every column in each request.

        A column ends at its first OID outside the column (or endOfMibView); the walk ends when
        every column has. Several tables walk together (one request for all their columns) when
        their sizes are alike (``_groups``).
        """
        names = tuple(t.name for t in tables)
        plan = self._walk_plans.get(names)
        if plan is None:  # what a walk of these tables always starts from, worked out once
            roots_ = tuple((*t.entry, c) for t in tables for c in t.columns)
            plan = self._walk_plans[names] = (
                roots_,
                tuple(len(r) for r in roots_),
                tuple((t.name, c) for t in tables for c in t.columns),
                f"walk {'+'.join(names)}",
            )
        roots, root_len, keys, what = plan
        out: Rows = {k: {} for k in keys}
        col_rows = list(out.values())
        last = list(roots)
        active = list(range(len(roots)))
        limit = self.cfg.max_repetitions
        reps = max(self._reps.get(t.name, limit) for t in tables)
        steps = self._steps
        while active:
            oids = [last[i] for i in active]
            resp = await self._request(what, lambda t, oids=oids: t.bulk(oids, reps))  # type: ignore[misc]
            binds = resp.varbinds
            if not binds:
                break
            r = len(active)
            key = (names, tuple(oids), reps)
            step = steps.get(key)
            if step is not None and (
                (resp.layout is not None and step[0] is resp.layout)
                or (step[3] == tuple(map(_oid_of, binds)) and step[4] == _ends(binds))
            ):
                # The answer has the layout of the last answer to this very request (same names,
                # types, lengths: snmp_v2c.Layout), or at least the same names and endOfMibView
                # where it had them (a value of another length: another layout), which is all the
                # walk below looks at: so it takes the same rows as then, each column's rows its
                # first varbinds, every r-th. Only the values are new. (The OIDs compare fast:
                # the native client hands out the same tuple for the same OID bytes.)
                for col, at, row_ids, last_oid in step[1]:
                    # strict=False: the column's varbinds past its end (the next column's) are not rows.
                    col_rows[col].update(zip(row_ids, map(_value_of, binds[at::r]), strict=False))
                    last[col] = last_oid
                if step[2]:
                    active = [c for c in active if c not in step[2]]
                continue
            done: set[int] = set()
            taken: dict[int, list[Oid]] = {}
            for pos, (oid, value) in enumerate(binds):
                col = active[pos % r]
                if col in done:
                    continue
                n = root_len[col]
                if value is Special.END_OF_MIB_VIEW or oid[:n] != roots[col]:
                    done.add(col)
                    continue
                if oid <= last[col]:
                    raise DeviceError(
                        self.device_id, f"{what}: OID not increasing at {'.'.join(map(str, oid))}"
                    )
                last[col] = oid
                col_rows[col][oid[n:]] = value
                taken.setdefault(pos % r, []).append(oid[n:])
            if len(steps) >= _MAX_STEPS:
                steps.clear()
            steps[key] = (
                resp.layout,
                tuple((active[at], at, tuple(ids), last[active[at]]) for at, ids in taken.items()),
                frozenset(done),
                tuple(map(_oid_of, binds)),
                _ends(binds),
            )
            if done:
                active = [c for c in active if c not in done]
        for t in tables:
            rows = max(len(out[(t.name, c)]) for c in t.columns)
            self._reps[t.name] = max(1, min(limit, rows + 1))
        return out

    def _groups(self, due: list[Table]) -> list[tuple[Table, ...]]:
        """The due tables, grouped into walks: tables of alike size share one request.

        A GETBULK asks every column for the same number of rows, so a small table walked with a
        big one returns rows past its end (wasted bytes and decoding); within a factor of ~2 that
        costs less than the round trip saved (device + phase tables: one request, not two). A
        table whose size is not known yet walks alone."""
        groups: list[tuple[Table, ...]] = [(t,) for t in due if t.name not in self._reps]
        known = sorted((t for t in due if t.name in self._reps), key=lambda t: self._reps[t.name])
        group: list[Table] = []
        low = 0
        for t in known:
            reps = self._reps[t.name]
            if group and reps > 2 * low + 2:
                groups.append(tuple(group))
                group = []
            if not group:
                low = reps
            group.append(t)
        if group:
            groups.append(tuple(group))
        return groups

    async def _fetch_static(self) -> dict[tuple[str, int], dict[Oid, int]]:
        if self._static is None:
            static: dict[tuple[str, int], dict[Oid, int]] = {}
            for table in self.profile.tables.values():
                if table.static:
                    for key, rows in (await self._walk(table)).items():
                        static[key] = {i: v for i, v in rows.items() if isinstance(v, int)}
            self._static = static
        return self._static

    # -- Driver protocol

    def refresh_all(self) -> None:
        """Make the next poll walk every table (after a SET, or for a ``poll_now`` command)."""
        self._next_due.clear()

    def metric_every(self, metric: str) -> int:
        """Every how many polls ``metric`` (e.g. ``outlet3_on``) is refreshed: its staleness scale."""
        for m in self.profile.metrics:
            head, _, tail = m.name.partition("{n}")
            if m.name == metric or (
                _ and metric.startswith(head) and metric.endswith(tail)
                and metric[len(head) : len(metric) - len(tail)].isdigit()
            ):  # fmt: skip
                return self.table_every[m.table]
        return 1

    async def poll(self) -> list[Reading]:
        # Down and up are logged (once each) by the poller, not here.
        n = self._poll_no
        self._poll_no += 1
        static = self._static if self._static is not None else await self._fetch_static()
        due = [t for t in self._dynamic if n >= self._next_due.get(t.name, 0)]
        # Not due: a table's last readings stay in the store with their own age.
        got: dict[str, Rows | DeviceError] = {}
        for group in self._groups(due):
            try:
                rows = await self._walk(*group)
            except AuthError:
                raise
            except DeviceError as err:
                if len(group) == 1:
                    got[group[0].name] = err
                    continue
                # The PDU answered, but not for all of them: each table on its own, so that only
                # the one it refuses reads as ERROR.
                for table in group:
                    try:
                        got[table.name] = await self._walk(table)
                    except AuthError:
                        raise
                    except DeviceError as err1:
                        got[table.name] = err1
                continue
            for table in group:
                got[table.name] = rows
        readings: list[Reading] = []
        first_error: DeviceError | None = None
        any_good = False
        mono, wall = time.monotonic(), time.time()
        for table in due:  # the profile's order
            result = got[table.name]
            metrics = self._by_table.get(table.name, [])
            if isinstance(result, DeviceError):
                first_error = first_error or result
                readings.extend(self._error_readings(table.name, metrics, result.reason))
                continue
            any_good = True
            self._last_rows[table.name] = result
            readings.extend(self._readings(metrics, result, static, mono, wall))
        if not any_good and first_error is not None:
            raise first_error
        # Only now: a poll that raised half-way returned nothing, so its tables stay due.
        for table in due:
            self._next_due[table.name] = n + self.table_every[table.name]
        return readings

    def _readings(
        self,
        metrics: list[Metric],
        rows: Rows,
        static: dict[tuple[str, int], dict[Oid, int]],
        mono: float,
        wall: float,
    ) -> list[Reading]:
        # The hot loop of SNMP polling. The common case (integers, scaled or mapped, no digits,
        # all finite and in range) builds a column's Readings in C (map/zip over the column), or
        # one Reading in place for a metric of one fixed row; anything else goes value by value,
        # through _convert and _reading, which hold the rules.
        out: list[Reading] = []
        append = out.append
        device = self.device_id
        new = tuple.__new__
        good = Quality.GOOD
        for m in metrics:
            col = rows.get((m.table, m.column), {})
            plain = m.digits is None
            scale, unit, vmap = m.scale, m.unit, m.value_map
            low, high = m.valid_range or (-math.inf, math.inf)
            if m.index != (None,):
                if plain and None not in m.index:  # one fixed row (the device table's row 1)
                    raw = col.get(m.index)  # type: ignore[arg-type]  # no None in it
                    if type(raw) is int:
                        value = raw * scale if vmap is None else vmap.get(raw)
                        if value is not None and value - value == 0.0 and low <= value <= high:
                            append(new(Reading, (device, m.name, value, unit, mono, wall, good, None)))
                            continue
                found = [(ch, index, raw) for index, raw in col.items() if (ch := m.match(index)) is not None]
                # Walk order is channel order: the other index elements are equal in every match.
                if not found and None not in m.index and not m.optional:
                    append(self._reading(m, 0, None, mono=mono, wall=wall, error="not in the PDU's table"))
                    continue
                for ch, index, raw in found:
                    value, error = self._convert(m, index, raw, static)
                    append(self._reading(m, ch, value, mono=mono, wall=wall, error=error))
                continue
            if plain and col:
                column = self._column(m, col, scale, vmap, low, high)
                if column is not None:
                    column_names, values = column
                    out += map(
                        _new_reading,
                        zip(repeat(device), column_names, values, repeat(unit), repeat(mono), repeat(wall),
                            repeat(good), repeat(None)),
                    )  # fmt: skip
                    continue
            names = self._names.setdefault((m.name, m.index), {})
            for index, raw in col.items():  # one index, the channel (outlet, phase)
                if len(index) != 1:
                    continue
                ch = index[0]
                if plain and type(raw) is int:
                    value = raw * scale if vmap is None else vmap.get(raw)
                    # finite (NaN and Inf are not) and in range: else _convert and _reading say why
                    if value is not None and value - value == 0.0 and low <= value <= high:
                        name = names.get(ch)
                        if name is None:
                            name = names[ch] = m.metric_name(ch)
                        append(new(Reading, (device, name, value, unit, mono, wall, good, None)))
                        continue
                conv, error = self._convert(m, index, raw, static)
                append(self._reading(m, ch, conv, mono=mono, wall=wall, error=error))
        return out

    def _column(
        self,
        m: Metric,
        col: dict[Oid, Value],
        scale: float,
        vmap: dict[int, float] | None,
        low: float,
        high: float,
    ) -> tuple[tuple[str, ...], list[float]] | None:
        """The names and values of a whole channel column when every value takes the common case
        (an integer; mapped if the metric maps; the results finite and in range), else None."""
        raws: list[Any] = list(col.values())  # integers only, checked next
        if set(map(type, raws)) != _INT_ONLY:
            return None
        values: list[Any] = list(map(scale.__mul__, raws)) if vmap is None else list(map(vmap.get, raws))
        if vmap is not None and None in values:
            return None  # a raw value the map does not know: _convert says so
        total = sum(values)
        if total - total != 0.0:
            return None  # an Inf or NaN somewhere (or a sum past the float range): value by value
        if (low != -math.inf or high != math.inf) and not low <= min(values) <= max(values) <= high:
            return None
        key = (m.name, m.index, tuple(col))
        names = self._column_names.get(key)
        if names is None:
            if any(len(index) != 1 for index in key[2]):
                return None
            if len(self._column_names) >= _MAX_STEPS:
                self._column_names.clear()
            names = self._column_names[key] = tuple(m.metric_name(index[0]) for index in key[2])
        return names, values

    def _convert(
        self, m: Metric, index: Oid, raw: Value, static: dict[tuple[str, int], dict[Oid, int]]
    ) -> tuple[float | None, str | None]:
        if not isinstance(raw, int):
            return None, f"not a number: {raw.value if isinstance(raw, Special) else raw!r}"
        if m.value_map is not None:
            if raw not in m.value_map:
                return None, f"unexpected value {raw}"
            return m.value_map[raw], None
        value = raw * m.scale
        if m.digits is not None:
            digits = static.get(m.digits, {}).get(index)
            if digits is None:
                return None, "no decimal digits for this sensor"
            value /= 10**digits
        return value, None

    def _reading(
        self, m: Metric, ch: int, value: float | None, *, mono: float, wall: float, error: str | None
    ) -> Reading:
        if (
            value is not None
            and (m.valid_range is not None or not isfinite(value))  # the cheap test first: a hot path
            and (bad := untrusted(value, m.valid_range)) is not None
        ):
            value, error = None, bad
        return Reading(
            device=self.device_id,
            metric=m.metric_name(ch),
            value=value,
            unit=m.unit,
            ts_mono=mono,
            ts_wall=wall,
            quality=Quality.GOOD if error is None else Quality.ERROR,
            error=error,
        )

    def _error_readings(self, table: str, metrics: list[Metric], reason: str) -> list[Reading]:
        now_mono, now_wall = time.monotonic(), time.time()
        last = self._last_rows.get(table, {})
        out: list[Reading] = []
        for m in metrics:
            channels = sorted(
                {ch for i in last.get((m.table, m.column), {}) if (ch := m.match(i)) is not None}
            )
            for ch in channels or ([0] if None not in m.index else []):
                out.append(self._reading(m, ch, None, mono=now_mono, wall=now_wall, error=reason))
        return out

    # -- extras: raw values (podctl poll) and outlet switching (actuator)

    async def poll_raw(self) -> list[tuple[str, object]]:
        """Every (OID, raw value) the profile's tables hold, static ones included."""
        out: list[tuple[str, object]] = []
        for table in self.profile.tables.values():
            for (_t, col), rows in (await self._walk(table)).items():
                base = ".".join(map(str, (*table.entry, col)))
                for index, raw in sorted(rows.items()):
                    val: object = raw.value if isinstance(raw, Special) else raw
                    out.append((f"{base}.{'.'.join(map(str, index))}", val))
        return out

    async def set_outlet(self, outlet: int, on: bool) -> None:
        """Switch an outlet by SNMP SET; DeviceError if the PDU refuses."""
        control = self.profile.control
        if control is None:
            raise DeviceError(self.device_id, f"profile {self.profile.name} has no outlet control")
        if outlet < 1:
            raise DeviceError(self.device_id, f"no outlet {outlet}")
        oid = (*control.oid, *(outlet if x is None else x for x in control.index))
        value = control.on if on else control.off
        await self._request(f"set outlet {outlet}", lambda t: t.set_integer(oid, value))
        self.refresh_all()  # the next poll reads the switched state back, slow tables included
        log.info("pdu outlet switched", device=self.device_id, outlet=outlet, on=on)


__all__ = [
    "Control",
    "Metric",
    "ProfileError",
    "SnmpDriver",
    "SnmpProfile",
    "Table",
    "choose_transport",
    "load_profile",
]
