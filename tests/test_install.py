"""A real (non-editable) install: the wheel carries everything read at run time.

The wheel is built from this tree and installed with ``--no-deps`` into a fresh venv; the
dependencies come from the test venv through a path entry (a plain path: its .pth files, the
editable install's finder among them, are not processed), so only podagent itself is under test
and it is the wheel's copy. The full route with dependencies from scratch is ``make test-deb``.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        cwd=out,
        timeout=300,
    )
    (built,) = out.glob("podagent-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv") / "v"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=300,
    )
    (Path(site) / "podagent-test-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return env_dir


def test_wheel_carries_the_profiles(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    profiles = sorted(p.name for p in (ROOT / "agent" / "profiles").glob("*.toml"))
    assert profiles, "no profiles in agent/profiles"
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("agent/profiles/")) == profiles


def test_installed_wheel_checks_the_demo_config(installed: Path, tmp_path: Path) -> None:
    # Run outside the repository, so nothing can be imported from the source tree.
    run = subprocess.run(
        [str(installed / "bin" / "podagent"), "check-config", str(ROOT / "config" / "demo.toml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ok (pod" in run.stdout
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import agent.config as c; print(c.PROFILE_DIR)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(installed)), where


def test_installed_wheel_has_both_commands(installed: Path, tmp_path: Path) -> None:
    for command in ("podagent", "podctl"):
        run = subprocess.run(
            [str(installed / "bin" / command), "--help"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert run.returncode == 0, (command, run.stderr)


def test_installed_wheel_writes_man_pages_and_completion(installed: Path, tmp_path: Path) -> None:
    subprocess.run(
        [str(installed / "bin" / "python"), "-m", "agent.manpages", str(tmp_path / "man")],
        check=True,
        cwd=tmp_path,
        timeout=60,
    )
    for page in ("podagent.1", "podctl.1"):
        text = (tmp_path / "man" / page).read_text()
        assert text.startswith(".TH "), page
    # Every podctl command has its section; check-config has its description.
    podctl_page = (tmp_path / "man" / "podctl.1").read_text()
    for command in ("status", "watch", "override", "poll", "config check"):
        assert f'.SS "podctl {command}' in podctl_page, command
    assert "Validate a config file" in (tmp_path / "man" / "podagent.1").read_text()
    for shell, marker in (
        ("bash", "complete -o default -F _podctl_completion podctl"),
        ("zsh", "#compdef podctl"),
    ):
        run = subprocess.run(
            [str(installed / "bin" / "podctl")],
            env={"_PODCTL_COMPLETE": f"source_{shell}", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
        )
        assert run.returncode == 0 and marker in run.stdout, (shell, run.stdout, run.stderr)
