"""MQTT command payloads: strict JSON, strict numbers, strict encodings. Never raises, always a
reply with an error code, and nothing in the agent changes unless the command is valid."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from agent.app import Agent
from agent.config import load_config
from agent.publish.commands import COMMANDS, CommandHandler, ErrorCode
from agent.publish.mqtt import _dumps
from tests.fuzz.conftest import FUZZ

CODES = set(ErrorCode.__args__)  # type: ignore[attr-defined]
CONFIG = """
[pod]
site = "lab"
id = "fuzz"
[paths]
state_dir = "{state}"
[prometheus]
enabled = false
[[device]]
id = "host"
kind = "host"
"""


def make(tmp: Path) -> tuple[Agent, CommandHandler, list[int]]:
    path = tmp / "podagent.toml"
    path.write_text(CONFIG.format(state=tmp / "state"))
    agent = Agent(load_config(path))
    rebirths: list[int] = []
    handler = CommandHandler(
        agent,
        hmac_key=None,
        max_bytes=4096,
        max_ttl_s=3600,
        rebirth=lambda: rebirths.append(1),
        budget_min_w=1000.0,
        budget_max_w=100_000.0,
    )
    return agent, handler, rebirths


# Values that must never pass where a number belongs.
not_numbers = (
    st.booleans()
    | st.text(max_size=6)
    | st.sampled_from([math.inf, -math.inf, math.nan, 1e400, -1e400])
    | st.none()
    | st.lists(st.integers(), max_size=2)
)
fields = st.sampled_from(["watts", "ramp_w_per_s", "issued_at", "expires_at", "valid_until"])


def good_budget(**over: Any) -> dict[str, Any]:
    now = int(time.time() * 1000)  # now, not at import: a long test run would make it expired
    return {"id": "c1", "issued_at": now, "expires_at": now + 60_000, "watts": 5000.0, **over}


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # Infinity / NaN literals as a sender might


@FUZZ
@given(field=fields, bad=not_numbers)
def test_a_non_number_where_a_number_belongs_is_refused(tmp_path: Path, field: str, bad: Any) -> None:
    agent, handler, _ = make(tmp_path)
    obj = good_budget(**{field: bad})
    if field == "watts" and bad is None:
        obj["watts"] = None  # null clears the budget: valid, skip
        return
    if field in ("ramp_w_per_s", "valid_until") and bad is None:
        return  # optional: null is absent
    reply = handler.handle("set_power_budget", encode(obj))
    assert reply["ok"] is False and reply["error"] in ("schema", "not_json"), (obj, reply)
    assert agent.fleet_budget is None
    _dumps(reply)  # the reply is always publishable


@FUZZ
@given(watts=st.floats(allow_nan=False, allow_infinity=False))
def test_a_budget_outside_floor_and_site_limit_is_refused(tmp_path: Path, watts: float) -> None:
    agent, handler, _ = make(tmp_path)
    reply = handler.handle("set_power_budget", encode(good_budget(watts=watts)))
    if 1000.0 <= watts <= 100_000.0:
        assert reply["ok"] is True and agent.fleet_budget is not None
    else:
        assert reply["error"] == "schema" and agent.fleet_budget is None


@FUZZ
@given(
    name=st.sampled_from([*COMMANDS, ""]) | st.text(max_size=20),
    encoding=st.sampled_from(["utf-16", "utf-16-le", "utf-32", "utf-8-sig", "latin-1"]),
    text=st.text(min_size=1, max_size=30),
)
def test_non_utf8_payloads_are_not_json(tmp_path: Path, name: str, encoding: str, text: str) -> None:
    agent, handler, rebirths = make(tmp_path)
    obj = good_budget(note=text)
    try:
        payload = json.dumps(obj, ensure_ascii=False).encode(encoding)
    except UnicodeEncodeError:
        return
    if encoding == "latin-1" and payload.isascii():
        return  # latin-1 of ASCII is UTF-8
    reply = handler.handle(name, payload)
    assert reply["ok"] is False and reply["error"] in CODES
    assert agent.fleet_budget is None and not rebirths


@FUZZ
@given(name=st.sampled_from([*COMMANDS, ""]) | st.text(max_size=20), payload=st.binary(max_size=600))
def test_random_bytes_get_an_error_code(tmp_path: Path, name: str, payload: bytes) -> None:
    agent, handler, rebirths = make(tmp_path)
    reply = handler.handle(name, payload)
    assert reply["ok"] is False and reply["error"] in CODES
    assert agent.fleet_budget is None and not rebirths and not agent.events.acks
    _dumps(reply)


@FUZZ
@given(sig=st.text(max_size=80))
def test_any_signature_text_is_a_verdict_not_a_crash(tmp_path: Path, sig: str) -> None:
    path = tmp_path / "podagent.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    agent = Agent(load_config(path))
    handler = CommandHandler(agent, hmac_key=b"k", max_bytes=4096, max_ttl_s=3600, rebirth=lambda: None)
    reply = handler.handle("rebirth", json.dumps({**good_budget(), "sig": sig}).encode())
    assert reply["error"] in ("bad_signature", "missing_signature"), reply


@FUZZ
@given(
    value=st.recursive(
        st.floats() | st.integers() | st.text(max_size=5) | st.none(),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
        max_leaves=12,
    )
)
def test_the_envelope_always_serialises(value: Any) -> None:
    out = json.loads(_dumps({"x": value}))
    assert "x" in out
