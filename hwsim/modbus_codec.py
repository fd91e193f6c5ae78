"""hwsim's own Modbus value encoding: engineering value -> register words, the way devices do it.

Deliberately not the agent's codec (``agent.drivers.modbus.encode_value``): a simulator that
encodes with the code under test cannot serve what that code gets wrong. This one serves what
real units put on the wire, including what the agent must refuse:
- NaN and +/-Inf in float32 registers (IEEE-754 as is: meters use NaN for "sensor absent");
- NaN in an integer register as the type's "no value" sentinel (0x8000 int16, 0xFFFF uint16,
  0x8000_0000 int32, 0xFFFF_FFFF uint32: SunSpec's "not implemented" values), +/-Inf saturated;
- a number past what the register holds saturated, as meters do;
- ``garbage``: 0xDEAD in every register of the point (a unit serving uninitialised memory).
"""

from __future__ import annotations

import math
import struct
from typing import Literal

WordOrder = Literal["big", "little"]
GARBAGE = "garbage"
GARBAGE_WORD = 0xDEAD

_INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
}
_NO_VALUE: dict[str, int] = {"int16": 0x8000, "uint16": 0xFFFF, "int32": 0x8000_0000, "uint32": 0xFFFF_FFFF}
_WIDTH: dict[str, int] = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "bool": 1}


def width(data_type: str) -> int:
    return _WIDTH[data_type]


def _words(word: int, n: int, word_order: WordOrder) -> list[int]:
    if n == 1:
        return [word & 0xFFFF]
    words = [(word >> 16) & 0xFFFF, word & 0xFFFF]
    return words if word_order == "big" else words[::-1]


def encode(data_type: str, scale: float, value: float | str, word_order: WordOrder = "big") -> list[int]:
    """Register words (or one 0/1 bit) for ``value`` in engineering units (``"garbage"`` too)."""
    n = _WIDTH[data_type]
    if value == GARBAGE:
        return [GARBAGE_WORD & 1] if data_type == "bool" else [GARBAGE_WORD] * n
    assert isinstance(value, float | int)
    if data_type == "bool":
        return [1 if value and not math.isnan(value) else 0]
    raw = float(value) / scale
    if data_type == "float32":
        if math.isfinite(raw) and abs(raw) > 3.4028234e38:
            raw = math.copysign(math.inf, raw)  # past float32: what a meter's conversion yields
        (word,) = struct.unpack(">I", struct.pack(">f", raw))
        return _words(word, n, word_order)
    lo, hi = _INT_RANGE[data_type]
    if math.isnan(raw):
        return _words(_NO_VALUE[data_type], n, word_order)
    integer = hi if raw == math.inf else lo if raw == -math.inf else min(max(round(raw), lo), hi)
    return _words(integer & (0xFFFF if n == 1 else 0xFFFF_FFFF), n, word_order)


def decode(data_type: str, scale: float, words: list[int], word_order: WordOrder = "big") -> float:
    """What a master wrote (FC6/16/5) in engineering units."""
    if data_type == "bool":
        return 1.0 if words[0] else 0.0
    if _WIDTH[data_type] == 2:
        hi, lo = words if word_order == "big" else words[::-1]
        word = (hi << 16) | lo
        if data_type == "float32":
            return float(struct.unpack(">f", struct.pack(">I", word))[0]) * scale
        raw = word - (1 << 32) if data_type == "int32" and word & 0x8000_0000 else word
    else:
        raw = words[0] - (1 << 16) if data_type == "int16" and words[0] & 0x8000 else words[0]
    value = raw * scale
    return round(value, 6)


def parse_bad_value(text: object) -> float | str:
    """A bad-value fault's ``--value``: nan, inf, -inf, garbage, or a number."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    if isinstance(text, str):
        word = text.strip().lower()
        if word == GARBAGE:
            return GARBAGE
        try:
            return float(word)  # "nan", "inf", "-inf" and numbers
        except ValueError:
            pass
    raise ValueError(f"bad-value needs --value nan, inf, -inf, garbage or a number (got {text!r})")


__all__ = ["GARBAGE", "decode", "encode", "parse_bad_value", "width"]
