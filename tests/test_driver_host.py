"""The host driver on this machine: every metric present and plausible."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import HostDevice
from agent.drivers.base import DeviceUnavailable, driver_class
from agent.drivers.host import HostDriver, disk_metric
from agent.model import Quality, Reading


def _by_metric(readings: list[Reading]) -> dict[str, Reading]:
    assert len({r.metric for r in readings}) == len(readings)
    return {r.metric: r for r in readings}


async def test_readings_present_and_plausible(tmp_path: Path) -> None:
    cfg = HostDevice(id="ctrl", kind="host", disk_paths=["/", str(tmp_path), "/no/such/mount"])
    drv = driver_class("host")(cfg)
    assert isinstance(drv, HostDriver)
    with pytest.raises(DeviceUnavailable):
        await drv.poll()  # not open
    await drv.open()
    for _ in range(2):  # the second poll has a real cpu_pct interval behind it
        got = _by_metric(await drv.poll())
    assert all(r.device == "ctrl" for r in got.values())
    good = {m: r.value for m, r in got.items() if r.quality is Quality.GOOD}
    assert 0.0 <= good["cpu_pct"] <= 100.0
    assert good["load1"] >= 0.0
    assert 0.0 < good["mem_used_pct"] < 100.0
    assert good["mem_available_bytes"] > 1024**2
    assert 0.0 < good["disk_used_pct"] <= 100.0
    assert 0.0 <= good[disk_metric(str(tmp_path))] <= 100.0
    assert good["uptime_s"] > 0.0
    assert got["mem_available_bytes"].unit == "B" and got["uptime_s"].unit == "s"
    # A path that is not there is an ERROR reading, never 0.
    missing = got["disk_no_such_mount_used_pct"]
    assert missing.quality is Quality.ERROR and missing.value is None and missing.error
    # Temperature: the hottest sensor, or None (ERROR) where the machine has none (VMs).
    temp = got["temp_c"]
    if temp.value is None:
        assert temp.quality is Quality.ERROR and temp.error
    else:
        assert -20.0 < temp.value < 125.0
    await drv.close()


def test_disk_metric_names() -> None:
    assert disk_metric("/") == "disk_used_pct"
    assert disk_metric("/var/lib") == "disk_var_lib_used_pct"
    assert disk_metric("/data/") == "disk_data_used_pct"
