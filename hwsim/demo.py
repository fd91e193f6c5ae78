"""``make demo``: the simulated demo pod, the agent against it, and a fault it handles, on screen.

Starts ``hwsim run --pod demo`` and ``podagent run --config config/demo.toml``, waits until the agent is
ready, shows ``podctl status``, injects a GPU thermal runaway, shows the interlock capping that GPU,
clears the fault, and leaves both running until Ctrl-C (or ``--duration`` seconds).

On the way out it leaves nothing it started: hwsim, the agent and a broker it had to start each run
in their own session and are stopped with everything in it (hwsim's socat for the RTU line), and
the pseudo-terminal links socat made are removed. The logs stay in /tmp/podagent-demo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "demo.toml"
MANIFEST = Path("/tmp/hwsim-demo/manifest.json")
SOCKET = "/tmp/podagent-demo/podagent.sock"
HEALTH = "http://127.0.0.1:9400/healthz"


def say(text: str) -> None:
    bold = "\033[1m" if sys.stdout.isatty() else ""
    reset = "\033[0m" if sys.stdout.isatty() else ""
    print(f"\n{bold}== {text}{reset}", flush=True)


def broker_up(port: int = 1883) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def ensure_broker(log: Path) -> subprocess.Popen[bytes] | None:
    """A broker on 127.0.0.1:1883: the one running, or one the demo starts (and stops at the end)."""
    if broker_up():
        print("   using the MQTT broker already on 127.0.0.1:1883")
        return None
    if shutil.which("mosquitto"):
        print("   starting mosquitto on 127.0.0.1:1883 (stopped with the demo)")
        # Without a config file mosquitto 2 listens on loopback only; in the foreground, so it is ours.
        with log.open("wb") as out:
            broker = subprocess.Popen(
                ["mosquitto", "-p", "1883"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        for _ in range(50):
            if broker_up():
                return broker
            time.sleep(0.1)
        stop([broker])
    print("demo: no MQTT broker on 127.0.0.1:1883; the agent will spool telemetry until one appears")
    return None


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each (newest first), then whatever is left in its session (hwsim's socat)."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)  # its own session: the group id is its pid


def remove_dangling_links(directory: Path) -> list[Path]:
    """socat's ``rtu0 -> /dev/pts/N`` links, once socat is gone, point nowhere: remove them."""
    removed = []
    if directory.is_dir():
        for path in directory.iterdir():
            if path.is_symlink() and not path.exists():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def wait_ready(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"demo: podagent exited with {proc.returncode}; see /tmp/podagent-demo/agent.log"
            )
        try:
            with urllib.request.urlopen(HEALTH, timeout=2) as resp:
                health: dict[str, object] = json.loads(resp.read())
                return health
        except urllib.error.HTTPError as err:
            last = json.loads(err.read() or b"{}")
            if last.get("ready"):
                return last
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"demo: the agent did not become ready in {timeout:.0f} s: {last}")


def podctl(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "agent.control.podctl", "--socket", SOCKET, *args], check=False)


def hwsim(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "hwsim.cli", *args, "--manifest", str(MANIFEST)],
        check=False,
        stdout=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hwsim.demo")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    Path("/tmp/podagent-demo").mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    stack = contextlib.ExitStack()
    try:
        say("MQTT broker")
        broker = ensure_broker(Path("/tmp/podagent-demo/mosquitto.log"))
        if broker is not None:
            procs.append(broker)
        say("starting the simulated demo pod (64 GPUs, 8 PDUs, CDU, chiller, Modbus RTU line)")
        pod_log = stack.enter_context(Path("/tmp/podagent-demo/hwsim.log").open("wb"))  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hwsim.cli", "run", "--pod", "demo"],
                stdout=pod_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        pod = procs[-1]
        for _ in range(300):
            if MANIFEST.exists() or pod.poll() is not None:
                break
            time.sleep(0.1)
        if pod.poll() is not None:
            print(Path("/tmp/podagent-demo/hwsim.log").read_text())
            return 1
        print(f"   endpoints: {MANIFEST}")
        say("starting podagent with config/demo.toml")
        agent_log = stack.enter_context(Path("/tmp/podagent-demo/agent.log").open("wb"))  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(CONFIG)],
                stdout=agent_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        health = wait_ready(procs[-1])
        print(f"   ready: first poll of every device done; /healthz says {health.get('status')}")
        say("podctl status")
        podctl("status")
        say("injecting a thermal runaway on gpu12 (hwsim fault gpu-runaway --device gpu12)")
        hwsim("fault", "gpu-runaway", "--device", "gpu12")
        time.sleep(12)
        podctl("interlocks")
        say("recent events")
        podctl("events", "--since", "1m")
        hwsim("fault", "gpu-runaway", "--device", "gpu12", "--clear")
        say("fault cleared: the cap releases in steps once gpu12 has been cool for 30 s")
        print("   try:  podctl --socket /tmp/podagent-demo/podagent.sock watch")
        print("         hwsim fault chiller-trip      (and --clear)")
        print("         curl -s 127.0.0.1:9400/metrics | grep DCGM_FI_DEV_GPU_TEMP")
        print("         mosquitto_sub -v -t 'podagent/v1/lab/demo-1/#'")
        print("   Ctrl-C stops the demo.")
        while args.duration is None or time.monotonic() - started < args.duration:
            if any(p.poll() is not None for p in procs):
                print("demo: a process exited; see /tmp/podagent-demo/*.log")
                return 1
            time.sleep(0.5)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop(procs)
        stack.close()
        for link in remove_dangling_links(MANIFEST.parent):
            print(f"   removed {link} (its pseudo-terminal is gone)")
        say("demo stopped (logs in /tmp/podagent-demo)")


if __name__ == "__main__":
    sys.exit(main())
