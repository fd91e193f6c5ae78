"""The inventory: device roles from the profiles' [device] kind (never the file name), the loops,
feeds and pod-power devices built from them, and the profiles' bits, enums and point roles."""

from __future__ import annotations

from pathlib import Path

from agent.app import loop_gpus, pod_power_devices
from agent.config import PROFILE_DIR, load_config
from agent.inventory import build_inventory

CONFIG = """
[pod]
site = "lab"
id = "pod-1"

[paths]
state_dir = "{state}"

[[device]]
id = "gpus"
kind = "nvml"
library = "hwsim"
hwsim_state = "/tmp/none.shm"

[[device]]
id = "pdu-1"
kind = "snmp"
profile = "apc-rpdu2"
host = "127.0.0.1"
community = "public"
gpus = ["gpu0", "gpu1"]
breaker_rating_a = 16.0
outlet_gpus = {{ "3" = ["gpu0"] }}

[[device]]
id = "branch-1"
kind = "modbus"
profile = "{pdu_named_like_a_cdu}"
host = "127.0.0.1"
gpus = ["gpu0", "gpu1"]
pod_power = true

[[device]]
id = "loop-1"
kind = "modbus"
profile = "{cdu_named_oddly}"
host = "127.0.0.1"
gpus = ["gpu0", "gpu1"]
min_flow_lpm = 12.0

[[device]]
id = "bms-1"
kind = "modbus"
profile = "generic-bms"
host = "127.0.0.1"

[[device]]
id = "controller"
kind = "host"
poll_interval_s = 5.0
"""


def test_roles_come_from_the_profiles_kind_not_its_name(tmp_path: Path) -> None:
    # A Modbus PDU profile whose file name says "cdu", and a CDU profile whose name says nothing:
    # before, the first was wired as a cooling loop and the second ignored.
    pdu = tmp_path / "acme-cdu-branch-meter.toml"
    pdu.write_text((PROFILE_DIR / "modbus-pdu.toml").read_text())
    cdu = tmp_path / "acme-xr9.toml"
    cdu.write_text((PROFILE_DIR / "generic-cdu.toml").read_text())
    path = tmp_path / "podagent.toml"
    path.write_text(CONFIG.format(state=tmp_path, pdu_named_like_a_cdu=pdu, cdu_named_oddly=cdu))
    inv = build_inventory(load_config(path))
    assert {d: inv.role(d) for d in inv.devices} == {
        "gpus": "gpu_host",
        "pdu-1": "pdu",
        "branch-1": "pdu",
        "loop-1": "cdu",
        "bms-1": "battery",
        "controller": "host",
    }
    assert dict(inv.loops) == {"loop-1": ("gpu0", "gpu1")} and loop_gpus(inv) == {"loop-1": ["gpu0", "gpu1"]}
    assert dict(inv.pdus) == {"pdu-1": ("gpu0", "gpu1"), "branch-1": ("gpu0", "gpu1")}
    assert dict(inv.pdu_rating_a) == {"pdu-1": 16.0}
    assert dict(inv.outlet_gpus) == {"pdu-1": {3: ("gpu0",)}}
    assert dict(inv.min_flow_lpm) == {"loop-1": 12.0}
    assert pod_power_devices(inv) == ["pdu-1", "branch-1"]
    assert inv.stale_after_s("controller") == 15.0  # 3 polls of 5 s
    assert inv.gpus() == ["gpu0", "gpu1"]


def test_bits_enums_and_roles_are_profile_data(tmp_path: Path) -> None:
    pdu = tmp_path / "p.toml"
    pdu.write_text((PROFILE_DIR / "modbus-pdu.toml").read_text())
    path = tmp_path / "podagent.toml"
    path.write_text(CONFIG.format(state=tmp_path, pdu_named_like_a_cdu=pdu, cdu_named_oddly="generic-cdu"))
    inv = build_inventory(load_config(path))
    assert inv.bit_names("bms-1", "faults", 0b101) == ["over-temperature", "inverter"]
    assert inv.bit_names("bms-1", "faults", 0b1000) == ["0x8"]  # an unnamed bit is still shown
    assert inv.bit_names("loop-1", "alarms", 0b10) == ["leak"]
    assert inv.enum_value("bms-1", "mode", "grid_target") == 1
    assert inv.enum_value("bms-1", "mode", "power_setpoint") == 0
    assert inv.writable("bms-1", "grid_target") == "grid_target_w"
    assert inv.writable("loop-1", "setpoint") == "setpoint_c"
    assert inv.writable("pdu-1", "setpoint") is None
