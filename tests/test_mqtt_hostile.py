"""Hostile and mistyped fleet commands over a real mosquitto, and the command state that must
survive a restart (seen ids, the budget in force)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.budget import FleetBudget
from agent.config import load_config
from agent.publish.commands import CommandHandler
from agent.publish.mqtt import _dumps
from tests.conftest_mqtt import Mosquitto, Subscriber, mqtt_toml, tiny_pod_process
from tests.test_mqtt_link import HMAC_KEY, ROOT_TOPIC, cmd, running_agent, signed, write_config


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tiny_pod_process(tmp_path_factory.mktemp("pod")) as manifest:
        yield manifest


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    b = Mosquitto()
    b.start()
    yield b
    b.close()


class Fleet:
    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub

    async def send(self, name: str, payload: bytes) -> dict[str, Any]:
        before = len(self.sub.on("/cmd_reply"))
        await self.sub.publish(f"{ROOT_TOPIC}/cmd/{name}", payload)
        replies = await self.sub.wait_for(lambda ms: self.sub.on("/cmd_reply")[before:] or None)
        return dict(replies[0].json())


def raw(obj: dict[str, Any], key: str, literal: str) -> bytes:
    """A command signed as the fleet would sign it (json.dumps writes inf as Infinity), with the
    value of ``key`` sent as the raw JSON text ``literal`` (1e400 parses to inf, signs the same)."""
    text = signed(obj).decode()
    return text.replace(f'"{key}": {json.dumps(obj[key])}', f'"{key}": {literal}').encode()


async def test_mistyped_and_non_finite_commands_are_refused_and_the_link_stays_up(
    pod: dict[str, Any], broker: Mosquitto, tmp_path: Path
) -> None:
    key = tmp_path / "cmd.key"
    key.write_bytes(HMAC_KEY)
    sub = await Subscriber(broker.port).start()
    mqtt = mqtt_toml([broker.port], command_hmac_key_file=str(key), command_budget_min_w=1000.0)
    async with running_agent(write_config(pod, tmp_path, mqtt)) as (agent, service):
        fleet = Fleet(sub)
        await sub.wait_for(lambda ms: sub.on("/birth"), timeout=15)
        utf16 = json.dumps(json.loads(signed(cmd("u16", watts=5000.0)))).encode("utf-16")
        non_ascii_sig = json.dumps({**cmd("sig1", watts=5000.0), "sig": "é" * 64}).encode()
        hostile = [
            (
                "set_power_budget",
                raw(cmd("inf", watts=5000.0, ramp_w_per_s=math.inf), "ramp_w_per_s", "Infinity"),
            ),
            (
                "set_power_budget",
                raw(cmd("big", watts=5000.0, ramp_w_per_s=math.inf), "ramp_w_per_s", "1e400"),
            ),
            ("set_power_budget", raw(cmd("nan", watts=math.nan), "watts", "NaN")),
            ("set_power_budget", signed(cmd("bool", watts=True))),
            ("set_power_budget", signed(cmd("str", watts="1000"))),
            ("set_power_budget", signed({**cmd("ib", watts=5000.0), "issued_at": True})),
            ("set_power_budget", signed({**cmd("is", watts=5000.0), "issued_at": "1"})),
            ("set_power_budget", signed(cmd("rb", watts=5000.0, ramp_w_per_s=True))),
            ("set_power_budget", signed(cmd("r0", watts=5000.0, ramp_w_per_s=0))),
            ("set_power_budget", signed(cmd("low", watts=1.0))),  # under the configured floor
        ]
        for name, payload in hostile:
            reply = await fleet.send(name, payload)
            assert reply["ok"] is False and reply["error"] in ("not_json", "schema"), (payload, reply)
        encodings = [utf16, b"\xef\xbb\xbf" + signed(cmd("bom", watts=5000.0))]
        for payload in encodings:
            reply = await fleet.send("set_power_budget", payload)
            assert reply["ok"] is False and reply["error"] == "not_json", reply
        reply = await fleet.send("set_power_budget", non_ascii_sig)
        assert reply["error"] == "bad_signature", reply
        reply = await fleet.send("", signed(cmd("empty")))
        assert reply["error"] == "unknown_command" and reply["id"] == "empty", reply
        assert agent.fleet_budget is None  # nothing changed
        # The link never dropped, and a good command still works and shows in the retained state.
        assert service.connects == 1 and service.link == "connected"
        ok = await fleet.send("set_power_budget", signed(cmd("good", watts=4200.0, ramp_w_per_s=50.0)))
        assert ok["ok"] is True and agent.fleet_budget is not None and agent.fleet_budget.watts == 4200.0
        states = await sub.wait_for(
            lambda ms: [
                m for m in sub.on("/state") if (m.json()["state"].get("fleet_budget") or {}).get("id")
            ]
        )
        assert states[-1].json()["state"]["fleet_budget"]["watts"] == 4200
        assert service.connects == 1
    await sub.stop()


async def test_replay_refused_and_budget_kept_across_a_restart(
    pod: dict[str, Any], broker: Mosquitto, tmp_path: Path
) -> None:
    key = tmp_path / "cmd.key"
    key.write_bytes(HMAC_KEY)
    sub = await Subscriber(broker.port).start()
    mqtt = mqtt_toml([broker.port], command_hmac_key_file=str(key))
    config = write_config(pod, tmp_path, mqtt)
    valid_until = int(time.time() * 1000) + 600_000
    budget = signed(cmd("keep-1", ttl_ms=600_000, watts=4300.0, valid_until=valid_until))
    async with running_agent(config) as (agent, _):
        await sub.wait_for(lambda ms: sub.on("/birth"), timeout=15)
        assert (await Fleet(sub).send("set_power_budget", budget))["ok"] is True
        assert (await Fleet(sub).send("rebirth", signed(cmd("once-2"))))["ok"] is True
    births = len(sub.on("/birth"))
    async with running_agent(config) as (agent, _):
        await sub.wait_for(lambda ms: len(sub.on("/birth")) > births, timeout=15)
        kept = agent.fleet_budget
        assert kept is not None and kept.watts == 4300.0 and kept.id == "keep-1"
        assert kept.expires_at_wall == valid_until / 1000.0
        assert (await Fleet(sub).send("set_power_budget", budget))["error"] == "replayed"
        assert (await Fleet(sub).send("rebirth", signed(cmd("once-2"))))["error"] == "replayed"
        assert agent.fleet_budget is not None and agent.fleet_budget.id == "keep-1"
    await sub.stop()


CONFIG = """
[pod]
site = "lab"
id = "unit"
[paths]
state_dir = "{state}"
[prometheus]
enabled = false
[[device]]
id = "host"
kind = "host"
"""


def handler_for(tmp: Path, state: Path) -> tuple[Agent, CommandHandler]:
    path = tmp / "podagent.toml"
    path.write_text(CONFIG.format(state=tmp / "state"))
    agent = Agent(load_config(path))
    return agent, CommandHandler(
        agent, hmac_key=None, max_bytes=4096, max_ttl_s=3600, rebirth=lambda: None, state_path=state
    )


@pytest.mark.parametrize(
    "content",
    [b"", b"\0\0\0", b"{not json", b"[1,2]", b'{"version":1,"seen":[],"budget":"x"}',
     b'{"version":1,"seen":{"a":"b"},"budget":{"watts":"NaN"}}', b"[" * 100_000],
)  # fmt: skip
def test_a_corrupt_state_file_is_ignored(tmp_path: Path, content: bytes) -> None:
    state = tmp_path / "commands.json"
    state.write_bytes(content)
    agent, handler = handler_for(tmp_path, state)
    assert agent.fleet_budget is None
    reply = handler.handle("set_power_budget", json.dumps(cmd("x1", watts=3000.0)).encode())
    assert reply["ok"] is True and json.loads(state.read_bytes())["budget"]["watts"] == 3000.0


def test_an_expired_budget_is_not_restored_and_an_unwritable_state_dir_is_a_condition(tmp_path: Path) -> None:
    state = tmp_path / "commands.json"
    old = FleetBudget(watts=3000.0, id="gone", expires_at_wall=time.time() - 1).to_dict()
    state.write_text(json.dumps({"version": 1, "seen": {}, "budget": old}))
    agent, _ = handler_for(tmp_path, state)
    assert agent.fleet_budget is None
    # A state path whose directory is a file: the write fails, the command still acts, one event.
    _, broken = handler_for(tmp_path, tmp_path / "commands.json" / "x")
    for n in range(3):
        assert broken.handle("set_power_budget", json.dumps(cmd(f"y{n}", watts=3000.0)).encode())["ok"]
    assert broken.state_fault is not None
    faults = [e for e in broken.agent.events.recent() if e.kind == "storage_fault"]
    assert len(faults) == 1 and faults[0].detail["store"] == "commands"


def test_the_envelope_never_fails_to_serialise() -> None:
    out = json.loads(_dumps({"a": math.inf, "b": [1.0, -math.inf, {"c": math.nan}], "d": "ok"}))
    assert out == {"a": None, "b": [1.0, None, {"c": None}], "d": "ok"}
