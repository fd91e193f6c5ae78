"""``make demo``: the simulated demo pod, the agent against it, and a fault it handles, on screen.

Starts ``hwsim run --pod demo`` and ``podagent run --config config/demo.toml``, waits until the agent is
ready, shows ``podctl status``, injects a GPU thermal runaway, shows the interlock capping that GPU,
clears the fault, and leaves both running until Ctrl-C (or ``--duration`` seconds).
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


def ensure_broker() -> None:
    if broker_up():
        return
    if shutil.which("mosquitto"):
        conf = "/etc/mosquitto/mosquitto.conf"
        args = ["mosquitto", "-d"] + (["-c", conf] if Path(conf).exists() else ["-p", "1883"])
        subprocess.run(args, check=False)
        for _ in range(50):
            if broker_up():
                return
            time.sleep(0.1)
    print("demo: no MQTT broker on 127.0.0.1:1883; the agent will spool telemetry until one appears")


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
    ensure_broker()
    procs: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    stack = contextlib.ExitStack()
    try:
        say("starting the simulated demo pod (64 GPUs, 8 PDUs, CDU, chiller, Modbus RTU line)")
        pod_log = stack.enter_context(Path("/tmp/podagent-demo/hwsim.log").open("wb"))  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "hwsim.cli", "run", "--pod", "demo"],
                stdout=pod_log,
                stderr=subprocess.STDOUT,
            )
        )
        for _ in range(300):
            if MANIFEST.exists() or procs[0].poll() is not None:
                break
            time.sleep(0.1)
        if procs[0].poll() is not None:
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
            )
        )
        health = wait_ready(procs[1])
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
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        stack.close()
        say("demo stopped")


if __name__ == "__main__":
    sys.exit(main())
