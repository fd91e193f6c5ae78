"""Helpers for the control-socket and podctl tests (no tests here): run podctl as a subprocess
while the daemon serves from the test's own event loop, a host-only agent config, a socket dir."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


class Ran:
    def __init__(self, rc: int, out: str, err: str) -> None:
        self.rc, self.out, self.err = rc, out, err

    def json(self) -> Any:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"rc={self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"


def podctl_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PODAGENT_SOCKET"}
    env.update(COLUMNS="160", PYTHONUNBUFFERED="1", **extra)
    return env


async def podctl(
    socket: Path | None, *args: str, python: str = sys.executable, as_nobody: bool = False, within: float = 30
) -> Ran:
    """Run ``python -m agent.control.podctl`` without blocking the loop the daemon serves from."""
    cmd = [python, "-m", "agent.control.podctl", *(("--socket", str(socket)) if socket else ()), *args]
    env = podctl_env()
    if as_nobody:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd="/" if as_nobody else ROOT,
        env=env,
        preexec_fn=_become_nobody if as_nobody else None,
    )
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


def _become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def python_for_nobody() -> str | None:
    """An interpreter uid nobody can run with this project's packages (the venv's may live under
    /root, which nobody cannot enter; the system python of the same minor version can use them)."""
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = podctl_env(PYTHONPATH=os.pathsep.join([str(ROOT), *site.getsitepackages()]))
    for candidate in (sys.executable, f"/usr/bin/python{minor}", shutil.which(f"python{minor}")):
        if not candidate:
            continue
        try:
            done = subprocess.run(
                [candidate, "-c", "import agent.control.podctl"],
                preexec_fn=_become_nobody,
                env=env,
                cwd="/",
                capture_output=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return candidate
    return None


@pytest.fixture(name="sock_dir")
def sock_dir_fixture() -> Iterator[Path]:
    """A short, world-traversable directory for the socket (tmp_path is 0700 and long)."""
    path = Path(tempfile.mkdtemp(prefix="pc-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def host_only_config(sock_dir: Path, *, extra: str = "") -> Path:
    """An agent with one device (this machine): the control socket without a simulated pod."""
    path = sock_dir / "podagent.toml"
    path.write_text(
        f"""[pod]
site = "lab"
id = "unit"

[paths]
state_dir = "{sock_dir}/state"
socket = "{sock_dir}/podagent.sock"

[prometheus]
enabled = false

[control]
# nobody's primary group: lets the test's uid-nobody client open the socket (reads only).
read_group = "nogroup"
{extra}
[[device]]
id = "controller"
kind = "host"
poll_interval_s = 0.5
"""
    )
    return path


def socket_of(config_path: Path) -> Path:
    from agent.config import load_config

    return load_config(config_path).paths.socket
