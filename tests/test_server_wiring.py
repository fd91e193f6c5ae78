"""Config wiring by server: PDUs, outlets and loops name node devices (and racks of them); the
inventory expands them to the servers' GPU ids; check-config names an unknown server or rack with
the nearest known one, and a server whose GPU count it cannot know."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config
from agent.inventory import build_inventory

CONFIG = """
[pod]
site = "lab"
id = "pod-1"

[paths]
state_dir = "{state}"

[[device]]
id = "srv-0"
kind = "node"
host = "10.0.40.10"
key_file = "{key}"
gpus = 4
rack = "rack-a"

[[device]]
id = "srv-1"
kind = "node"
host = "10.0.40.11"
key_file = "{key}"
gpus = 4
rack = "rack-a"

[[device]]
id = "srv-2"
kind = "node"
host = "10.0.40.12"
key_file = "{key}"
gpus = 8
rack = "rack-b"

[[device]]
id = "pdu-1"
kind = "snmp"
profile = "apc-rpdu2"
host = "127.0.0.1"
community = "public"
servers = ["srv-0", "srv-1"]
outlet_servers = {{ "1" = ["srv-0"], "2" = ["srv-1"] }}
breaker_rating_a = 32.0

[[device]]
id = "cdu-1"
kind = "modbus"
profile = "generic-cdu"
host = "127.0.0.1"
racks = ["rack-a"]

[[device]]
id = "cdu-2"
kind = "modbus"
profile = "generic-cdu"
host = "127.0.0.1"
servers = ["srv-2"]
"""


def _write(tmp_path: Path, text: str = CONFIG) -> Path:
    key = tmp_path / "pod.key"
    key.write_text("00" * 32 + "\n")
    (tmp_path / "state").mkdir(exist_ok=True)
    path = tmp_path / "podagent.toml"
    path.write_text(text.format(state=tmp_path / "state", key=key))
    return path


def gpus(server: str, n: int) -> tuple[str, ...]:
    return tuple(f"{server}-gpu{i}" for i in range(n))


def test_servers_and_racks_expand_to_the_servers_gpus(tmp_path: Path) -> None:
    inv = build_inventory(load_config(_write(tmp_path)))
    assert inv.pdus["pdu-1"] == gpus("srv-0", 4) + gpus("srv-1", 4)
    assert dict(inv.outlet_gpus) == {"pdu-1": {1: gpus("srv-0", 4), 2: gpus("srv-1", 4)}}
    assert dict(inv.loops) == {"cdu-1": gpus("srv-0", 4) + gpus("srv-1", 4), "cdu-2": gpus("srv-2", 8)}
    # A node's entry knows its GPUs before the node ever answers (the interlocks' topology).
    assert inv.devices["srv-2"].role == "node" and inv.devices["srv-2"].gpus == gpus("srv-2", 8)


def test_gpu_id_lists_still_work_and_mix_with_servers(tmp_path: Path) -> None:
    text = CONFIG.replace('servers = ["srv-2"]', 'servers = ["srv-2"]\ngpus = ["srv-1-gpu3"]')
    text = text.replace('racks = ["rack-a"]', 'gpus = ["srv-0-gpu0"]')
    inv = build_inventory(load_config(_write(tmp_path, text)))
    assert inv.loops["cdu-1"] == ("srv-0-gpu0",)
    assert inv.loops["cdu-2"] == ("srv-1-gpu3", *gpus("srv-2", 8))


@pytest.mark.parametrize(
    ("old", "new", "key", "message"),
    [
        (
            'servers = ["srv-2"]',
            'servers = ["srv-02"]',
            "device[5](id=cdu-2).servers",
            "unknown server 'srv-02': no node device has that id (did you mean 'srv-2'?)",
        ),
        (
            '"2" = ["srv-1"]',
            '"2" = ["svr-1"]',
            "device[3](id=pdu-1).outlet_servers.2",
            "unknown server 'svr-1'",
        ),
        (
            'racks = ["rack-a"]',
            'racks = ["rack-aa"]',
            "device[4](id=cdu-1).racks",
            "unknown rack 'rack-aa': no node device has rack = 'rack-aa' (did you mean 'rack-a'?)",
        ),
        ('gpus = 8\nrack = "rack-b"', 'rack = "rack-b"', "device[5](id=cdu-2).servers", "no gpus count"),
        (
            'servers = ["srv-2"]',
            'servers = ["srv-2", "srv-0"]',
            "device[5](id=cdu-2).gpus",
            "srv-0-gpu0 is already on the loop of 'cdu-1'",
        ),
        (
            '"2" = ["srv-1"]',
            '"2" = ["srv-2"]',
            "device[3](id=pdu-1).outlet_servers.2",
            "srv-2-gpu0 is not among this PDU's GPUs",
        ),
        (
            'servers = ["srv-2"]',
            'servers = ["srv-2"]\ngpus = ["srv-9-gpu0"]',
            "device[5](id=cdu-2).gpus",
            "unknown GPU 'srv-9-gpu0'",
        ),
    ],
)
def test_check_config_names_bad_server_wiring(
    tmp_path: Path, old: str, new: str, key: str, message: str
) -> None:
    assert old in CONFIG
    path = _write(tmp_path, CONFIG.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    found = [(p.key, p.message) for p in err.value.problems]
    assert any(k == key and message in m for k, m in found), found


def test_check_config_cli_says_ok_and_names_the_nearest_server(tmp_path: Path) -> None:
    good = _write(tmp_path)
    ok = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _write(tmp_path, CONFIG.replace('servers = ["srv-0", "srv-1"]', 'servers = ["srv-0", "srv-11"]'))
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode != 0
    assert "device[3](id=pdu-1).servers: unknown server 'srv-11'" in res.stdout + res.stderr
    assert "did you mean 'srv-1'?" in res.stdout + res.stderr
