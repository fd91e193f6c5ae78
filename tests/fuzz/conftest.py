"""The fuzz suite: hypothesis, bounded (each test's examples capped, no deadline) so the whole
suite fits in ``make test`` in about a minute. Every test asserts the same three things of
hostile input: no crash (only the documented error type), a clear error, no state change."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fuzz",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=False,
)
FUZZ = settings.get_profile("fuzz")
