"""StateStore.update: one pass over a batch stores every reading and derives the pod's power and
the loops' GPU heat load from the power readings in it."""

from __future__ import annotations

import time
from collections.abc import Sequence

from agent.model import Quality, Reading
from agent.state import POD_DEVICE, StateStore


def r(device: str, metric: str, value: float) -> Reading:
    now = time.monotonic()
    return Reading(device, metric, value, "W", now, time.time(), Quality.GOOD)


def store() -> tuple[StateStore, list[Sequence[Reading]]]:
    s = StateStore()
    for d in ("pdu-a", "pdu-b", "gpu0", "gpu1"):
        s.register_device(d, stale_after_s=3.0)
    s.set_derivations(pod_power_devices=["pdu-a", "pdu-b"], loop_gpus={"cdu-1": ["gpu0", "gpu1"]})
    seen: list[Sequence[Reading]] = []
    s.subscribe(seen.append)
    return s, seen


def test_a_batch_in_any_device_order_is_stored_whole() -> None:
    s, seen = store()
    batch = [r("gpu0", "temp_c", 50.0), r("gpu1", "temp_c", 51.0), r("gpu0", "util_pct", 90.0)]
    s.update(batch)
    assert s.value("gpu0", "temp_c") == 50.0 and s.value("gpu0", "util_pct") == 90.0
    assert s.value("gpu1", "temp_c") == 51.0
    assert list(seen[-1]) == batch  # no power: nothing derived


def test_power_readings_derive_the_pod_power_and_the_loop_heat_load() -> None:
    s, seen = store()
    s.update([r("pdu-a", "power_w", 1000.0), r("pdu-b", "power_w", 500.0)])
    assert s.value(POD_DEVICE, "power_w") == 1500.0
    assert [x.metric for x in seen[-1]][-1] == "power_w" and seen[-1][-1].device == POD_DEVICE
    s.update([r("gpu0", "power_w", 300.0), r("gpu1", "temp_c", 40.0), r("gpu1", "power_w", 200.0)])
    assert s.value("cdu-1", "gpu_heat_load_kw") == 0.5
    s.update([r("pdu-b", "power_w", 700.0)])
    assert s.value(POD_DEVICE, "power_w") == 1700.0
    # A pod-power device's other readings with some power in the batch re-sum the pod's power:
    # the batch the subscribers get carries a new pod reading.
    s.update([r("pdu-b", "current_a", 3.0), r("gpu0", "power_w", 310.0)])
    pod = [x for x in seen[-1] if x.device == POD_DEVICE]
    assert len(pod) == 1 and pod[0].metric == "power_w" and pod[0].value == 1700.0
    # Without any reading of a pod-power device, nothing re-sums it.
    s.update([r("gpu1", "power_w", 210.0)])
    assert not [x for x in seen[-1] if x.device == POD_DEVICE]
