"""Which batches the engine must evaluate at once, and which may wait to be coalesced.

A batch may wait (up to ``coalesce_s``, to be evaluated with the batches after it) only if no
evaluation of it could trip or clear anything, start or stop a timer, or change a cap: every
interlock input in it is a good, finite reading, at least ``coalesce_margin_pct`` away from the
trip threshold of every rule it feeds, and its device has no interlock tripped or timing (a
sustain, a clear hold, a ladder rung). Anything else is urgent: a value near or past a threshold,
a missing, bad or non-finite one (a stale transition), a non-zero leak, fault or alarm word, any
reading of a busy device. Pure: the answer depends on its arguments alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from agent.interlocks.config import InterlockConfig
from agent.interlocks.types import Topology
from agent.model import Quality, Reading

# Inputs that feed no trip of their own: a GPU's draw is read only when its PDU trips (urgent).
_NEVER_TRIP = frozenset({"power_w", "power_instant_w"})
# Inputs that raise something whenever they read non-zero.
_NONZERO_TRIPS = frozenset({"pump_fault", "leak", "tripped", "alarms"})
_PHASES = frozenset({"phase1_current_a", "phase2_current_a", "phase3_current_a"})


def far_from_thresholds(reading: Reading, config: InterlockConfig, topology: Topology) -> bool:
    """True if ``reading`` (an interlock input) is good, finite and far from every trip threshold."""
    v = reading.value
    if reading.quality is not Quality.GOOD or v is None or not math.isfinite(v):
        return False
    metric = reading.metric
    if metric in _NEVER_TRIP:
        return True
    if metric in _NONZERO_TRIPS:
        return v == 0
    keep = 1.0 - config.coalesce_margin_pct / 100.0  # "far": under (1 - margin) x the threshold
    if metric == "temp_c":
        # gpu_overtemp trips at trip_c; gpu_runaway never under min_temp_c, whatever the rate.
        return v < keep * min(config.gpu_overtemp.trip_c, config.gpu_runaway.min_temp_c)
    if metric == "supply_temp_c":
        return v < keep * min(config.coolant_supply_high.trip_c, config.coolant_escalation.critical_c)
    if metric == "flow_lpm":
        low = topology.min_flow_lpm.get(reading.device, config.coolant_flow_low.min_flow_lpm)
        return v * keep > low
    if metric in _PHASES:
        oc = config.pdu_phase_overcurrent
        rating = topology.pdu_rating_a.get(reading.device, oc.default_rating_a or 0.0)
        if not rating:
            return True  # no rating: the rule does not run on this PDU
        return 100.0 * v / rating < keep * oc.trip_pct
    return False  # an input this module does not know: evaluate it at once


def must_evaluate_now(
    batch: Iterable[Reading],
    inputs: frozenset[str],
    config: InterlockConfig,
    topology: Topology,
    busy: Callable[[str], bool],
) -> bool:
    """True if any interlock input in ``batch`` is urgent (see the module's docstring)."""
    if config.coalesce_s <= 0:
        return True
    checked: set[str] = set()
    for r in batch:
        if r.metric not in inputs:
            continue
        if r.device not in checked:
            if busy(r.device):
                return True
            checked.add(r.device)
        if not far_from_thresholds(r, config, topology):
            return True
    return False
