"""podagent check-config: every broken config names the file and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config

GOOD = """
[pod]
site = "lab"
id = "pod-1"

[paths]
state_dir = "/tmp/podagent-test"

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
port = 16101
community = "public"

[[device]]
id = "cdu-1"
kind = "modbus"
profile = "generic-cdu"
host = "127.0.0.1"
port = 15020
unit = 1

[[device]]
id = "controller"
kind = "host"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "podagent.toml"
    path.write_text(text)
    return path


def test_good_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert [d.id for d in config.device] == ["gpus", "pdu-1", "cdu-1", "controller"]
    assert config.device[1].poll_interval_s == 1.0


BROKEN = [
    # (description, edit, expected key in the message, expected words)
    (
        "wrong type",
        lambda t: t.replace("port = 16101", 'port = "sixteen"'),
        "device[1](id=pdu-1).port",
        "integer",
    ),
    (
        "unknown key",
        lambda t: t.replace('host = "127.0.0.1"\nport = 16101', 'hots = "127.0.0.1"\nport = 16101'),
        "device[1](id=pdu-1).hots",
        "unknown key",
    ),
    (
        "missing address",
        lambda t: t.replace('host = "127.0.0.1"\nport = 15020', "port = 15020"),
        "device[2](id=cdu-1)",
        "needs host",
    ),
    (
        "bad profile",
        lambda t: t.replace('profile = "apc-rpdu2"', 'profile = "apc-rpdu9"'),
        "device[1](id=pdu-1).profile",
        "no profile 'apc-rpdu9'",
    ),
    (
        "duplicate id",
        lambda t: t.replace('id = "cdu-1"', 'id = "pdu-1"'),
        "(top level)",
        "duplicate device id 'pdu-1'",
    ),
    ("missing pod id", lambda t: t.replace('id = "pod-1"\n', ""), "pod.id", "required key is missing"),
    (
        "unknown kind",
        lambda t: t.replace('kind = "host"', 'kind = "bacnet"'),
        "device[3](id=controller)",
        "nvml",
    ),
    (
        "negative interval",
        lambda t: t + "poll_interval_s = -1\n",
        "device[3](id=controller).poll_interval_s",
        "greater than 0",
    ),
    (
        "v3 without keys",
        lambda t: t.replace('community = "public"', 'version = "3"\nuser = "x"'),
        "device[1](id=pdu-1)",
        "auth_key",
    ),
    (
        "nvml hwsim without state",
        lambda t: t.replace('hwsim_state = "/tmp/none.shm"\n', ""),
        "device[0](id=gpus)",
        "hwsim_state",
    ),
    (
        "modbus unit out of range",
        lambda t: t.replace("unit = 1", "unit = 300"),
        "device[2](id=cdu-1).unit",
        "less than or equal to 247",
    ),
    (
        "bad device id",
        lambda t: t.replace('id = "controller"', 'id = "has space"'),
        "device[3](id=has space).id",
        "pattern",
    ),
    (
        "prometheus listen",
        lambda t: t.replace("[paths]", '[prometheus]\nlisten = "9400"\n\n[paths]'),
        "prometheus.listen",
        "HOST:PORT",
    ),
    ("bad toml", lambda t: t.replace("[pod]", "[pod"), "(syntax)", "not valid TOML"),
    (
        "missing secret file",
        lambda t: t.replace('community = "public"', 'community_file = "nope.secret"'),
        "device[1](id=pdu-1).community_file",
        "cannot read",
    ),
]


@pytest.mark.parametrize(("what", "edit", "key", "words"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_names_the_key(tmp_path: Path, what: str, edit, key: str, words: str) -> None:
    path = write(tmp_path, edit(GOOD))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = err.value.render()
    assert f"{path}: {key}" in text, text
    assert words in text, text


def test_secrets_from_files_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "community.secret").write_text("s3cret\n")
    config = load_config(
        write(tmp_path, GOOD.replace('community = "public"', 'community_file = "community.secret"'))
    )
    pdu = config.devices_by_id()["pdu-1"]
    assert Path(pdu.community_file).read_text().strip() == "s3cret"  # type: ignore[union-attr]


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD)
    ok = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(good)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "ok" in ok.stdout and "4 devices" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        GOOD.replace("port = 16101", 'port = "x"').replace('kind = "host"', 'kind = "host"\nfoo = 1')
    )
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", str(bad)], capture_output=True, text=True
    )
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[0] == f"{bad}: 2 problem(s)"
    assert any("device[1](id=pdu-1).port" in line for line in lines)
    assert any("device[3](id=controller).foo" in line for line in lines)
    # run refuses the same way, with the exit code systemd is told not to restart on.
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(bad)], capture_output=True, text=True
    )
    assert res.returncode == 78 and "refusing to start" in res.stderr


def test_shipped_configs_are_valid() -> None:
    import tomllib

    from agent.config import parse_config

    root = Path(__file__).resolve().parent.parent / "config"
    load_config(root / "demo.toml")
    # The example names secret files that exist only on a real controller: check its schema.
    example = parse_config(tomllib.loads((root / "example.toml").read_text()), root / "example.toml")
    assert {d.kind for d in example.device} == {"nvml", "snmp", "modbus", "host"}


def test_demo_config_matches_the_demo_pod() -> None:
    """config/demo.toml must work unedited against `hwsim run --pod demo` (fixed ports)."""
    from hwsim.podspec import load_pod_spec

    spec = load_pod_spec("demo")
    config = load_config(Path(__file__).resolve().parent.parent / "config" / "demo.toml")
    devices = config.devices_by_id()
    for pdu in spec.pdu:
        dev = devices[pdu.id]
        if pdu.snmp is not None:
            assert dev.kind == "snmp" and dev.port == pdu.snmp.port, pdu.id  # type: ignore[union-attr]
            assert dev.version == pdu.snmp.version  # type: ignore[union-attr]
    assert devices["cdu-1"].port == spec.cdu[0].modbus.port  # type: ignore[union-attr]
    assert str(devices["chiller-1"].serial) == "/tmp/hwsim-demo/rtu0"  # type: ignore[union-attr]
    assert str(devices["gpus"].hwsim_state) == "/tmp/hwsim-demo/nvml.shm"  # type: ignore[union-attr]


HMAC_KEY = "mqtt.command_hmac_key_file"
MQTT_WITH_FILES = """
[mqtt]
enabled = true
brokers = ["127.0.0.1:1883"]
username = "pod"
password_file = "mqtt.password"
command_hmac_key_file = "hmac.key"
tls_ca_file = "ca.pem"
"""


@pytest.mark.parametrize(
    ("files", "key", "words"),
    [
        ({"hmac.key": "k" * 32, "ca.pem": "x"}, "mqtt.password_file", "cannot read"),
        ({"mqtt.password": "pw", "hmac.key": "k" * 32}, "mqtt.tls_ca_file", "No such file"),
        ({"mqtt.password": "pw", "hmac.key": "\n", "ca.pem": "x"}, "mqtt.command_hmac_key_file", "empty"),
        (
            {"mqtt.password": "pw", "hmac.key": "short", "ca.pem": "x"},
            "mqtt.command_hmac_key_file",
            "too short",
        ),
    ],
)
def test_unusable_secret_and_tls_files_are_config_errors(
    tmp_path: Path, files: dict[str, str], key: str, words: str
) -> None:
    """check-config must not say "ok" about a key the daemon will fail to read at 3 am."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    path = write(tmp_path, GOOD + MQTT_WITH_FILES)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = err.value.render()
    assert f"{path}: {key}: " in text and words in text, text
    assert len(err.value.problems) == 1, text


def test_readable_secret_and_tls_files_pass(tmp_path: Path) -> None:
    for name, text in {"mqtt.password": "pw", "hmac.key": "k" * 32, "ca.pem": "x"}.items():
        (tmp_path / name).write_text(text)
    config = load_config(write(tmp_path, GOOD + MQTT_WITH_FILES))
    assert config.mqtt.command_hmac_key_file == tmp_path / "hmac.key"


def test_modbus_tcp_units_share_a_poll_phase_rtu_units_keep_their_own() -> None:
    """TCP units are polled at one instant of the interval (one wake-up of the agent for all of
    them); an RTU unit, which takes turns with its line's other units, keeps its id's phase; ""
    asks for the id's phase explicitly."""
    from agent.config import ModbusDevice
    from agent.poller import Poller, phase_offset
    from agent.state import StateStore

    def unit(dev_id: str, **kw: object) -> ModbusDevice:
        base = {"id": dev_id, "kind": "modbus", "profile": "generic-cdu", "host": "10.0.0.1"}
        return ModbusDevice.model_validate(base | kw)

    store = StateStore()
    cdu, chiller = unit("cdu-1"), unit("chiller-1", profile="generic-chiller", port=1502)
    rtu = unit("chiller-2", transport="rtu", serial="/dev/ttyUSB0", host=None)
    own = unit("cdu-2", poll_phase="")
    assert cdu.poll_phase == chiller.poll_phase == "modbus"
    assert rtu.poll_phase is None
    phases = {d.id: Poller(d, object(), store).phase_s for d in (cdu, chiller, rtu, own)}  # type: ignore[arg-type]
    assert phases["cdu-1"] == phases["chiller-1"] == phase_offset("modbus", 1.0)
    assert phases["chiller-2"] == phase_offset("chiller-2", 1.0)
    assert phases["cdu-2"] == phase_offset("cdu-2", 1.0)
    # A config given back as loaded keeps its phase (reload compares device configs).
    assert ModbusDevice.model_validate(cdu.model_dump()) == cdu
