"""Grid outage ride-through and re-energisation: pure helpers around ``control_step``.

During an outage the battery carries the site alone: the pod's IT budget becomes what the battery
can deliver for the configured hold time (its live discharge limit, and its energy above the SoC
floor spread over ``hold_s``) minus the cooling load; the grid limit handed to ``control_step`` is 0,
so the ramped grid target sits at 0. On return the grid limit is back and the target climbs at the
ramp limit from 0 (``control_step``'s ramp), the battery covering the rest; GPU caps are released
server by server (``stagger``), never as one step.
"""

from __future__ import annotations

from collections.abc import Mapping


def outage_pod_budget_w(
    discharge_avail_w: float,
    energy_above_min_wh: float,
    hold_s: float,
    aux_w: float,
    margin_w: float = 0.0,
) -> float:
    """The pod IT power the battery can carry for ``hold_s`` (never below 0)."""
    by_energy = energy_above_min_wh * 3600.0 / hold_s if hold_s > 0 else discharge_avail_w
    return max(0.0, min(discharge_avail_w, by_energy) - aux_w - margin_w)


def stagger(
    caps: Mapping[str, float],
    held: Mapping[str, float],
    server_of: Mapping[str, int],
    since_return_s: float,
    stagger_s: float,
) -> dict[str, float]:
    """Caps during re-energisation: server k (in server order) keeps its outage cap (``held``)
    until ``k * stagger_s`` after the grid came back; then it takes the planned cap (``caps``;
    a GPU without one is uncapped and so absent). Lower planned caps always apply at once."""
    order = sorted(set(server_of.values()))
    turn = {server: k for k, server in enumerate(order)}
    out: dict[str, float] = {}
    for gpu in set(caps) | set(held):
        planned = caps.get(gpu)
        hold = held.get(gpu)
        server = server_of.get(gpu)
        released = server is None or since_return_s >= turn[server] * stagger_s
        if hold is None or released:
            if planned is not None:
                out[gpu] = planned
        else:
            out[gpu] = hold if planned is None else min(hold, planned)
    return out
