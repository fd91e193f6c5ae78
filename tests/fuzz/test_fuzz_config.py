"""Config and profile files through the public ``load_config``: whatever the bytes, a ConfigError
(with its problems) or a config, never another exception."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.config import ConfigError, load_config
from tests.fuzz.conftest import FUZZ

BASE: dict[str, Any] = {
    "pod": {"site": "lab", "id": "fuzz"},
    "paths": {"state_dir": "/tmp/podagent-fuzz-state"},
    "prometheus": {"enabled": False},
    "mqtt": {"enabled": False, "spool_max_bytes": 1 << 20},
    "control": {"max_connections": 10},
    "device": [
        {"id": "host", "kind": "host"},
        {"id": "pdu-a", "kind": "snmp", "host": "127.0.0.1", "port": 1161, "profile": "apc-rpdu2"},
        {"id": "cdu-1", "kind": "modbus", "host": "127.0.0.1", "port": 1502, "profile": "generic-cdu"},
    ],
}
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.just("../../etc/passwd")
)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def toml_value(v: Any) -> str:
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(v), repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"


def render(doc: dict[str, Any]) -> str:
    out = []
    for section, body in doc.items():
        if section == "device":
            for dev in body:
                out.append("[[device]]")
                out.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in dev.items())
        elif isinstance(body, dict):
            out.append(f"[{section}]")
            out.extend(f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items())
        else:
            out.append(f"{json.dumps(section)} = {toml_value(body)}")
    return "\n".join(out) + "\n"


def load(path: Path, text: str | bytes) -> None:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    try:
        load_config(path)
    except ConfigError as err:
        assert err.problems and str(err)


@FUZZ
@given(data=st.text(max_size=2000).map(str.encode) | st.binary(max_size=2000).filter(_utf8))
def test_random_text(tmp_path: Path, data: bytes) -> None:
    load(tmp_path / "podagent.toml", data)


def test_a_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    load(tmp_path / "podagent.toml", b'[pod]\nsite = "\x80"\n')


@FUZZ
@given(
    section=st.sampled_from(["pod", "paths", "mqtt", "control", "prometheus", "interlocks", "power"]),
    key=st.text(min_size=1, max_size=24)
    | st.sampled_from(["site", "id", "state_dir", "spool_max_bytes", "max_connections", "brokers"]),
    value=values,
)
def test_one_key_mutated(tmp_path: Path, section: str, key: str, value: Any) -> None:
    doc = json.loads(json.dumps(BASE))
    doc.setdefault(section, {})[key] = value
    load(tmp_path / "podagent.toml", render(doc))


@FUZZ
@given(
    index=st.integers(0, 2),
    key=st.sampled_from(["id", "kind", "host", "port", "profile", "poll_interval_s", "unit", "timeout_s"])
    | st.text(min_size=1, max_size=12),
    value=values,
)
def test_one_device_key_mutated(tmp_path: Path, index: int, key: str, value: Any) -> None:
    doc = json.loads(json.dumps(BASE))
    doc["device"][index][key] = value
    load(tmp_path / "podagent.toml", render(doc))


@FUZZ
@given(
    profile=st.binary(max_size=1500)
    | st.builds(
        lambda k, v: f"[{k}]\nname = {toml_value(v)}\n",
        st.sampled_from(["points", "tables", "metrics", "meta", "x"]),
        values,
    ),
    kind=st.sampled_from(["snmp", "modbus"]),
)
def test_a_profile_file(tmp_path: Path, profile: bytes | str, kind: str) -> None:
    path = tmp_path / "fuzz-profile.toml"
    if isinstance(profile, bytes):
        path.write_bytes(profile)
    else:
        path.write_text(profile)
    doc = json.loads(json.dumps(BASE))
    doc["device"][1 if kind == "snmp" else 2]["profile"] = str(path)
    load(tmp_path / "podagent.toml", render(doc))
