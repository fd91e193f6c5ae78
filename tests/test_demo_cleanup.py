"""``make demo`` leaves nothing it started: what a child leaves in its session (hwsim's socat) is
stopped with it, and socat's pseudo-terminal links that point nowhere are removed.
(The whole demo is not run here: its fixed ports would collide with a demo someone is running.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hwsim.demo import remove_dangling_links, stop


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (reaped by init once its parent is gone).
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_stop_takes_what_a_child_left_in_its_session(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    # The child starts a long-lived grandchild (like hwsim's socat) and exits on SIGTERM without it.
    script = (
        "import subprocess, sys, time, signal\n"
        "g = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "time.sleep(300)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the child never started its grandchild"
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert _alive(grandchild)
    stop([child])
    assert child.returncode == 0
    deadline = time.monotonic() + 10
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the grandchild outlived the demo"
        time.sleep(0.05)


def test_dangling_links_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    (tmp_path / "rtu0").symlink_to("/dev/pts/does-not-exist")
    (tmp_path / "kept").symlink_to(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    assert remove_dangling_links(tmp_path) == [tmp_path / "rtu0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "manifest.json"]
    assert remove_dangling_links(tmp_path / "missing") == []
