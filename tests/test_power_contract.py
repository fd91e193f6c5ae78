"""The grid contract's measurement (agent/power/contract.py): pure functions, property tests."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.power.config import GridContract, PowerConfig
from agent.power.contract import ContractMeter, band_share, dynamic_range, evaluate, ramp

RATE = 40.0


def sine(freq_hz: float, seconds: float, amp: float = 1000.0, mean: float = 50_000.0) -> list[float]:
    return [mean + amp * math.sin(2 * math.pi * freq_hz * i / RATE) for i in range(round(seconds * RATE))]


def test_band_share_sees_a_swing_inside_and_outside_the_band() -> None:
    inside, hi = band_share(sine(1.0, 60), RATE, 0.1, 20.0)
    assert hi == 20.0
    assert inside is not None and inside > 0.99
    slow, _ = band_share(sine(0.02, 600), RATE, 0.1, 20.0)
    assert slow is not None and slow < 0.01
    half, _ = band_share(
        [a + b - 50_000.0 for a, b in zip(sine(0.02, 600), sine(2.0, 600), strict=True)], RATE, 0.1, 20.0
    )
    assert half is not None and 0.4 < half < 0.6


def test_band_share_clips_the_band_at_nyquist_and_says_so() -> None:
    share, hi = band_share(sine(1.0, 60), 10.0, 0.1, 20.0)
    assert hi == 5.0
    assert share is not None


def test_band_share_of_a_flat_or_short_series() -> None:
    assert band_share([5000.0] * 400, RATE, 0.1, 20.0)[0] == 0.0
    assert band_share([1.0, 2.0], RATE, 0.1, 20.0)[0] is None
    # A pure linear ramp is trend, not swing.
    ramp_only = [1000.0 + 10.0 * i for i in range(400)]
    assert (band_share(ramp_only, RATE, 0.1, 20.0)[0] or 0.0) < 1e-6


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e5, 1e5, allow_nan=False), min_size=8, max_size=300),
    st.floats(0.01, 100.0),
    st.floats(-1e4, 1e4),
)
def test_band_share_is_a_share_and_ignores_offset_and_scale(
    xs: list[float], scale: float, offset: float
) -> None:
    a, _ = band_share(xs, RATE, 0.1, 20.0)
    b, _ = band_share([x * scale + offset for x in xs], RATE, 0.1, 20.0)
    assert a is not None and b is not None
    assert 0.0 <= a <= 1.0 + 1e-9
    if a > 0.0 and b > 0.0:
        assert b == pytest.approx(a, abs=1e-6)


def test_ramp_of_a_step_on_each_horizon() -> None:
    series = [10_000.0] * 400 + [20_000.0] * 400  # a 10 kW step at 10 s, on a block edge
    fast = ramp(series, RATE, 0.1, up_limit=5000.0)
    slow = ramp(series, RATE, 1.0)
    assert fast.horizon_s == pytest.approx(0.1)
    assert fast.up_w_per_s == pytest.approx(100_000.0)
    assert fast.down_w_per_s == 0.0
    assert fast.up_outside_s == pytest.approx(0.1)
    assert slow.up_w_per_s == pytest.approx(10_000.0)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0, 1e5, allow_nan=False), min_size=2, max_size=200), st.sampled_from([0.1, 0.5, 1.0])
)
def test_ramp_never_exceeds_the_largest_sample_step(xs: list[float], horizon: float) -> None:
    fig = ramp(xs, RATE, horizon)
    biggest = max((abs(b - a) for a, b in itertools.pairwise(xs)), default=0.0)
    block = max(1, round(horizon * RATE))
    # A block mean moves at most (block) sample steps' worth between neighbours.
    assert fig.up_w_per_s * fig.horizon_s <= biggest * block + 1e-6
    assert fig.down_w_per_s >= 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1e5, allow_nan=False), min_size=1, max_size=200))
def test_dynamic_range_is_the_span_for_a_long_window(xs: list[float]) -> None:
    span, outside = dynamic_range(xs, RATE, window_s=1e6, limit=max(xs) - min(xs))
    assert span == pytest.approx(max(xs) - min(xs))
    assert outside == 0.0


def test_dynamic_range_window_and_time_outside() -> None:
    series = [0.0] * 40 + [1000.0] * 40 + [0.0] * 400  # 1 s at 1 kW
    span, outside = dynamic_range(series, RATE, window_s=2.0, limit=500.0)
    assert span == 1000.0
    # Every trailing 2 s window holding the pulse and a trough: from its start + 1 s to its end + 2 s.
    assert outside == pytest.approx(3.0, abs=0.05)


def test_evaluate_names_the_binding_term() -> None:
    c = GridContract(
        import_limit_w=100_000.0,
        ramp_up_w_per_s=2000.0,
        ramp_down_w_per_s=2000.0,
        dynamic_range_w=50_000.0,
        band_share_max=0.2,
    )
    rep = evaluate(c, sine(1.0, 60, amp=500.0), RATE)
    assert {t.name for t in rep.terms} == {
        "import_limit",
        "ramp_up_0.1s",
        "ramp_down_0.1s",
        "ramp_up_1s",
        "ramp_down_1s",
        "dynamic_range",
        "band_share",
    }
    assert rep.binding == "band_share"  # a 1 Hz swing: all its energy in the band
    assert not rep.ok
    calm = evaluate(c, [60_000.0] * 2400, RATE)
    assert calm.ok
    assert calm.outside_s == 0.0
    assert calm.binding == "import_limit"  # the only term not at zero


def test_evaluate_takes_the_power_import_limit_when_the_contract_has_none() -> None:
    c = GridContract(band_share_max=0.2)
    rep = evaluate(c, [70_000.0] * 100, RATE, import_limit_w=66_000.0)
    assert rep.binding == "import_limit"
    assert rep.terms[0].outside_s == pytest.approx(2.5)


def test_meter_resamples_holds_and_restarts_on_a_gap() -> None:
    c = GridContract(ramp_up_w_per_s=1000.0, window_s=10.0, evaluate_every_s=1.0)
    meter = ContractMeter(c, rate_hz=5.0)
    t = 0.0
    for i in range(60):
        t += 0.2 if i % 7 else 0.6  # irregular reads: late ones fill with the held value
        meter.add(t, 1000.0 + (500.0 if i >= 30 else 0.0))
    rep = meter.evaluate(t)
    assert rep is not None
    assert rep.rate_hz == 5.0
    assert rep.ramps[0].up_w_per_s == pytest.approx(500.0 / 0.2)
    assert meter.evaluate(t + 0.5) is rep  # not due yet: the last report
    meter.add(t + 0.2, None)  # the meter went missing: no number is invented across the gap
    assert len(meter._samples) == 0
    assert meter.evaluate(t + 5.0) is rep


def test_contract_config_validation() -> None:
    with pytest.raises(ValidationError, match="band_lo_hz"):
        GridContract(band_lo_hz=5.0, band_hi_hz=1.0)
    with pytest.raises(ValidationError, match="ramp_horizons_s"):
        GridContract(ramp_horizons_s=())
    with pytest.raises(ValidationError):
        GridContract(band_share_max=1.5)
    with pytest.raises(ValidationError):
        PowerConfig.model_validate({"grid_contract": {"ramp_up": 5}})
    cfg = PowerConfig.model_validate(
        {"enabled": True, "grid_contract": {"ramp_up_w_per_s": 1000, "band_share_max": 0.2}}
    )
    assert cfg.grid_contract is not None
    assert cfg.grid_contract.band_hi_hz == 20.0
