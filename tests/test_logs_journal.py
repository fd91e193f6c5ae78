"""journald priorities: with JOURNAL_STREAM naming stderr, each line starts with its sd-daemon(3)
``<N>`` priority and is still one JSON object; interlock trips are warnings, their clears info."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SimPod

LINE = re.compile(r"^<(\d)>(\{.*\})$")

LOGGER = """
import logging, structlog
from agent.logs import configure_logging
configure_logging("debug", "auto")
log = structlog.get_logger("t")
log.debug("d"); log.info("i", n=1); log.warning("w"); log.error("e"); log.critical("c")
logging.getLogger("pysnmp.x").error("from a library")
"""


def _journal_env(stderr_file: Path) -> dict[str, str]:
    st = os.stat(stderr_file)
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def _run_logger(tmp_path: Path, journal: bool) -> list[str]:
    err = tmp_path / "stderr"
    err.touch()
    env = _journal_env(err) if journal else {**os.environ, "JOURNAL_STREAM": "1:1"}
    with err.open("w") as f:
        subprocess.run([sys.executable, "-c", LOGGER], stderr=f, env=env, check=True, timeout=60)
    return err.read_text().splitlines()


def test_priorities_when_stderr_is_the_journal(tmp_path: Path) -> None:
    lines = _run_logger(tmp_path, journal=True)
    parsed = [LINE.match(line) for line in lines[:5]]
    assert all(parsed), lines
    got = [(int(m.group(1)), json.loads(m.group(2))["event"]) for m in parsed if m]
    assert got == [(7, "d"), (6, "i"), (4, "w"), (3, "e"), (2, "c")]
    assert lines[5] == "<3>ERROR pysnmp.x: from a library"


def test_no_prefix_when_journal_stream_names_another_file(tmp_path: Path) -> None:
    # An inherited JOURNAL_STREAM with stderr redirected elsewhere: plain JSON lines.
    lines = _run_logger(tmp_path, journal=False)
    assert [json.loads(line)["event"] for line in lines[:5]] == ["d", "i", "w", "e", "c"]


BROKEN = """
import structlog
from agent.logs import configure_logging
configure_logging("info", "json")
log = structlog.get_logger("t")

class Unprintable:
    def __repr__(self) -> str:
        raise OSError(24, "Too many open files")

log.error("value with no repr", thing=Unprintable())
log.info("after")
"""


def test_a_line_that_cannot_be_rendered_degrades_and_never_raises(tmp_path: Path) -> None:
    """A poll loop or an interlock step logs: its log line must never be what stops it."""
    err = tmp_path / "stderr"
    with err.open("w") as f:
        ran = subprocess.run([sys.executable, "-c", BROKEN], stderr=f, timeout=60, check=False)
    lines = err.read_text().splitlines()
    assert ran.returncode == 0, lines
    assert lines[0].startswith("error value with no repr (log line not rendered: OSError"), lines
    assert json.loads(lines[1])["event"] == "after"


def _wait_line(path: Path, pattern: str, within: float) -> re.Match[str]:
    deadline = time.monotonic() + within
    rx = re.compile(pattern, re.MULTILINE)
    while time.monotonic() < deadline:
        m = rx.search(path.read_text())
        if m:
            return m
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} within {within} s:\n{path.read_text()[-3000:]}")


def test_daemon_logs_trip_as_warning_and_clear_as_info(tiny_pod: SimPod, tmp_path: Path) -> None:
    config = tmp_path / "podagent.toml"
    config.write_text(tiny_pod.agent_config(tmp_path / "state"))
    err = tmp_path / "stderr"
    err.touch()
    with err.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stderr=f,
            stdout=subprocess.DEVNULL,
            env=_journal_env(err),
        )
    try:
        _wait_line(err, r'^<6>\{.*"event": "interlocks armed"', 60)
        tiny_pod.fault("snmp-timeout", "pdu-a")
        _wait_line(err, r'^<4>\{.*"event": "sensor_stale tripped on pdu-a', 30)
        tiny_pod.fault("snmp-timeout", "pdu-a", clear=True)
        _wait_line(err, r'^<6>\{.*"event": "sensor_stale cleared on pdu-a"', 60)
        for line in err.read_text().splitlines():
            m = LINE.match(line)
            assert m, f"a line without priority or not one JSON object: {line!r}"
            entry = json.loads(m.group(2))
            if "cleared" in entry["event"] or entry["event"] == "device up":
                assert m.group(1) == "6", line
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif(
    not Path("/run/systemd/system").is_dir() or shutil.which("systemd-run") is None,
    reason="no running systemd here (a container): journalctl -p cannot be checked against a real journal",
)
def test_real_journal_files_warnings_at_warning(tmp_path: Path) -> None:
    unit = f"podagent-logtest-{os.getpid()}"
    subprocess.run(
        [
            "systemd-run",
            "--unit",
            unit,
            "--wait",
            "--collect",
            f"--working-directory={Path(__file__).resolve().parent.parent}",
            sys.executable,
            "-c",
            LOGGER,
        ],
        check=True,
        timeout=60,
    )
    shown = subprocess.run(
        ["journalctl", "-u", unit, "-p", "warning", "-o", "cat", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"event": "w"' in shown and '"event": "i"' not in shown
