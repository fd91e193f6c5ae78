"""check-config validates everything the daemon will load (profiles included) and lists every
problem at once; ``podagent run`` refuses the same files with exit 78 and one line per problem."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import PROFILE_DIR, ConfigError, load_config

BASE = """
[pod]
site = "lab"
id = "pod-1"

[paths]
state_dir = "{state_dir}"

[[device]]
id = "gpus"
kind = "nvml"
library = "hwsim"
hwsim_state = "/tmp/none.shm"

[[device]]
id = "pdu-1"
kind = "snmp"
profile = "{pdu_profile}"
host = "127.0.0.1"
port = 16101
community = "public"
gpus = ["gpu0", "gpu1"]
outlet_gpus = {{ "1" = ["gpu0"], "2" = ["gpu1"] }}

[[device]]
id = "cdu-1"
kind = "modbus"
profile = "{cdu_profile}"
host = "127.0.0.1"
port = 15020
gpus = ["gpu0", "gpu1"]
"""


def _setup(tmp_path: Path) -> dict[str, Path]:
    cdu = tmp_path / "my-cdu.toml"
    cdu.write_text((PROFILE_DIR / "generic-cdu.toml").read_text())
    pdu = tmp_path / "my-pdu.toml"
    pdu.write_text((PROFILE_DIR / "apc-rpdu2.toml").read_text())
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "podagent.toml"
    config.write_text(BASE.format(state_dir=state, pdu_profile=pdu, cdu_profile=cdu))
    return {"config": config, "cdu": cdu, "pdu": pdu, "state": state}


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _replace_with_file(path: Path) -> None:
    path.rmdir()
    path.write_text("not a directory")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_the_base_is_good(tmp_path: Path) -> None:
    files = _setup(tmp_path)
    res = _cli("check-config", str(files["config"]))
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


Breakage = Callable[[dict[str, Path]], None]

CASES: list[tuple[str, Breakage, str, str, str]] = [
    # (what, how to break it, which file, key, words of the message)
    (
        "profile TOML syntax",
        lambda f: _edit(f["cdu"], 'kind = "cdu"', 'kind = "cdu'),
        "cdu",
        "(syntax)",
        "not valid TOML",
    ),
    (
        "profile schema: a wrong type",
        lambda f: _edit(f["cdu"], 'type = "int16"', 'type = "int61"'),
        "cdu",
        "points[0](metric=supply_temp_c).type",
        "int16",
    ),
    (
        "profile typo: the nearest key",
        lambda f: _edit(f["cdu"], "scale = 0.1", "scael = 0.1"),
        "cdu",
        "points[0](metric=supply_temp_c).scael",
        "did you mean 'scale'",
    ),
    (
        "profile without a kind",
        lambda f: _edit(f["cdu"], 'kind = "cdu"\n', ""),
        "cdu",
        "device.kind",
        "required",
    ),
    (
        "profile with an unknown kind",
        lambda f: _edit(f["cdu"], 'kind = "cdu"', 'kind = "cooler"'),
        "cdu",
        "device.kind",
        "'cooler' is not a modbus device kind",
    ),
    (
        "SNMP profile typo",
        lambda f: _edit(f["pdu"], "columns = [5, 9, 16]", "colums = [5, 9, 16]"),
        "pdu",
        "tables.device.colums",
        "did you mean 'columns'",
    ),
    (
        "SNMP profile schema",
        lambda f: _edit(f["pdu"], 'entry = "1.3.6.1.4.1.318.1.1.26.4.3.1"', 'entry = "one.two"'),
        "pdu",
        "tables.device.entry",
        "not a numeric OID",
    ),
    (
        "non-UTF-8 byte in a profile",
        lambda f: f["cdu"].write_bytes(f["cdu"].read_bytes().replace(b"Generic CDU", b"Generic \xff CDU")),
        "cdu",
        "(encoding)",
        "0xff",
    ),
    (
        "non-UTF-8 byte in the config",
        lambda f: f["config"].write_bytes(f["config"].read_bytes().replace(b'"lab"', b'"l\xe9b"')),
        "config",
        "(encoding)",
        "byte 0xe9 at line 3 is not UTF-8",
    ),
    (
        "config typo: the nearest key",
        lambda f: _edit(f["config"], "port = 15020", "prot = 15020"),
        "config",
        "device[2](id=cdu-1).prot",
        "did you mean 'port'",
    ),
    (
        "unknown profile name",
        lambda f: _edit(f["config"], f'profile = "{f["cdu"]}"', 'profile = "generic-cdx"'),
        "config",
        "device[2](id=cdu-1).profile",
        "did you mean 'generic-cdu'? known: apc-rpdu2, generic-bms, generic-cdu",
    ),
    (
        "a GPU on two loops",
        lambda f: _edit(
            f["config"],
            'port = 15020\ngpus = ["gpu0", "gpu1"]',
            'port = 15020\ngpus = ["gpu0", "gpu1"]\n\n[[device]]\nid = "cdu-2"\nkind = "modbus"\n'
            f'profile = "{f["cdu"]}"\nhost = "127.0.0.1"\nport = 15021\ngpus = ["gpu1"]',
        ),
        "config",
        "device[3](id=cdu-2).gpus",
        "gpu1 is already on the loop of 'cdu-1'",
    ),
    (
        "an unknown GPU in gpus",
        lambda f: _edit(
            f["config"], 'port = 15020\ngpus = ["gpu0", "gpu1"]', 'port = 15020\ngpus = ["gpu0", "gpux"]'
        ),
        "config",
        "device[2](id=cdu-1).gpus",
        "unknown GPU 'gpux' (GPU ids here are gpuN)",
    ),
    (
        "an unknown GPU in outlet_gpus",
        lambda f: _edit(f["config"], '"2" = ["gpu1"]', '"2" = ["GPU1"]'),
        "config",
        "device[1](id=pdu-1).outlet_gpus.2",
        "unknown GPU 'GPU1'",
    ),
    (
        "an outlet that is not a number",
        lambda f: _edit(f["config"], '"2" = ["gpu1"]', '"two" = ["gpu1"]'),
        "config",
        "device[1](id=pdu-1).outlet_gpus.two",
        "expected an outlet number",
    ),
    (
        "an empty SNMP host",
        lambda f: _edit(f["config"], 'host = "127.0.0.1"\nport = 16101', 'host = ""\nport = 16101'),
        "config",
        "device[1](id=pdu-1).host",
        "expected the PDU's host name or address",
    ),
    (
        "a state_dir that is a file",
        lambda f: _replace_with_file(f["state"]),
        "config",
        "paths.state_dir",
        "is a file; expected a directory",
    ),
]


@pytest.mark.parametrize(("what", "breakage", "which", "key", "words"), CASES, ids=[c[0] for c in CASES])
def test_each_broken_file_is_named_with_its_key(
    tmp_path: Path, what: str, breakage: Breakage, which: str, key: str, words: str
) -> None:
    files = _setup(tmp_path)
    breakage(files)
    with pytest.raises(ConfigError) as err:
        load_config(files["config"])
    text = err.value.render()
    assert f"{files[which]}: {key}: " in text, text
    assert words in text, text
    # The CLI: check-config says the same and exits 1; run refuses with 78, never a traceback.
    res = _cli("check-config", str(files["config"]))
    assert res.returncode == 1
    assert f"{files[which]}: {key}: " in res.stderr and "Traceback" not in res.stderr
    res = _cli("run", "--config", str(files["config"]))
    assert res.returncode == 78, res.stderr
    assert "Traceback" not in res.stderr and "refusing to start" in res.stderr


def test_every_problem_at_once_no_dump(tmp_path: Path) -> None:
    files = _setup(tmp_path)
    _edit(files["cdu"], "scale = 0.1", "scael = 0.1")
    _edit(files["pdu"], "columns = [5, 9, 16]", "colums = [5, 9, 16]")
    _edit(files["config"], '"2" = ["gpu1"]', '"2" = ["gpu9x"]')
    res = _cli("check-config", str(files["config"]))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[0].endswith("problem(s)")
    assert any(str(files["cdu"]) in line and "scael" in line for line in lines)
    assert any(str(files["pdu"]) in line and "colums" in line for line in lines)
    assert any("outlet_gpus.2" in line and "gpu9x" in line for line in lines)
    # One line per problem, none a dump of the config or the profile.
    assert all(len(line) < 300 for line in lines)
    assert "[[points]]" not in res.stderr and "community" not in res.stderr
    # A schema error in the config itself: the profiles it names are still checked.
    _edit(files["config"], "port = 15020", "prot = 15020")
    lines = _cli("check-config", str(files["config"])).stderr.strip().splitlines()
    assert any(".prot" in line for line in lines)
    assert any(str(files["cdu"]) in line and "scael" in line for line in lines)
    assert any(str(files["pdu"]) in line and "colums" in line for line in lines)


def test_power_battery_must_be_a_battery_with_its_roles(tmp_path: Path) -> None:
    files = _setup(tmp_path)
    bms = tmp_path / "my-bms.toml"
    bms.write_text((PROFILE_DIR / "generic-bms.toml").read_text().replace('role = "grid_target"\n', ""))
    text = files["config"].read_text()
    text = text.replace(
        '[[device]]\nid = "gpus"',
        '[power]\nenabled = true\nbattery = "bms-1"\nsite_meter = "cdu-1"\n\n[[device]]\nid = "gpus"',
    )
    text += (
        f'\n[[device]]\nid = "bms-1"\nkind = "modbus"\nprofile = "{bms}"\nhost = "127.0.0.1"\nport = 15030\n'
    )
    files["config"].write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(files["config"])
    rendered = err.value.render()
    assert "power.site_meter: 'cdu-1' is a cdu (its profile's kind); expected a meter" in rendered
    assert "no writable point with role = 'grid_target'" in rendered
