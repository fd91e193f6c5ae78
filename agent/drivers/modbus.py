"""Modbus TCP / RTU driver for cooling units (CDU, chiller) and Modbus-metered PDUs.

The register map is data (``config/profiles/<name>.toml``, see ``generic-cdu.toml`` for the
format): this module knows the protocol, the data types and how to read a map cheaply.

- Reads are coalesced: points of the same table at adjacent addresses become one request, bounded
  by ``max_registers_per_read`` and split at gaps, because reading a reserved address makes real
  devices answer exception 2 for the whole block.
- Several units on one RTU line share ONE serial client and take turns on one ``asyncio.Lock`` per
  line (the bus is half-duplex: one frame in flight). The lock is held per request, not per poll,
  and each request has its own timeout, so a dead unit costs one timeout per poll and the other
  units on the line are only delayed, never failed.
- Modbus TCP goes through podagent's own MBAP client (``agent/drivers/modbus_tcp.py``: one
  ``struct`` call to frame a request and one to decode a block's registers; ~0.7x pymodbus's CPU
  for the whole agent); RTU through pymodbus's serial client.
- A timeout (or a refused connection) is ``DeviceUnavailable``; a Modbus exception answer is
  ``DeviceError("modbus exception 6 (device busy)")``. A busy unit must never read as 0.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain, repeat
from math import isfinite
from operator import le, mul, truediv
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pymodbus.client import AsyncModbusSerialClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.pdu import ModbusPDU

from agent.config import ModbusDevice, profile_path
from agent.drivers.base import DeviceError, DeviceUnavailable, DriverError, register
from agent.drivers.modbus_tcp import (
    Answer,
    Got,
    LeanModbusTcpClient,
    ModbusAnswerError,
    Request,
    Unpack,
    read_request,
)
from agent.drivers.values import untrusted
from agent.model import Quality, Reading, unit_of

log = structlog.get_logger(__name__)

Table = Literal["holding", "input", "coil", "discrete"]
DataType = Literal["int16", "uint16", "int32", "uint32", "float32", "bool"]
WordOrder = Literal["big", "little"]
# setpoint: the supply temperature setpoint (interlocks lower it); pump_speed: the pump command;
# power_setpoint / grid_target / mode: a battery inverter's commands (the power controller).
PointRole = Literal["setpoint", "pump_speed", "power_setpoint", "grid_target", "mode"]
_Client = LeanModbusTcpClient | AsyncModbusSerialClient
_Answer = Answer | ModbusPDU

BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete"})
# The read function code of each table.
FUNCTION_OF: dict[str, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
# Protocol limits (Modbus application protocol v1.1b3, 6.1-6.4): 125 registers / 2000 bits per read.
MAX_BITS_PER_READ = 2000

EXCEPTION_NAMES: dict[int, str] = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}

_WIDTH: dict[str, int] = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "bool": 1}
_INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}


# --------------------------------------------------------------------------------------- profile


class _ProfileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModbusPoint(_ProfileModel):
    """One value of the map: where it lives, how it is encoded, what it means."""

    metric: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    table: Table
    address: int = Field(ge=0, le=0xFFFF)
    type: DataType = "uint16"
    scale: float = 1.0
    unit: str | None = None
    writable: bool = False
    min: float | None = None
    max: float | None = None
    description: str = ""
    # What a writable point is for, so services find it by role, not by metric name.
    role: PointRole | None = None
    # The physical range of a reading, in engineering units: a value outside it (a sensor
    # absent, a wrong map) is an ERROR reading, never a number.
    valid_range: tuple[float, float] | None = None
    # A bitmask's named bits ({ 0 = "pump fault", ... }: bit number -> name) and an enumeration's
    # named values ({ 0 = "power_setpoint", 1 = "grid_target" }: raw value -> name).
    bits: dict[int, str] = Field(default_factory=dict)
    enum: dict[int, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModbusPoint:
        is_bit = self.table in BIT_TABLES
        if is_bit != (self.type == "bool"):
            raise ValueError(f"{self.metric}: type 'bool' goes with coil/discrete tables, and only there")
        if self.scale == 0 or not math.isfinite(self.scale):
            raise ValueError(f"{self.metric}: scale must be a finite non-zero number")
        if self.writable and self.table not in ("holding", "coil"):
            raise ValueError(f"{self.metric}: only holding registers and coils are writable")
        if self.address + self.width - 1 > 0xFFFF:
            raise ValueError(f"{self.metric}: runs past address 65535")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{self.metric}: min > max")
        if self.role is not None and not self.writable:
            raise ValueError(f"{self.metric}: a role is for writable points (writable = true)")
        if self.valid_range is not None:
            lo, hi = self.valid_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"{self.metric}: valid_range must be [low, high] with low < high")
        if any(not 0 <= bit < 16 * self.width for bit in self.bits):
            raise ValueError(f"{self.metric}: bits are numbered 0..{16 * self.width - 1}")
        return self

    def bit_names(self, raw: int) -> list[str]:
        """The names of the bits set in ``raw`` (unnamed bits as hex)."""
        names = [name for bit, name in sorted(self.bits.items()) if raw >> bit & 1]
        unnamed = raw & ~sum(1 << b for b in self.bits)
        return names + ([f"0x{unnamed:x}"] if unnamed else [])

    def enum_value(self, name: str) -> int | None:
        """The raw value of an enumeration's named value (None: the profile names no such value)."""
        return next((raw for raw, n in self.enum.items() if n == name), None)

    @property
    def width(self) -> int:
        """Registers (or bits) the point occupies."""
        return _WIDTH[self.type]

    @property
    def end(self) -> int:
        return self.address + self.width

    @property
    def unit_name(self) -> str:
        return self.unit if self.unit is not None else unit_of(self.metric)


class ModbusProfile(_ProfileModel):
    kind: str = ""
    description: str = ""
    word_order: WordOrder = "big"
    # Modbus TCP requests outstanding at once (a device known to queue them says more than 1).
    max_in_flight: int = Field(1, ge=1, le=16)
    points: tuple[ModbusPoint, ...]

    @model_validator(mode="after")
    def _unique(self) -> ModbusProfile:
        seen: set[str] = set()
        used: dict[tuple[str, int], str] = {}
        roles: set[str] = set()
        for point in self.points:
            if point.role is not None:
                if point.role in roles:
                    raise ValueError(f"role {point.role} given to two points")
                roles.add(point.role)
            if point.metric in seen:
                raise ValueError(f"metric {point.metric} mapped twice")
            seen.add(point.metric)
            for addr in range(point.address, point.end):
                other = used.setdefault((point.table, addr), point.metric)
                if other != point.metric:
                    raise ValueError(f"{point.metric} overlaps {other} at {point.table} address {addr}")
        return self

    def point(self, metric: str) -> ModbusPoint:
        for point in self.points:
            if point.metric == metric:
                return point
        raise KeyError(metric)

    def point_for_role(self, role: PointRole) -> ModbusPoint | None:
        return next((p for p in self.points if p.role == role), None)


@lru_cache(maxsize=64)
def _load_profile_file(path: Path, _stamp: tuple[int, int]) -> ModbusProfile:
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"Modbus profile {path}: {err}") from err
    device = data.get("device", {})
    try:
        return ModbusProfile.model_validate({**device, "points": data.get("points", [])})
    except ValidationError as err:
        raise ValueError(f"Modbus profile {path}: {err}") from err


def load_profile(name: str) -> ModbusProfile:
    """``generic-cdu`` -> the parsed, validated ``config/profiles/generic-cdu.toml``.

    Cached per file version (mtime, size): a reload after an edit reads the edited file."""
    path = profile_path(name).resolve()
    try:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (0, 0)
    return _load_profile_file(path, stamp)


# ------------------------------------------------------------------------------ encode / decode


def _decimals(scale: float) -> int | None:
    """Digits to round a scaled value to (0.1 -> 1), so 301 * 0.1 reads 30.1, not 30.099999."""
    if scale >= 1 and float(scale).is_integer():
        return 0
    digits = -math.floor(math.log10(abs(scale)))
    return digits if digits > 0 and math.isclose(scale * 10**digits, round(scale * 10**digits)) else None


def _order(words: list[int], word_order: WordOrder) -> list[int]:
    return words if word_order == "big" else words[::-1]


def encode_value(point: ModbusPoint, value: float, word_order: WordOrder = "big") -> list[int]:
    """Engineering value -> register words (or one 0/1 for a bit). ValueError if it does not fit."""
    if point.type == "bool":
        return [1 if value else 0]
    raw = value / point.scale
    if point.type == "float32":
        (word,) = struct.unpack(">I", struct.pack(">f", raw))
        return _order([word >> 16, word & 0xFFFF], word_order)
    if not math.isfinite(raw):
        raise ValueError(f"{point.metric}: {value} cannot be encoded")
    integer = round(raw)
    lo, hi = _INT_RANGE[point.type]
    if not lo <= integer <= hi:
        raise ValueError(f"{point.metric}: {value} does not fit {point.type} at scale {point.scale}")
    if point.width == 1:
        return [integer & 0xFFFF]
    word = integer & 0xFFFFFFFF
    return _order([word >> 16, word & 0xFFFF], word_order)


def decode_value(point: ModbusPoint, words: list[int], word_order: WordOrder = "big") -> float:
    """Register words (big-endian 16-bit each, as on the wire) -> engineering value."""
    if len(words) != point.width:
        raise ValueError(f"{point.metric}: needs {point.width} registers, got {len(words)}")
    if point.type == "bool":
        return 1.0 if words[0] else 0.0
    if point.width == 2:
        hi, lo = _order(list(words), word_order)
        word = (hi << 16) | lo
        if point.type == "float32":
            (raw_f,) = struct.unpack(">f", struct.pack(">I", word))
            return float(raw_f) * point.scale
        raw = word - (1 << 32) if point.type == "int32" and word & 0x80000000 else word
    else:
        raw = words[0] - (1 << 16) if point.type == "int16" and words[0] & 0x8000 else words[0]
    value = raw * point.scale
    digits = _decimals(point.scale)
    return round(value, digits) if digits is not None else value


Decoder = Callable[[list[int], int], float]  # (a block's words, the point's offset) -> value
_F32 = struct.Struct(">f")
_U32 = struct.Struct(">I")


def decoder(point: ModbusPoint, word_order: WordOrder = "big") -> Decoder:
    """``decode_value`` for one point, its type, scale and word order decided once: the poll's
    hot loop calls this per register point (``test_decoder_is_decode_value`` holds them equal)."""
    scale, kind = point.scale, point.type
    digits = _decimals(scale)
    if kind == "bool":
        return lambda w, o: 1.0 if w[o] else 0.0
    if point.width == 2:
        hi, lo = (0, 1) if word_order == "big" else (1, 0)
        if kind == "float32":
            unpack, pack = _F32.unpack, _U32.pack
            return lambda w, o: float(unpack(pack((w[o + hi] << 16) | w[o + lo]))[0]) * scale
        signed32 = kind == "int32"

        def decode32(w: list[int], o: int) -> float:
            word = (w[o + hi] << 16) | w[o + lo]
            value = (word - (1 << 32) if signed32 and word & 0x80000000 else word) * scale
            return round(value, digits) if digits is not None else value

        return decode32
    signed16 = kind == "int16"
    if scale == 1.0 and not signed16:
        return lambda w, o: float(w[o])

    def decode16(w: list[int], o: int) -> float:
        raw = w[o]
        value = (raw - (1 << 16) if signed16 and raw & 0x8000 else raw) * scale
        return round(value, digits) if digits is not None else value

    return decode16


@dataclass(frozen=True, slots=True)
class _Decode:
    """A point as the poll's hot loop wants it: everything looked up once."""

    point: ModbusPoint
    metric: str
    unit: str
    offset: int
    decode: Decoder
    low: float
    high: float


def _decode_plan(block: ReadBlock, word_order: WordOrder) -> tuple[_Decode, ...]:
    out = []
    for p in block.points:
        low, high = p.valid_range or (-math.inf, math.inf)
        out.append(
            _Decode(p, p.metric, p.unit_name, p.address - block.address, decoder(p, word_order), low, high)
        )
    return tuple(out)


# Modbus TCP polls (``ModbusDriver._poll_tcp``): a block's answer is read straight into one raw
# value per point (``unpack_block``), then scaled per point (``_Scale``). With the big-endian
# word order every profile here uses, one ``struct`` format reads a whole block in C (int16 "h",
# uint16 "H", int32 "i", uint32 "I", float32 "f"); the property test
# ``test_block_unpack_is_decode_value`` holds the pair equal to ``decode_value`` bit for bit.
_CODE: dict[str, str] = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f"}


class _Scale(NamedTuple):
    """A point as the TCP poll's hot loop scales it: value = raw * scale, rounded to digits."""

    metric: str
    unit: str
    scale: float
    digits: int | None  # None: not rounded (float32, bits, and integer scales, exact already)
    low: float
    high: float
    point: ModbusPoint


def _scales(block: ReadBlock) -> tuple[_Scale, ...]:
    out = []
    for p in block.points:
        low, high = p.valid_range or (-math.inf, math.inf)
        if p.type == "bool":
            scale, digits = 1.0, None  # decode_value: 1.0 or 0.0, whatever the scale
        elif p.type == "float32":
            scale, digits = p.scale, None
        else:
            scale, digits = p.scale, _decimals(p.scale)
            if digits == 0:
                digits = None  # an integer times an integral scale: round(x, 0) would give x back
        out.append(_Scale(p.metric, p.unit_name, scale, digits, low, high, p))
    return tuple(out)


class _Flat(NamedTuple):
    """A device's points in poll order, for the all-good poll built in C: value = raw * mult /
    div. ``round(raw * scale, d)`` of an integer raw is ``raw * m / 10**d`` correctly rounded
    when ``scale`` is exactly ``m / 10**d`` (the decimal it rounds to is that quotient, and true
    division of integers rounds correctly), so a scale of 0.1 reads ``raw / 10``; an unrounded
    point divides by 1 (exact)."""

    metrics: tuple[str, ...]
    units: tuple[str, ...]
    mults: tuple[float | int, ...]
    divs: tuple[int, ...]
    lows: tuple[float, ...]
    highs: tuple[float, ...]


def _flat(scales: list[tuple[_Scale, ...]]) -> _Flat | None:
    """The all-good plan, or None if a point's scale is not exactly m / 10**d (then every poll
    goes point by point)."""
    points = [sc for block in scales for sc in block]
    mults: list[float | int] = []
    divs: list[int] = []
    for sc in points:
        if sc.digits is None:
            mults.append(sc.scale)
            divs.append(1)
            continue
        div = 10**sc.digits
        mult = round(sc.scale * div)
        if mult / div != sc.scale:
            return None
        mults.append(mult)
        divs.append(div)
    return _Flat(
        tuple(sc.metric for sc in points),
        tuple(sc.unit for sc in points),
        tuple(mults),
        tuple(divs),
        tuple(sc.low for sc in points),
        tuple(sc.high for sc in points),
    )


# Constant columns of the readings the all-good poll builds (repeat: stateless, so shared).
_TUPLES = repeat(tuple)
_READING = repeat(Reading)
_GOOD = repeat(Quality.GOOD)
_NO_ERROR = repeat(None)


def unpack_block(block: ReadBlock, word_order: WordOrder = "big") -> Unpack:
    """(received bytes, offset of the block's data) -> one raw value per point of ``block``: the
    integer (signed as its type says) or float32 before scaling, 0 or 1 for a bit."""
    offsets = [p.address - block.address for p in block.points]
    if block.table in BIT_TABLES:
        size = (block.count + 7) // 8

        def bits(data: bytes, at: int) -> tuple[int, ...]:
            word = int.from_bytes(data[at : at + size], "little")
            return tuple([word >> o & 1 for o in offsets])

        return bits
    if word_order == "big" or all(p.width == 1 for p in block.points):
        fmt, end = ">", 0
        for p, o in zip(block.points, offsets, strict=True):
            fmt += "xx" * (o - end) + _CODE[p.type]  # (plan_reads leaves no gap; a map might)
            end = o + p.width
        return struct.Struct(fmt).unpack_from
    # Little word order (low word first) for 32-bit values: registers, then each point's words.
    words_of = struct.Struct(f">{block.count}H").unpack_from
    raws = [_raw_little(p, o) for p, o in zip(block.points, offsets, strict=True)]

    def little(data: bytes, at: int) -> tuple[Any, ...]:
        words = words_of(data, at)
        return tuple([raw(words) for raw in raws])

    return little


def _raw_little(point: ModbusPoint, o: int) -> Callable[[tuple[int, ...]], Any]:
    kind = point.type
    if kind == "uint16":
        return lambda w: w[o]
    if kind == "int16":
        return lambda w: w[o] - 0x10000 if w[o] & 0x8000 else w[o]
    if kind == "uint32":
        return lambda w: w[o + 1] << 16 | w[o]
    if kind == "int32":
        return lambda w: (w[o + 1] << 16 | w[o]) - (1 << 32) if w[o + 1] & 0x8000 else w[o + 1] << 16 | w[o]
    return lambda w: _F32.unpack(_U32.pack(w[o + 1] << 16 | w[o]))[0]


# ---------------------------------------------------------------------------------- coalescing


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One read request: ``count`` registers (or bits) of ``table`` from ``address``."""

    table: Table
    address: int
    count: int
    points: tuple[ModbusPoint, ...]


def plan_reads(points: Iterable[ModbusPoint], max_registers: int) -> list[ReadBlock]:
    """Coalesce points into as few reads as possible without reading an unmapped address.

    Only exactly adjacent points share a read: a gap may be a reserved address the device answers
    with exception 2 (which would fail the whole block). Register reads hold at most
    ``max_registers``; bit reads carry as many bytes (``16 * max_registers`` bits, at most 2000).
    """
    blocks: list[ReadBlock] = []
    by_table: dict[str, list[ModbusPoint]] = {}
    for point in points:
        by_table.setdefault(point.table, []).append(point)
    for table in ("coil", "discrete", "holding", "input"):
        members = sorted(by_table.get(table, []), key=lambda p: p.address)
        limit = min(MAX_BITS_PER_READ, 16 * max_registers) if table in BIT_TABLES else max_registers
        current: list[ModbusPoint] = []
        for point in members:
            if point.width > limit:
                raise ValueError(f"{point.metric} is wider than max_registers_per_read={limit}")
            if current and point.address == current[-1].end and point.end - current[0].address <= limit:
                current.append(point)
                continue
            if current:
                blocks.append(_block(current))
            current = [point]
        if current:
            blocks.append(_block(current))
    return blocks


def _block(points: list[ModbusPoint]) -> ReadBlock:
    first = points[0]
    return ReadBlock(first.table, first.address, points[-1].end - first.address, tuple(points))


# ------------------------------------------------------------------------------- shared lines


@dataclass(eq=False)
class _Line:
    """One Modbus connection (a TCP socket, or a serial line shared by several units)."""

    key: str
    client: _Client
    loop: asyncio.AbstractEventLoop
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    settings: tuple[object, ...] = ()


# Serial path -> the line's one client and lock. An entry made in another (finished) event loop is
# replaced, not reused: its client and lock belong to that loop.
_RTU_LINES: dict[str, _Line] = {}


class RawPoint(NamedTuple):
    """What ``podctl poll`` shows a technician: the registers as read, and what they mean."""

    metric: str
    address: int
    raw: list[int]
    table: str
    value: float | None


# ---------------------------------------------------------------------------------- the driver


@register("modbus")
class ModbusDriver:
    """One Modbus unit (TCP device or one unit id on an RTU line), mapped by its profile."""

    def __init__(self, cfg: ModbusDevice) -> None:
        self.cfg = cfg
        self.device_id = cfg.id
        self.profile = load_profile(cfg.profile)
        self.word_order: WordOrder = cfg.word_order or self.profile.word_order
        self.blocks = plan_reads(self.profile.points, cfg.max_registers_per_read)
        self.max_in_flight = cfg.max_in_flight or self.profile.max_in_flight
        self._decode = [_decode_plan(b, self.word_order) for b in self.blocks]
        # Modbus TCP polls: every block in one exchange, its requests and decoding decided here.
        self._batched = cfg.transport == "tcp" and not cfg.pause_between_requests_s
        self._requests = [
            read_request(cfg.unit, FUNCTION_OF[b.table], b.address, b.count, unpack_block(b, self.word_order))
            for b in self.blocks
        ]
        self._scales = [_scales(b) for b in self.blocks]
        self._flat = _flat(self._scales)
        self._line: _Line | None = None
        self.requests_sent = 0

    # -- lifecycle

    async def open(self) -> None:
        if self._line is not None:
            return
        if self.cfg.transport == "tcp":
            assert self.cfg.host is not None  # guaranteed by ModbusDevice validation
            # Our own MBAP client (agent/drivers/modbus_tcp.py): per request, pymodbus cost
            # twice collectd's CPU. Timeouts and retries are ours (cfg), each try its own timeout.
            client = LeanModbusTcpClient(self.cfg.host, self.cfg.port)
            self._line = _Line(key=f"tcp:{self.cfg.host}:{self.cfg.port}", client=client, loop=_loop())
        else:
            self._line = self._shared_rtu_line()
        self._line.users += 1

    def _shared_rtu_line(self) -> _Line:
        assert self.cfg.serial is not None
        key = str(self.cfg.serial)
        settings = (self.cfg.baudrate, self.cfg.parity)
        line = _RTU_LINES.get(key)
        if line is not None and (line.loop is not _loop() or line.loop.is_closed()):
            line = None
        if line is None:
            client = AsyncModbusSerialClient(
                key,
                baudrate=self.cfg.baudrate,
                parity=self.cfg.parity,
                timeout=self.cfg.timeout_s,
                retries=0,
                reconnect_delay=0,
                name=f"rtu:{key}",
            )
            line = _Line(key=f"rtu:{key}", client=client, loop=_loop(), settings=settings)
            _RTU_LINES[key] = line
        elif line.settings != settings:
            raise ValueError(
                f"{self.cfg.id}: serial line {key} already open at {line.settings}, not {settings}"
            )
        return line

    async def close(self) -> None:
        line, self._line = self._line, None
        if line is None:
            return
        line.users -= 1
        if line.users <= 0:
            line.client.close()
            if _RTU_LINES.get(line.key.removeprefix("rtu:")) is line:
                del _RTU_LINES[line.key.removeprefix("rtu:")]

    # -- polling

    async def poll(self) -> list[Reading]:
        """Read every point of the profile. Partial failures (exception on one block) give ERROR
        readings for that block; no answer at all, or an exception on every block, raises."""
        if self._batched:
            return await self._poll_tcp()
        if self.cfg.reconnect_per_poll and self.cfg.transport == "tcp":
            await self._reconnect()
        now_mono, now_wall = time.monotonic(), time.time()
        readings: list[Reading] = []
        errors: list[DriverError] = []
        good = 0

        def failed(block: ReadBlock, err: DriverError) -> None:
            readings.extend(
                Reading(
                    device=self.device_id,
                    metric=p.metric,
                    value=None,
                    unit=p.unit_name,
                    ts_mono=now_mono,
                    ts_wall=now_wall,
                    quality=Quality.ERROR,
                    error=err.reason,
                )
                for p in block.points
            )

        device, new, good_q = self.device_id, tuple.__new__, Quality.GOOD
        append = readings.append
        for block, plan, words in zip(self.blocks, self._decode, await self._read_blocks(), strict=True):
            if isinstance(words, DriverError):
                errors.append(words)
                failed(block, words)
                continue
            good += 1
            for d in plan:
                value = d.decode(words, d.offset)
                # Finite (NaN and Inf are not) and in range: built in place, the common case.
                if value - value == 0.0 and d.low <= value <= d.high:
                    append(new(Reading, (device, d.metric, value, d.unit, now_mono, now_wall, good_q, None)))
                    continue
                append(
                    Reading(
                        device=device,
                        metric=d.metric,
                        value=None,
                        unit=d.unit,
                        ts_mono=now_mono,
                        ts_wall=now_wall,
                        quality=Quality.ERROR,
                        error=untrusted(value, d.point.valid_range) or "not a measurement",
                    )
                )
        if not good and errors:
            # Nothing answered: the device is down (unavailable) or refuses every read.
            raise next((e for e in errors if isinstance(e, DeviceUnavailable)), errors[0])
        return readings

    async def _read_blocks(self) -> list[list[int] | DriverError]:
        """Every block's words, or the error it got. After no answer at all (a timeout, a lost
        connection) the rest are not asked: each would cost a timeout and hold a shared line."""
        out: list[list[int] | DriverError] = []
        for block in self.blocks:
            try:
                out.append(await self._read_block(block))
            except DeviceUnavailable as err:
                out.extend([err] * (len(self.blocks) - len(out)))
                break
            except DeviceError as err:
                out.append(err)
        return out

    # -- Modbus TCP polls: every block in one exchange

    async def _poll_tcp(self) -> list[Reading]:
        """``poll`` over Modbus TCP: every block in one exchange, each answer read in place into
        raw values (one ``struct`` call a block). What the agent's CPU per register is made of
        at a pod's rate (a few units a second) is this work per poll, so the common case (every
        block answered, every value finite and in range) scales, checks and builds the readings
        in C (``map`` over the device's points, ``_Flat``); anything else goes point by point."""
        if self.cfg.reconnect_per_poll:
            await self._reconnect()
        now_mono, now_wall = time.monotonic(), time.time()
        answers, err = await self._exchange(self._requests)
        flat = self._flat
        if err is None and flat is not None and all(map(isinstance, answers, _TUPLES)):
            raws = chain.from_iterable(cast("list[tuple[Any, ...]]", answers))  # all tuples: checked
            values = list(map(truediv, map(mul, raws, flat.mults), flat.divs))
            if (
                all(map(isfinite, values))
                and all(map(le, flat.lows, values))
                and all(map(le, values, flat.highs))
            ):
                rows = zip(
                    repeat(self.device_id),
                    flat.metrics,
                    values,
                    flat.units,
                    repeat(now_mono),
                    repeat(now_wall),
                    _GOOD,
                    _NO_ERROR,
                )
                return list(map(tuple.__new__, _READING, rows))
        return self._readings_of(await self._read_tcp(answers, err), now_mono, now_wall)

    def _readings_of(
        self, results: list[tuple[Any, ...] | DriverError], now_mono: float, now_wall: float
    ) -> list[Reading]:
        """Readings from each block's raw values (or error), point by point."""
        readings: list[Reading] = []
        errors: list[DriverError] = []
        device, new, good_q = self.device_id, tuple.__new__, Quality.GOOD
        append = readings.append
        for scales, raws in zip(self._scales, results, strict=True):
            if type(raws) is not tuple:
                assert isinstance(raws, DriverError)
                errors.append(raws)
                for sc in scales:
                    append(
                        new(
                            Reading,
                            (
                                device,
                                sc.metric,
                                None,
                                sc.unit,
                                now_mono,
                                now_wall,
                                Quality.ERROR,
                                raws.reason,
                            ),
                        )
                    )
                continue
            for (metric, unit, scale, digits, low, high, point), raw in zip(scales, raws, strict=True):
                value = raw * scale if digits is None else round(raw * scale, digits)
                # Finite (NaN and Inf are not) and in range: built in place, the common case.
                if value - value == 0.0 and low <= value <= high:
                    append(new(Reading, (device, metric, value, unit, now_mono, now_wall, good_q, None)))
                    continue
                append(
                    Reading(
                        device=device,
                        metric=metric,
                        value=None,
                        unit=unit,
                        ts_mono=now_mono,
                        ts_wall=now_wall,
                        quality=Quality.ERROR,
                        error=untrusted(value, point.valid_range) or "not a measurement",
                    )
                )
        if errors and len(errors) == len(self.blocks):
            # Nothing answered: the device is down (unavailable) or refuses every read.
            raise next((e for e in errors if isinstance(e, DeviceUnavailable)), errors[0])
        return readings

    async def _read_tcp(
        self, answers: list[Got], err: Exception | None
    ) -> list[tuple[Any, ...] | DriverError]:
        """Every block's raw values, or the error it got, from the first try's ``answers``: each
        retry (one exchange) asks only what went unanswered, on a new connection; a try ends
        after ``timeout_s`` without an answer. A broken answer is not asked again."""
        requests = self._requests
        out: list[tuple[Any, ...] | DriverError | None] = [None] * len(requests)
        todo: Sequence[int] = range(len(requests))
        error: DriverError = DeviceUnavailable(self.device_id, "not asked")
        for attempt in range(1 + self.cfg.retries):
            if attempt:
                answers, err = await self._exchange([requests[i] for i in todo])
            for i, got in zip(todo, answers, strict=True):
                if got is not None:
                    out[i] = got if type(got) is tuple else self._values_of(i, got)
            todo = [i for i, got in enumerate(out) if got is None]
            if not todo:
                break
            error = self._error_of(err, self.blocks[todo[0]])
            if not isinstance(error, DeviceUnavailable):
                break  # a broken answer: asking again gets the same
        return [error if got is None else got for got in out]

    async def _exchange(self, requests: list[Request]) -> tuple[list[Got], Exception | None]:
        line = self._line
        if line is None:
            await self.open()
            line = self._line
            assert line is not None
        client = line.client
        assert isinstance(client, LeanModbusTcpClient)
        # acquire/release rather than ``async with``: no __aenter__/__aexit__ coroutines per poll.
        lock = line.lock
        await lock.acquire()
        try:
            connected = client.connected
            if not connected:  # a timeout only then: the common case arms no timer here
                try:
                    async with asyncio.timeout(self.cfg.timeout_s):
                        connected = await client.connect()
                except TimeoutError:
                    connected = False
            if not connected:
                return [None] * len(requests), ConnectionError(f"cannot connect ({line.key})")
            self.requests_sent += len(requests)
            return await client.exchange(requests, window=self.max_in_flight, timeout_s=self.cfg.timeout_s)
        finally:
            lock.release()

    def _values_of(self, i: int, answer: Got) -> tuple[Any, ...] | DriverError:
        """A block's raw values from an answer the client did not read in place: an exception or
        a short answer is the error it is; a full one (a bit read answered with spare bytes) is
        read as the client would have."""
        assert isinstance(answer, Answer)
        block = self.blocks[i]
        words = self._words(block, answer)
        if isinstance(words, DriverError):
            return words
        if block.table in BIT_TABLES:
            data = sum(1 << k for k, bit in enumerate(words) if bit).to_bytes(
                (block.count + 7) // 8, "little"
            )
        else:
            data = struct.pack(f">{block.count}H", *words)
        unpack = self._requests[i].unpack
        assert unpack is not None
        return unpack(data, 0)

    def _error_of(self, err: Exception | None, block: ReadBlock) -> DriverError:
        what = f"read {block.table} {block.address}+{block.count}"
        if isinstance(err, ModbusAnswerError):
            return DeviceError(self.device_id, f"{what}: {err}")
        if isinstance(err, TimeoutError):
            return DeviceUnavailable(self.device_id, f"timeout ({what})")
        return DeviceUnavailable(self.device_id, f"{what}: {err}")

    def _words(self, block: ReadBlock, response: _Answer) -> list[int] | DriverError:
        """A block's words from its answer, or the error it is (an exception, a short answer)."""
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            return DeviceError(
                self.device_id, f"modbus exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})"
            )
        if block.table in BIT_TABLES:
            words = [1 if b else 0 for b in list(response.bits)[: block.count]]
        else:
            words = list(response.registers)
        if len(words) != block.count:
            return DeviceError(
                self.device_id,
                f"short answer to {block.table} {block.address}+{block.count}: {len(words)} values",
            )
        return words

    async def poll_raw(self) -> list[RawPoint]:
        """Every point with its raw registers and scaled value (for ``podctl poll``)."""
        out: list[RawPoint] = []
        for block in self.blocks:
            words = await self._read_block(block)
            for point in block.points:
                off = point.address - block.address
                raw = words[off : off + point.width]
                out.append(
                    RawPoint(
                        point.metric,
                        point.address,
                        raw,
                        point.table,
                        decode_value(point, raw, self.word_order),
                    )
                )
        return out

    async def _read_block(self, block: ReadBlock) -> list[int]:
        dev = self.cfg.unit

        def call(client: _Client) -> Awaitable[_Answer]:
            if block.table == "holding":
                return client.read_holding_registers(block.address, count=block.count, device_id=dev)
            if block.table == "input":
                return client.read_input_registers(block.address, count=block.count, device_id=dev)
            if block.table == "coil":
                return client.read_coils(block.address, count=block.count, device_id=dev)
            return client.read_discrete_inputs(block.address, count=block.count, device_id=dev)

        response = await self._request(f"read {block.table} {block.address}+{block.count}", call)
        words = self._words(block, response)
        if isinstance(words, DriverError):
            raise words
        return words

    # -- actuation

    async def write_point(self, metric: str, value: float) -> float:
        """Write a writable point (a setpoint, an outlet coil) and return the value read back.

        Range and writability are checked against the profile before any I/O (ValueError).
        """
        try:
            point = self.profile.point(metric)
        except KeyError:
            raise ValueError(f"{self.device_id}: no point {metric!r} in profile {self.cfg.profile}") from None
        if not point.writable:
            raise ValueError(f"{self.device_id}: {metric} is not writable")
        if not math.isfinite(value):
            raise ValueError(f"{self.device_id}: {metric} = {value} is not a number")
        if point.type == "bool" and value not in (0, 1):
            raise ValueError(f"{self.device_id}: {metric} takes 0 or 1, not {value}")
        if point.min is not None and value < point.min:
            raise ValueError(f"{self.device_id}: {metric} = {value} below {point.min}")
        if point.max is not None and value > point.max:
            raise ValueError(f"{self.device_id}: {metric} = {value} above {point.max}")
        words = encode_value(point, value, self.word_order)
        dev = self.cfg.unit

        def call(client: _Client) -> Awaitable[_Answer]:
            if point.table == "coil":
                return client.write_coil(point.address, bool(words[0]), device_id=dev)
            if len(words) == 1:
                return client.write_register(point.address, words[0], device_id=dev)
            return client.write_registers(point.address, words, device_id=dev)

        await self._request(f"write {metric}", call)
        log.info("modbus write", device=self.device_id, metric=metric, value=value)
        block = ReadBlock(point.table, point.address, point.width, (point,))
        readback = await self._read_block(block)
        return decode_value(point, readback, self.word_order)

    # -- one request on the line

    async def _request(self, what: str, call: Callable[[_Client], Awaitable[_Answer]]) -> _Answer:
        """One request, retried ``cfg.retries`` times on no answer (each try with its own timeout;
        the line's lock is released between tries so the other units of an RTU line go first)."""
        attempts = 1 + self.cfg.retries
        for attempt in range(attempts):
            try:
                return await self._request_once(what, call)
            except DeviceUnavailable:
                if attempt + 1 >= attempts:
                    raise
        raise AssertionError("unreachable")

    async def _request_once(self, what: str, call: Callable[[_Client], Awaitable[_Answer]]) -> _Answer:
        line = self._line
        if line is None:
            await self.open()
            line = self._line
            assert line is not None
        # The lock is taken before the timeout starts: waiting for the bus is not the device's fault.
        async with line.lock:
            try:
                async with asyncio.timeout(self.cfg.timeout_s):
                    if not line.client.connected and not await line.client.connect():
                        raise DeviceUnavailable(self.device_id, f"cannot connect ({line.key})")
                    self.requests_sent += 1
                    response = await call(line.client)
            except TimeoutError:
                raise DeviceUnavailable(self.device_id, f"timeout ({what})") from None
            except (ConnectionException, ModbusIOException, OSError) as err:
                raise DeviceUnavailable(self.device_id, f"{what}: {err}") from err
            except (ModbusException, ModbusAnswerError) as err:
                raise DeviceError(self.device_id, f"{what}: {err}") from err
            finally:
                # Quirk of some units (slow RTU gateways): a quiet time after each answer.
                if self.cfg.pause_between_requests_s:
                    await asyncio.sleep(self.cfg.pause_between_requests_s)
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            raise DeviceError(
                self.device_id, f"modbus exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})"
            )
        return response

    async def _reconnect(self) -> None:
        line = self._line
        if line is None:
            return
        async with line.lock:
            line.client.close()


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


__all__ = [
    "EXCEPTION_NAMES",
    "ModbusDriver",
    "ModbusPoint",
    "ModbusProfile",
    "RawPoint",
    "ReadBlock",
    "decode_value",
    "encode_value",
    "load_profile",
    "plan_reads",
]
