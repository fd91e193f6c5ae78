"""`podctl watch` in a real terminal (tmux): the screen refreshes with changing readings, and q or
Ctrl-C quits leaving the terminal sane (canonical mode and echo back on)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path

from agent.config import load_config
from agent.control.server import build_service
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod
from tests.test_podctl_pod import active_on, services
from tests.test_podctl_support import ROOT, sock_dir_fixture, socket_of  # noqa: F401  (fixture)


class Tmux:
    def __init__(self, name: str) -> None:
        self.base = ["tmux", "-L", name]  # a private tmux server: nothing shared with a user's tmux
        self.target = f"{name}:0"

    async def run(self, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.base, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, (args, err.decode())
        return out.decode()

    async def screen(self) -> str:
        return await self.run("capture-pane", "-p", "-t", self.target)

    async def keys(self, *keys: str) -> None:
        await self.run("send-keys", "-t", self.target, *keys)

    async def wait_for(self, predicate: object, within: float = 20, what: str = "") -> str:
        """A terminal has no event to await: re-read the pane until it shows what is expected."""
        deadline = time.monotonic() + within
        while True:
            text = await self.screen()
            if callable(predicate) and predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{text}")
            await asyncio.sleep(0.1)


def power_line(screen: str) -> str | None:
    for line in screen.splitlines():
        if line.startswith("Power"):
            return line
    return None


async def test_watch_refreshes_and_quits_on_q_and_ctrl_c_leaving_the_terminal_sane(
    tiny_pod: SimPod, sock_dir: Path
) -> None:
    config = sock_dir / "podagent.toml"
    config.write_text(tiny_pod.agent_config(sock_dir / "state"))
    name = f"podctl-{os.getpid()}"
    tmux = Tmux(name)
    async with running_agent(config, services=[build_service(load_config(config))]):
        env = f"PODAGENT_SOCKET={shlex.quote(str(socket_of(config)))} TERM=xterm-256color"
        python = shlex.quote(sys.executable)
        watch = f"cd {shlex.quote(str(ROOT))} && env {env} {python} -m agent.control.podctl watch"
        await tmux.run("new-session", "-d", "-s", name, "-x", "120", "-y", "40", "bash --norc --noprofile")
        try:
            await tmux.keys("PS1='$ '", "Enter")
            await tmux.keys(f"{watch} --interval 0.3", "Enter")
            first = await tmux.wait_for(
                lambda s: "q: quit" in s and power_line(s) is not None and "kW" in str(power_line(s)),
                what="the watch screen",
            )
            assert "cdu-1" in first and "Cooling" in first and "lab/tiny" in first
            # The pod's power comes from PDU readings that move every poll: the screen follows them.
            await tmux.wait_for(
                lambda s: power_line(s) is not None and power_line(s) != power_line(first),
                what="a new reading",
            )
            await tmux.keys("q")
            await tmux.wait_for(lambda s: "q: quit" not in s, what="watch to quit on q")
            await tmux.keys("clear; echo EXIT=$?", "Enter")
            await tmux.wait_for(lambda s: "EXIT=0" in s, what="exit status 0 after q")

            await tmux.keys(f"{watch}", "Enter")
            await tmux.wait_for(lambda s: "q: quit" in s, what="the watch screen again")
            await tmux.keys("C-c")
            await tmux.wait_for(lambda s: "q: quit" not in s, what="watch to quit on Ctrl-C")
            await tmux.keys("clear; echo EXIT=$?; stty -a", "Enter")
            screen = await tmux.wait_for(lambda s: "EXIT=" in s and "icanon" in s, what="stty output")
            assert "EXIT=0" in screen
            words = set(re.split(r"[\s;]+", screen))
            assert "icanon" in words and "-icanon" not in words, screen
            assert "echo" in words and "-echo" not in words, screen
            # Typed text echoes again: the terminal is usable.
            await tmux.keys("echo still-sane", "Enter")
            await tmux.wait_for(lambda s: s.count("still-sane") >= 2, what="echoed input")
        finally:
            await tmux.run("kill-server")


HEADERS = {
    "Cooling": ("supply", "return", "flow", "pump", "alarm", "load", "setpt"),
    "Active interlock": ("device", "since", "cap", "GPUs", "id"),
    "Capped GPUs": ("cap", "applied", "default", "by", "state"),
    "Override": ("interlock", "device", "expires in", "by", "reason"),
}


async def test_status_and_devices_fit_80_columns_with_whole_headers(tiny_pod: SimPod, sock_dir: Path) -> None:
    """A technician's 80x24 terminal: every table header whole (no ``pump/ru…``), the fleet link and
    its spool on one line, devices in natural order with their GPUs under them."""
    config = sock_dir / "podagent.toml"
    config.write_text(
        tiny_pod.agent_config(
            sock_dir / "state", extra='[mqtt]\nenabled = true\nbrokers = ["127.0.0.1:1883"]\n'
        )
    )
    name = f"podctl80-{os.getpid()}"
    tmux = Tmux(name)
    cfg = load_config(config)
    from agent.publish.mqtt import build_service as build_mqtt

    with_mqtt = [*services(config), build_mqtt(cfg)]
    async with running_agent(config, services=[s for s in with_mqtt if s is not None]) as agent:
        tiny_pod.fault("snmp-timeout", "pdu-b")  # sensor_stale: an interlock, caps and a stale device
        await until(agent, lambda: bool(active_on(agent, "pdu-b")), timeout=30, what="sensor_stale on pdu-b")
        env = f"PODAGENT_SOCKET={shlex.quote(str(socket_of(config)))} TERM=xterm-256color"
        podctl = (
            f"cd {shlex.quote(str(ROOT))} && env {env} {shlex.quote(sys.executable)} -m agent.control.podctl"
        )
        await tmux.run("new-session", "-d", "-s", name, "-x", "80", "-y", "60", "bash --norc --noprofile")
        try:
            await tmux.keys("PS1='$ '", "Enter")
            await tmux.keys(
                f"{podctl} override sensor_stale --device pdu-b --for 10m --reason 'card swap' && clear && "
                f"{podctl} status; echo DONE=$?",
                "Enter",
            )
            # DONE=<digit>: the typed command line itself shows "DONE=$?" before anything has run.
            screen = await tmux.wait_for(
                lambda s: re.search(r"DONE=\d", s) is not None, within=60, what="podctl status"
            )
            assert "DONE=0" in screen, screen
            assert "…" not in screen, screen
            lines = screen.splitlines()
            for title, columns in HEADERS.items():
                header = next((line for line in lines if line.startswith(title)), None)
                assert header is not None, (title, screen)
                words = header[len(title) :]
                for column in columns:
                    assert re.search(rf"(^|\s){re.escape(column)}(\s|$)", words), (column, header)
            mqtt = [line for line in lines if line.startswith("MQTT")]
            assert len(mqtt) == 1 and "spool" in mqtt[0] and "dropped" in mqtt[0], screen
            assert lines[lines.index(mqtt[0]) + 1].startswith("DONE="), screen  # nothing spills over

            # pdu-b goes stale on age before its first failed poll returns; its error line needs that.
            await until(
                agent,
                lambda: agent.store.health()["pdu-b"].last_error is not None,
                timeout=30,
                what="pdu-b's failed poll",
            )
            await tmux.keys(f"clear && {podctl} devices; echo DONE2=$?", "Enter")
            screen = await tmux.wait_for(
                lambda s: re.search(r"DONE2=\d", s) is not None, within=60, what="podctl devices"
            )
            assert "…" not in screen and "DONE2=0" in screen, screen
            header = next(line for line in screen.splitlines() if " device " in line)
            assert header.split() == [
                "device",
                "kind",
                "status",
                "age",
                "metrics",
                "bad",
                "polls",
                "fails",
            ]
            assert any(line.startswith("pdu-b: ") for line in screen.splitlines()), screen  # its error
            ids = [line.split()[0] for line in screen.splitlines() if line.startswith(" ") and "nvml" in line]
            assert ids == ["gpus", *(f"gpu{i}" for i in range(8))], screen
        finally:
            await tmux.run("kill-server")
