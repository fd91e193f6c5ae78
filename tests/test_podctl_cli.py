"""podctl's command line for a technician: every failure is one ``podctl:`` line with its exit
code, durations need a unit, ``--version``, and a v2c PDU that stays silent gets a hint."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent import __version__
from agent.config import load_config
from agent.control.podctl import OVERRIDE_FOR_HELP, fmt_limit, parse_duration
from agent.control.server import build_service
from agent.interlocks.config import DEFAULT_MAX_OVERRIDE_S, InterlockConfig
from tests.agent_helpers import running_agent
from tests.conftest import SimPod
from tests.test_podctl_support import (
    podctl,
    python_for_nobody,
    sock_dir_fixture,  # noqa: F401  (the sock_dir fixture)
    socket_of,
)


def _one_line(ran: object, err: str) -> None:
    assert err.startswith("podctl: ") and err.count("\n") == 1, ran


async def test_version_and_usage_errors_are_one_line() -> None:
    ran = await podctl(None, "--version")
    assert ran.rc == 0 and ran.out == f"podctl {__version__}\n", ran
    ran = await podctl(None, "no-such-command")
    assert ran.rc == 2, ran
    _one_line(ran, ran.err)
    ran = await podctl(None, "override", "gpu_overtemp", "--device", "gpu0", "--for", "30", "--reason", "x")
    assert ran.rc == 2 and "needs a unit" in ran.err and "30m" in ran.err, ran
    _one_line(ran, ran.err)


def test_durations_need_a_unit_and_the_help_states_the_daemons_limit() -> None:
    assert parse_duration("30m") == 1800 and parse_duration("2h") == 7200
    for bare in ("30", "1.5", " 90 "):
        try:
            parse_duration(bare)
        except Exception as err:
            assert "needs a unit" in str(err)
        else:
            raise AssertionError(f"{bare!r} accepted without a unit")
    # One constant: what the daemon grants by default is what the help quotes.
    assert InterlockConfig().max_override_s == DEFAULT_MAX_OVERRIDE_S
    assert f"at most {fmt_limit(DEFAULT_MAX_OVERRIDE_S)}" in OVERRIDE_FOR_HELP
    assert fmt_limit(3600) == "1h" and fmt_limit(5400) == "90m" and fmt_limit(45) == "45s"


async def test_a_socket_without_permission_is_one_podctl_line_exit_4(sock_dir: Path) -> None:
    python = await asyncio.to_thread(python_for_nobody)
    assert python is not None, "no interpreter that uid nobody can run with this project's packages"
    config = sock_dir / "podagent.toml"
    config.write_text(
        f"""[pod]
site = "lab"
id = "perm"
[paths]
state_dir = "{sock_dir}/state"
socket = "{sock_dir}/podagent.sock"
[prometheus]
enabled = false
[control]
read_group = "root"
[[device]]
id = "controller"
kind = "host"
"""
    )
    async with running_agent(config, services=[build_service(load_config(config))]):
        ran = await podctl(socket_of(config), "status", python=python, as_nobody=True)
    assert ran.rc == 4, ran
    assert "Invalid value" not in ran.err and "permission denied" in ran.err, ran
    _one_line(ran, ran.err)


async def test_a_v2c_timeout_hints_at_community_and_port(tiny_pod: SimPod, tmp_path: Path) -> None:
    config = tmp_path / "podagent.toml"
    text = tiny_pod.agent_config(tmp_path / "state")
    assert 'community = "public"' in text  # pdu-a is the tiny pod's v2c PDU
    config.write_text(text.replace('community = "public"', 'community = "wrong"', 1))
    ran = await podctl(None, "probe", "pdu-a", "--config", str(config), "--no-raw", within=60)
    assert ran.rc == 1, ran
    assert "timeout (SNMP v2c: check the community and port" in ran.out, ran


def test_ids_sort_naturally_and_children_follow_their_parent() -> None:
    from agent.control.render import device_order, natural_sorted

    assert natural_sorted(["gpu10", "gpu2", "gpu1", "gpu0"]) == ["gpu0", "gpu1", "gpu2", "gpu10"]
    assert natural_sorted(["pdu-a10", "pdu-b1", "pdu-a9"]) == ["pdu-a9", "pdu-a10", "pdu-b1"]
    devices = [{"id": f"gpu{i}", "parent": "gpus"} for i in (10, 2, 0, 11, 1)]
    devices += [{"id": "pdu-10"}, {"id": "gpus"}, {"id": "pdu-9"}, {"id": "cdu-1"}]
    assert [d["id"] for d in device_order(devices)] == [
        "cdu-1",
        "gpus",
        "gpu0",
        "gpu1",
        "gpu2",
        "gpu10",
        "gpu11",
        "pdu-9",
        "pdu-10",
    ]
