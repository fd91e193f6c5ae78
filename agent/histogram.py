"""A cumulative histogram (Prometheus' kind: fixed buckets, counts and sum since start).

Poll and interlock-evaluation durations are observed here, so /metrics can export a real
histogram (``_bucket``/``_sum``/``_count``) that Prometheus aggregates across devices and time with
``histogram_quantile``; quantiles of a recent window cannot be aggregated.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

POLL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EVALUATION_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Histogram:
    """Counts per bucket (not cumulative inside; cumulated when read), their sum and count."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """[(upper bound, observations <= bound)], ending with (inf, count)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
