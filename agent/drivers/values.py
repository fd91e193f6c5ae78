"""Values that cannot be trusted are not values: the one check every driver calls on a decoded
number before it becomes a GOOD reading.

NaN is what many Modbus meters put in a float32 register for "sensor absent"; Inf comes from a
broken conversion; a reading outside the point's physical range (a profile's ``valid_range``:
0x7FFF in an int16 temperature register reads 3276.7 C) is a wrong map or a dead probe. Every
comparison with NaN is False, so an interlock fed one could never trip: each becomes an ERROR
reading (value None) with the reason, which the interlocks treat as a missing input.
"""

from __future__ import annotations

import math
from math import isfinite

ValidRange = tuple[float, float]


def untrusted(value: float, valid_range: ValidRange | None = None) -> str | None:
    """Why ``value`` cannot be used (the reading's error text), or None when it can."""
    if not math.isfinite(value):
        if math.isnan(value):
            return "NaN (the device reports no value)"
        return f"{'+' if value > 0 else '-'}Inf (not a measurement)"
    if valid_range is not None and not valid_range[0] <= value <= valid_range[1]:
        return f"{value:g} is outside the physical range [{valid_range[0]:g}, {valid_range[1]:g}]"
    return None


__all__ = ["ValidRange", "isfinite", "untrusted"]
