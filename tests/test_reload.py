"""Transactional reload against the tiny pod: a broken file (a profile's TOML or schema, a
non-UTF-8 byte in the config) changes nothing, keeps polling and says why (an event naming file
and key; podctl gets a clear refusal); a valid reload applies interlock settings too."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

from agent.app import Agent
from agent.config import PROFILE_DIR, load_config
from agent.control.server import build_service as control_service
from agent.events import Event
from agent.interlocks.service import InterlockService, config_hash
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod
from tests.test_podctl_support import podctl, sock_dir_fixture  # noqa: F401  (the sock_dir fixture)


def _config(pod: SimPod, sock_dir: Path, extra: str = "") -> tuple[Path, Path]:
    """The tiny pod's agent config, its CDU on a copy of generic-cdu.toml (so a test can break it)."""
    cdu = sock_dir / "my-cdu.toml"
    cdu.write_text((PROFILE_DIR / "generic-cdu.toml").read_text())
    text = pod.agent_config(sock_dir / "state", extra=extra)
    text = text.replace('profile = "generic-cdu"', f'profile = "{cdu}"', 1)
    path = sock_dir / "podagent.toml"
    path.write_text(text)
    load_config(path)  # the starting point is valid
    return path, cdu


def _failed_events(agent: Agent) -> list[Event]:
    return [e for e in agent.events.recent(limit=2000) if e.kind == "config_reload_failed"]


async def test_broken_files_change_nothing_and_polling_goes_on(tiny_pod: SimPod, sock_dir: Path) -> None:
    path, cdu = _config(tiny_pod, sock_dir)
    good_profile = cdu.read_text()
    good_config = path.read_bytes()
    cases: list[tuple[str, Callable[[], None], str, str]] = [
        # (what, break it, the file named, the key named)
        (
            "TOML error in a profile",
            lambda: cdu.write_text(good_profile.replace('kind = "cdu"', 'kind = "cdu')),
            str(cdu),
            "(syntax)",
        ),
        (
            "schema error in a profile",
            lambda: cdu.write_text(good_profile.replace('type = "int16"', 'type = "int61"', 1)),
            str(cdu),
            "points[0](metric=supply_temp_c).type",
        ),
        (
            "non-UTF-8 byte in the config",
            lambda: path.write_bytes(good_config.replace(b'site = "', b'site = "\xff', 1)),
            str(path),
            "(encoding)",
        ),
    ]
    services = [control_service(load_config(path))]
    async with running_agent(path, services=services) as agent:
        socket = load_config(path).paths.socket
        config_before = agent.config
        cdu_poller = agent.pollers["cdu-1"]
        pollers_before = dict(agent.pollers)
        for what, breakage, file, key in cases:
            for via in ("SIGHUP", "podctl"):
                breakage()
                failed = len(_failed_events(agent))
                polls = cdu_poller.stats.polls
                if via == "SIGHUP":
                    os.kill(os.getpid(), signal.SIGHUP)
                else:
                    ran = await podctl(socket, "reload")
                    assert ran.rc == 1, (what, ran)
                    assert "internal error" not in ran.err and "reload refused" in ran.err, (what, ran)
                    assert file in ran.err and key in ran.err, (what, ran)
                await until(
                    agent, lambda n=failed: len(_failed_events(agent)) > n, what=f"{what}: error event"
                )
                event = _failed_events(agent)[-1]
                assert event.detail["file"] == file and event.detail["key"] == key, (what, event.detail)
                # Nothing changed, and cdu-1 (the device whose profile broke) is still polled.
                await until(agent, lambda p=polls: cdu_poller.stats.polls >= p + 2, what=f"{what}: polling")
                assert agent.config is config_before and agent.reloads == 0
                assert agent.pollers == pollers_before
                assert agent.store.get("cdu-1", "supply_temp_c") is not None
            cdu.write_text(good_profile)
            path.write_bytes(good_config)
        # Fixed: the reload applies (nothing changed, so nothing restarts).
        ran = await podctl(socket, "reload")
        assert ran.rc == 0, ran
        assert agent.reloads == 1 and agent.pollers["cdu-1"] is cdu_poller


async def test_a_reloaded_interlock_threshold_takes_effect(tiny_pod: SimPod, sock_dir: Path) -> None:
    """[interlocks.gpu_overtemp] trip_c lowered under the GPUs' temperature: the hash changes
    (podctl status shows it) and the GPUs are capped. Before, reload applied devices only."""
    path, _ = _config(tiny_pod, sock_dir, extra="[interlocks.gpu_overtemp]\nclear_hold_s = 1.0\n")
    config = load_config(path)
    interlocks = InterlockService(config.interlocks)
    async with running_agent(path, services=[interlocks, control_service(config)]) as agent:
        socket = load_config(path).paths.socket
        await until(agent, lambda: interlocks.engine is not None, what="interlocks armed")
        old_hash = config_hash(config.interlocks)
        assert interlocks.status()["config_hash"] == old_hash
        await until(
            agent,
            lambda: all(
                (r := agent.store.get(f"gpu{i}", "temp_c")) is not None and r.value for i in range(8)
            ),
            what="GPU temperatures",
        )
        coolest = min(agent.store.value(f"gpu{i}", "temp_c") or 0.0 for i in range(8))
        trip = max(int(coolest) - 5, 25)
        path.write_text(
            path.read_text().replace(
                "[interlocks.gpu_overtemp]\nclear_hold_s = 1.0\n",
                "[interlocks.gpu_overtemp]\nclear_hold_s = 1.0\n"
                f"trip_c = {trip}.0\nclear_c = {trip - 10}.0\n",
            )
        )
        os.kill(os.getpid(), signal.SIGHUP)
        await until(agent, lambda: agent.reloads == 1, what="reload applied")
        new_hash = config_hash(load_config(path).interlocks)
        assert new_hash != old_hash and interlocks.status()["config_hash"] == new_hash
        reloaded = [e for e in agent.events.recent(limit=2000) if e.kind == "config_reloaded"]
        assert reloaded and reloaded[-1].detail["interlocks_changed"] is True
        assert reloaded[-1].detail["interlock_config_hash"] == new_hash

        def overtemp_caps() -> bool:
            caps = interlocks.status()["caps"]
            return all("gpu_overtemp" in caps.get(f"gpu{i}", {}).get("by", []) for i in range(8))

        await until(agent, overtemp_caps, what="gpu_overtemp caps at the reloaded trip_c")
        ran = await podctl(socket, "status", "--json")
        assert ran.rc == 0, ran
        assert json.loads(ran.out)["interlocks"]["config_hash"] == new_hash


async def test_power_and_interlock_settings_reload_without_devices(sock_dir: Path) -> None:
    """A reload that changes only [power] and [interlocks]: no device restarts, both services
    run with the new settings (before, reload applied devices only)."""
    from agent.power.service import build_service as power_service
    from tests.test_podctl_support import host_only_config

    path = host_only_config(sock_dir, extra="\n[power]\nenabled = true\nsite_limit_w = 50000.0\n")
    config = load_config(path)
    power = power_service(config)
    interlocks = InterlockService(config.interlocks)
    assert power is not None
    async with running_agent(path, services=[power, interlocks]) as agent:
        poller = agent.pollers["controller"]
        text = path.read_text().replace("site_limit_w = 50000.0", "site_limit_w = 42000.0")
        path.write_text(text + "\n[interlocks.gpu_overtemp]\ntrip_c = 70.0\nclear_c = 60.0\n")
        assert await agent.reload()
        assert power.config.site_limit_w == 42000.0
        assert interlocks.config.gpu_overtemp.trip_c == 70.0
        assert agent.pollers["controller"] is poller  # the device did not change: not restarted
        reloaded = [e for e in agent.events.recent(limit=200) if e.kind == "config_reloaded"][-1]
        assert reloaded.detail["changed_devices"] == [] and reloaded.detail["power_changed"] is True
