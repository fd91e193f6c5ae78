"""The command parser under fuzz (hypothesis) and its signing recipe, without a broker: random
bytes and random JSON never raise out of the handler and never change the agent's state."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.app import Agent
from agent.config import load_config
from agent.publish.commands import COMMANDS, CommandHandler, canonical

KEY = b"fuzz-key"

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


def make(tmp: Path, key: bytes | None = KEY) -> tuple[Agent, CommandHandler, list[int]]:
    path = tmp / "podagent.toml"
    path.write_text(CONFIG.format(state=tmp / "state"))
    agent = Agent(load_config(path))
    rebirths: list[int] = []
    handler = CommandHandler(
        agent, hmac_key=key, max_bytes=4096, max_ttl_s=3600, rebirth=lambda: rebirths.append(1)
    )
    return agent, handler, rebirths


def unchanged(agent: Agent, rebirths: list[int]) -> bool:
    return agent.fleet_budget is None and not agent.events.acks and not rebirths


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
names = st.sampled_from([*COMMANDS, "", "x", "cmd/+", "../../etc"]) | st.text(max_size=30)
now_ms = int(time.time() * 1000)
command_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=10) | st.integers(),
        "issued_at": st.integers(min_value=-1, max_value=2 * now_ms),
        "expires_at": st.integers(min_value=-1, max_value=2 * now_ms),
        "watts": st.floats() | st.none() | st.text(max_size=5),
        "event_id": st.text(max_size=10),
        "device": st.text(max_size=10),
        "sig": st.text(max_size=70),
        "ramp_w_per_s": st.floats(),
    },
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(name=names, payload=st.binary(max_size=5000))
def test_random_bytes_never_raise_never_act(tmp_path: Path, name: str, payload: bytes) -> None:
    agent, handler, rebirths = make(tmp_path)
    reply = handler.handle(name, payload)
    assert reply["ok"] is False and isinstance(reply["error"], str)
    assert unchanged(agent, rebirths)


@FUZZ
@given(name=names, obj=json_values | command_like)
def test_random_json_without_a_valid_signature_never_acts(tmp_path: Path, name: str, obj: Any) -> None:
    agent, handler, rebirths = make(tmp_path)
    reply = handler.handle(name, json.dumps(obj).encode())
    assert reply["ok"] is False
    assert unchanged(agent, rebirths)
    json.dumps(reply)  # the reply itself is always publishable


@FUZZ
@given(name=names, obj=command_like)
def test_unsigned_mode_acts_only_on_valid_commands(tmp_path: Path, name: str, obj: dict[str, Any]) -> None:
    agent, handler, rebirths = make(tmp_path, key=None)
    reply = handler.handle(name, json.dumps(obj).encode())
    if not reply["ok"]:
        assert unchanged(agent, rebirths)
    else:
        assert name in COMMANDS and obj["expires_at"] > now_ms


def test_signing_recipe(tmp_path: Path) -> None:
    """The documented recipe, done by hand: the object without sig, sorted keys, compact JSON."""
    agent, handler, _ = make(tmp_path)
    now = int(time.time() * 1000)
    body = {"watts": 9000, "id": "s1", "issued_at": now, "expires_at": now + 60_000}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert canonical({**body, "sig": "x"}) == text.encode()
    sig = hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest()
    assert handler.handle("set_power_budget", json.dumps({**body, "sig": sig}).encode())["ok"]
    assert agent.fleet_budget is not None and agent.fleet_budget.watts == 9000
    assert [e.detail["id"] for e in agent.events.recent() if e.kind == "command"] == ["s1"]
