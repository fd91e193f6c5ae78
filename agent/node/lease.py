"""Cap leases on the node: what the controller allows each GPU, and what happens without it.

Pure (the caller passes the time). Three modes:
- ``hold``: since start, no valid request yet. Each GPU keeps the limit it had when the node
  started (a restarted node never jumps back to the default limit), until the controller's first
  decision or ``controller_lost_after_s``.
- ``controller``: a valid request within ``controller_lost_after_s``: the lease's caps apply (a GPU
  the lease does not name has no controller cap). An expired lease never raises a cap on its own:
  its caps stay until a newer lease or the fail-safe. A request with no lease (``caps`` null: a
  controller that has not decided yet, right after its start) keeps the caps in force as they are.
- ``failsafe``: nothing valid for ``controller_lost_after_s``: each GPU gets the lower of its
  fail-safe cap and its last lease (or held) cap. Any valid request ends it.
Leases are versioned per controller instance (``lease_id``): an older version arriving after a
newer one (polls and caps use two connections) renews the lease but never replaces its caps.
The node's own interlocks combine with these in the engine: the lowest cap wins, and a rising
cap follows the engine's ramp (so the controller's return releases in steps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["hold", "controller", "failsafe"]


@dataclass
class Transition:
    mode: Mode
    previous: Mode
    silent_for_s: float


@dataclass
class LeaseState:
    lost_after_s: float
    started: float
    held: dict[str, float] = field(default_factory=dict)  # GPU -> limit at start
    caps: dict[str, float] = field(default_factory=dict)  # GPU -> the last lease's cap
    expires_wall: float | None = None
    last_valid: float | None = None
    mode: Mode = "hold"
    failsafe_entered: int = 0
    lease_id: tuple[str, int] | None = None  # (controller instance, version) of the caps in force
    stale_leases: int = 0  # older versions that arrived after a newer one (renewed, not applied)
    _enforced: dict[str, float] = field(default_factory=dict)  # the last external caps handed out
    _back: Transition | None = None  # the fail-safe ended by a request, reported by update()

    def accept(
        self,
        caps: Mapping[str, float] | None,
        *,
        expires_wall: float,
        now: float,
        lease_id: tuple[str, int] | None = None,
    ) -> None:
        """A valid request: its lease replaces the previous one. ``None`` (a controller that has
        not decided yet) only says it is alive: the caps in force stay (held ones included)."""
        held = self.lease_id
        if lease_id is not None and held is not None and lease_id[0] == held[0] and lease_id[1] < held[1]:
            self.stale_leases += 1  # an older lease overtaken by a newer one: renew only
        elif caps is None:
            # Keep what is enforced now: held limits, or the fail-safe merged with the last lease.
            if self.last_valid is None:
                self.caps = dict(self.held)
            elif self.mode == "failsafe":
                self.caps = dict(self._enforced)
        else:
            self.caps = dict(caps)
            self.held = {}
        if lease_id is not None and (held is None or lease_id[0] != held[0] or lease_id[1] >= held[1]):
            self.lease_id = lease_id
        self.expires_wall = expires_wall
        self.last_valid = now
        if self.mode == "failsafe":
            # The fail-safe ends with this request, not at the next update(): a second request
            # before then must not take the fail-safe caps for the controller's lease again.
            self._back = Transition(mode="controller", previous="failsafe", silent_for_s=0.0)
            self.mode = "controller"

    def silent_for(self, now: float) -> float:
        return now - (self.last_valid if self.last_valid is not None else self.started)

    def update(self, now: float) -> Transition | None:
        """The mode now; a Transition when it changed (worth one event)."""
        back, self._back = self._back, None
        previous = self.mode
        if self.silent_for(now) >= self.lost_after_s:
            mode: Mode = "failsafe"
        elif self.last_valid is None:
            mode = "hold"
        else:
            mode = "controller"
        if mode == previous:
            return back
        self.mode = mode
        if mode == "failsafe":
            self.failsafe_entered += 1
        return Transition(mode=mode, previous=previous, silent_for_s=self.silent_for(now))

    def external_caps(self, failsafe_w: Mapping[str, float]) -> dict[str, tuple[float, str]]:
        """GPU -> (cap W, why) for the engine, in the current mode."""
        base: dict[str, tuple[float, str]] = {}
        if self.last_valid is None:
            base = {g: (w, "hold") for g, w in self.held.items()}
        else:
            base = {g: (w, "controller") for g, w in self.caps.items()}
        out = dict(base)
        if self.mode == "failsafe":
            for gpu, w in failsafe_w.items():
                if gpu not in out or w < out[gpu][0]:
                    out[gpu] = (w, "failsafe")
        self._enforced = {g: w for g, (w, _) in out.items()}
        return out


__all__ = ["LeaseState", "Mode", "Transition"]
