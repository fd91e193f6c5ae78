"""A grid-import series measured against the utility's contract: pure functions, no I/O, no clock.

Terms (``[power.grid_contract]``, docs/power.md):
- import limit: the import never above ``import_limit_w``;
- ramp up / ramp down: on each horizon (0.1 s and 1 s by default) the change between the means of
  consecutive blocks of that length, per second, within ``ramp_up_w_per_s`` / ``ramp_down_w_per_s``;
- dynamic range: max - min of the import within any trailing ``dynamic_range_window_s``;
- spectral share: of the swing's energy (the series minus its linear trend, Hann-windowed), the
  share inside [band_lo_hz, band_hi_hz] (arXiv 2508.14318: e.g. <= 20% in 0.1-20 Hz). A series
  sampled at ``rate_hz`` sees only up to rate/2: the band measured is clipped there and reported.
The term with the highest measured / limit binds. Everything is pure Python (a radix-2 FFT; the
agent does not depend on numpy): 1200 samples (120 s at 10 Hz) cost a few ms.
"""

from __future__ import annotations

import cmath
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from agent.power.config import GridContract


def _fft(x: list[complex]) -> list[complex]:
    """In-place iterative radix-2 FFT; len(x) must be a power of two."""
    n = len(x)
    j = 0
    for i in range(1, n):
        bit = n >> 1
        while j & bit:
            j ^= bit
            bit >>= 1
        j |= bit
        if i < j:
            x[i], x[j] = x[j], x[i]
    size = 2
    while size <= n:
        w_step = cmath.exp(-2j * math.pi / size)
        half = size // 2
        twiddles = [w_step**k for k in range(half)]
        for start in range(0, n, size):
            for k in range(half):
                a = x[start + k]
                b = x[start + k + half] * twiddles[k]
                x[start + k] = a + b
                x[start + k + half] = a - b
        size *= 2
    return x


def power_spectrum(series: Sequence[float], rate_hz: float) -> tuple[list[float], list[float]]:
    """(frequencies Hz, power) of the detrended, Hann-windowed series, zero-padded to a power of 2;
    DC excluded, up to Nyquist."""
    n = len(series)
    if n < 4:
        return [], []
    # Least-squares linear trend: the slow drift is not a swing.
    mean_t = (n - 1) / 2
    mean_x = sum(series) / n
    sxx = sum((i - mean_t) ** 2 for i in range(n))
    slope = sum((i - mean_t) * (v - mean_x) for i, v in enumerate(series)) / sxx
    size = 1 << (n - 1).bit_length()
    buf: list[complex] = [0j] * size
    for i, v in enumerate(series):
        hann = 0.5 - 0.5 * math.cos(2 * math.pi * i / (n - 1))
        buf[i] = complex((v - mean_x - slope * (i - mean_t)) * hann)
    spec = _fft(buf)
    freqs, power = [], []
    for k in range(1, size // 2 + 1):
        freqs.append(k * rate_hz / size)
        power.append(abs(spec[k]) ** 2)
    return freqs, power


def band_share(
    series: Sequence[float], rate_hz: float, lo_hz: float, hi_hz: float
) -> tuple[float | None, float]:
    """(share of the swing's spectral energy in [lo, min(hi, Nyquist)], the upper edge used).
    None when the series is too short to say; 0.0 for a series with no swing at all."""
    hi_used = min(hi_hz, rate_hz / 2)
    freqs, power = power_spectrum(series, rate_hz)
    if not freqs or hi_used <= lo_hz:
        return None, hi_used
    total = sum(power)
    mean = sum(series) / len(series)
    if total <= 1e-12 * max(1.0, mean * mean) * len(series) ** 2:
        return 0.0, hi_used
    inside = sum(p for f, p in zip(freqs, power, strict=True) if lo_hz <= f <= hi_used)
    return inside / total, hi_used


@dataclass(frozen=True, slots=True)
class RampFigure:
    horizon_s: float  # the block length the ramp was measured on (at least one sample)
    up_w_per_s: float  # the largest rise
    down_w_per_s: float  # the largest fall (positive number)
    up_outside_s: float  # time in blocks whose rise broke ramp_up (0 without a limit)
    down_outside_s: float


def ramp(
    series: Sequence[float],
    rate_hz: float,
    horizon_s: float,
    up_limit: float | None = None,
    down_limit: float | None = None,
) -> RampFigure:
    """Largest rise and fall between the means of consecutive blocks of ``horizon_s``."""
    block = max(1, round(horizon_s * rate_hz))
    h = block / rate_hz
    means = [sum(series[i : i + block]) / block for i in range(0, len(series) - block + 1, block)]
    up = down = up_out = down_out = 0.0
    for a, b in itertools.pairwise(means):
        r = (b - a) / h
        up, down = max(up, r), max(down, -r)
        if up_limit is not None and r > up_limit:
            up_out += h
        if down_limit is not None and -r > down_limit:
            down_out += h
    return RampFigure(h, up, down, up_out, down_out)


def dynamic_range(
    series: Sequence[float], rate_hz: float, window_s: float, limit: float | None = None
) -> tuple[float, float]:
    """(largest max - min within any trailing window, time whose trailing window broke ``limit``).
    Monotonic deques: O(n)."""
    width = max(1, round(window_s * rate_hz))
    hi: deque[int] = deque()
    lo: deque[int] = deque()
    worst = outside = 0.0
    for i, v in enumerate(series):
        while hi and series[hi[-1]] <= v:
            hi.pop()
        hi.append(i)
        while lo and series[lo[-1]] >= v:
            lo.pop()
        lo.append(i)
        while hi[0] <= i - width:
            hi.popleft()
        while lo[0] <= i - width:
            lo.popleft()
        span = series[hi[0]] - series[lo[0]]
        worst = max(worst, span)
        if limit is not None and span > limit:
            outside += 1.0 / rate_hz
    return worst, outside


@dataclass(frozen=True, slots=True)
class Term:
    name: str  # import_limit, ramp_up_0.1s, ramp_down_1s, dynamic_range, band_share
    measured: float | None
    limit: float
    outside_s: float  # time the term was broken (band_share: the whole window when over)

    @property
    def ratio(self) -> float | None:
        return None if self.measured is None else self.measured / self.limit

    @property
    def ok(self) -> bool:
        return self.measured is None or self.measured <= self.limit


@dataclass(frozen=True, slots=True)
class ContractReport:
    seconds: float  # length of the series evaluated
    rate_hz: float
    terms: tuple[Term, ...]
    band_hz: tuple[float, float]  # the band actually measured (upper edge clipped at Nyquist)
    band_share: float | None  # measured even without a limit (a figure worth seeing)
    peak_w: float
    ramps: tuple[RampFigure, ...]

    @property
    def binding(self) -> str | None:
        """The term closest to (or furthest past) its limit."""
        best: Term | None = None
        for t in self.terms:
            if t.ratio is not None and (best is None or t.ratio > (best.ratio or 0.0)):
                best = t
        return None if best is None else best.name

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.terms)

    @property
    def outside_s(self) -> float:
        """Time outside any term, counted per term and added (an upper bound of the union)."""
        return sum(t.outside_s for t in self.terms)


def _label(h: float) -> str:
    return f"{h:g}s"


def evaluate(
    contract: GridContract,
    series: Sequence[float],
    rate_hz: float,
    *,
    import_limit_w: float | None = None,
) -> ContractReport:
    """Every term of ``contract`` on a grid-import series sampled at ``rate_hz``."""
    limit = contract.import_limit_w if contract.import_limit_w is not None else import_limit_w
    terms: list[Term] = []
    peak = max(series, default=0.0)
    if limit is not None:
        over = sum(1 for w in series if w > limit) / rate_hz
        terms.append(Term("import_limit", peak if series else None, limit, over))
    ramps: list[RampFigure] = []
    for h in contract.ramp_horizons_s:
        fig = ramp(series, rate_hz, h, contract.ramp_up_w_per_s, contract.ramp_down_w_per_s)
        ramps.append(fig)
        label = _label(fig.horizon_s)
        if contract.ramp_up_w_per_s is not None:
            terms.append(Term(f"ramp_up_{label}", fig.up_w_per_s, contract.ramp_up_w_per_s, fig.up_outside_s))
        if contract.ramp_down_w_per_s is not None:
            terms.append(
                Term(f"ramp_down_{label}", fig.down_w_per_s, contract.ramp_down_w_per_s, fig.down_outside_s)
            )
    if contract.dynamic_range_w is not None:
        span, out = dynamic_range(series, rate_hz, contract.dynamic_range_window_s, contract.dynamic_range_w)
        terms.append(Term("dynamic_range", span, contract.dynamic_range_w, out))
    share, hi_used = band_share(series, rate_hz, contract.band_lo_hz, contract.band_hi_hz)
    if contract.band_share_max is not None:
        broken = share is not None and share > contract.band_share_max
        terms.append(
            Term("band_share", share, contract.band_share_max, len(series) / rate_hz if broken else 0.0)
        )
    return ContractReport(
        seconds=len(series) / rate_hz,
        rate_hz=rate_hz,
        terms=tuple(terms),
        band_hz=(contract.band_lo_hz, hi_used),
        band_share=share,
        peak_w=peak,
        ramps=tuple(ramps),
    )


class ContractMeter:
    """The live side: samples of the site meter (irregular times) resampled on a fixed grid
    (last value held), a trailing window, evaluated at most every ``evaluate_every_s``."""

    def __init__(self, contract: GridContract, rate_hz: float, import_limit_w: float | None = None) -> None:
        self.contract = contract
        self.rate_hz = rate_hz
        self.import_limit_w = import_limit_w
        self._samples: deque[float] = deque(maxlen=max(8, round(contract.window_s * rate_hz)))
        self._next_t: float | None = None
        self._last: float | None = None
        self._evaluated_at: float | None = None
        self.report: ContractReport | None = None

    def add(self, t: float, grid_w: float | None) -> None:
        """One reading at monotonic time ``t`` (None: missing; the grid gets no sample and the
        window restarts, since a gap would read as a step)."""
        if grid_w is None or not math.isfinite(grid_w):
            self._samples.clear()
            self._next_t = None
            return
        period = 1.0 / self.rate_hz
        if self._next_t is None:
            self._next_t = t
        elif t - self._next_t > 10 * period + self.contract.window_s:
            self._samples.clear()  # asleep for longer than the window: start again
            self._next_t = t
        while self._next_t <= t + 1e-9:
            # A sample due before this reading holds the previous value (a meter read is a step).
            self._samples.append(grid_w if self._last is None or self._next_t >= t - 1e-9 else self._last)
            self._next_t += period
        self._last = grid_w

    def evaluate(self, now: float, *, force: bool = False) -> ContractReport | None:
        due = self._evaluated_at is None or now - self._evaluated_at >= self.contract.evaluate_every_s
        if (due or force) and len(self._samples) >= 8:
            self.report = evaluate(
                self.contract, list(self._samples), self.rate_hz, import_limit_w=self.import_limit_w
            )
            self._evaluated_at = now
        return self.report


def report_status(rep: ContractReport | None, contract: GridContract) -> dict[str, object]:
    """The contract's entry in the power service's status (MQTT state, podctl status --json)."""
    out: dict[str, object] = {
        "window_s": contract.window_s,
        "evaluated": rep is not None,
    }
    if rep is None:
        return out
    out.update(
        seconds=round(rep.seconds, 1),
        rate_hz=rep.rate_hz,
        ok=rep.ok,
        binding=rep.binding,
        band_hz=[rep.band_hz[0], round(rep.band_hz[1], 3)],
        band_share=None if rep.band_share is None else round(rep.band_share, 4),
        terms={
            t.name: {
                "measured": None if t.measured is None else round(t.measured, 3),
                "limit": t.limit,
                "ratio": None if t.ratio is None else round(t.ratio, 4),
                "outside_s": round(t.outside_s, 2),
            }
            for t in rep.terms
        },
    )
    return out


def report_metrics(rep: ContractReport | None) -> list[tuple[str, list[tuple[str, str]], float, str]]:
    """Prometheus samples: per term its measured / limit and time outside; the band share."""
    out: list[tuple[str, list[tuple[str, str]], float, str]] = []
    if rep is None:
        return out
    binding = rep.binding
    for t in rep.terms:
        labels = [("term", t.name)]
        if t.ratio is not None:
            out.append(
                ("podagent_pod_grid_contract_ratio", labels, t.ratio, "Grid contract term: measured / limit.")
            )
        out.append(
            (
                "podagent_pod_grid_contract_outside_seconds",
                labels,
                t.outside_s,
                "Time the grid import broke this contract term, in the window evaluated.",
            )
        )
        out.append(
            (
                "podagent_pod_grid_contract_binding",
                labels,
                1.0 if t.name == binding else 0.0,
                "1 for the contract term closest to (or furthest past) its limit.",
            )
        )
    if rep.band_share is not None:
        out.append(
            (
                "podagent_pod_grid_contract_band_share_ratio",
                [],
                rep.band_share,
                "Share of the grid import's swing energy inside the contract's band.",
            )
        )
    return out
