"""The pod's power (StateStore._derive): the compact path (arrays of the pod devices' last GOOD
power, summed in C) gives what the exact rule (_sum_power over the latest readings) gives, through
updates, failures, stale inputs, cadence and staleness-limit changes."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import Quality, Reading
from agent.state import POD_DEVICE, StateStore
from tests.fuzz.conftest import FUZZ

DEVICES = ["pdu-1", "pdu-2", "pdu-3", "pdu-4"]

step = st.one_of(
    # a power reading: device, value (None: missing), GOOD or not, age (far from the 3 s limit)
    st.tuples(
        st.just("power"),
        st.sampled_from([*DEVICES, "cdu-1"]),
        st.none() | st.floats(0, 20_000),
        st.booleans(),
        st.sampled_from([0.0, 1.0, 10.0]),
    ),
    st.tuples(st.just("other"), st.sampled_from(DEVICES), st.floats(0, 100)),  # no power in it
    st.tuples(st.just("error"), st.sampled_from(DEVICES)),  # mark_device_error
    st.tuples(st.just("cadence"), st.sampled_from(DEVICES), st.sampled_from([1, 5])),
    st.tuples(st.just("limit"), st.sampled_from(DEVICES), st.sampled_from([3.0, 0.5, 30.0])),
)


def exact(store: StateStore) -> tuple[float | None, str | None]:
    total, bad = store._sum_power(store._pod_power_devices)
    return (None, f"no power from {', '.join(sorted(bad))}") if bad else (total, None)


@settings(FUZZ, max_examples=200)
@given(steps=st.lists(step, min_size=1, max_size=40))
def test_the_compact_pod_sum_is_the_exact_one(steps: list[tuple[object, ...]]) -> None:
    store = StateStore()
    for d in DEVICES:
        store.register_device(d, stale_after_s=3.0)
    store.set_derivations(pod_power_devices=DEVICES, loop_gpus={})
    for kind, device, *rest in steps:
        assert isinstance(device, str)
        now = time.monotonic()
        if kind == "power":
            value, good, age = rest
            quality = Quality.GOOD if good else Quality.ERROR
            store.update([Reading(device, "power_w", value, "W", now - float(age), time.time(), quality)])  # type: ignore[arg-type]
        elif kind == "other":
            store.update([Reading(device, "current_a", rest[0], "A", now, time.time())])  # type: ignore[arg-type]
        elif kind == "error":
            store.mark_device_error(device, "timeout")
        elif kind == "cadence":
            store.set_cadence(device, "power_w", rest[0])  # type: ignore[arg-type]
            continue
        else:
            store.register_device(device, stale_after_s=rest[0])  # type: ignore[arg-type]
            continue
        pod = store.get(POD_DEVICE, "power_w")
        if pod is None or pod.ts_mono < now:
            continue  # this batch did not re-sum the pod (no pod device's reading in it)
        want_value, want_error = exact(store)
        assert pod.error == want_error
        assert pod.quality is (Quality.GOOD if want_error is None else Quality.ERROR)
        assert pod.value == (None if want_value is None else pytest.approx(want_value, rel=1e-12))


def test_a_loop_sum_skips_batches_without_its_gpus() -> None:
    store = StateStore()
    store.register_device("gpus", stale_after_s=3.0)
    store.set_derivations(pod_power_devices=[], loop_gpus={"loop-a": ["gpu0", "gpu1"]})
    store.update([Reading("pdu-1", "power_w", 100.0, "W")])
    assert store.get("loop-a", "gpu_heat_load_kw") is None
    store.update([Reading("gpu0", "power_w", 300.0, "W"), Reading("gpu1", "power_w", 200.0, "W")])
    assert store.get("loop-a", "gpu_heat_load_kw") is not None
