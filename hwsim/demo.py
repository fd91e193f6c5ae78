"""``make demo``: the simulated demo pod, the agent against it, and a fault it handles, on screen.

Starts ``hwsim run --pod demo``, a node agent per GPU server (``hwsim nodes``: 8 real ``podagent
node`` processes) and the controller (``podagent run``) against them (``--no-nodes``: the controller
alone with config/demo.toml, one NVML device for the whole pod), waits until the agent is ready,
shows ``podctl status``, injects a GPU thermal runaway, shows the interlock capping that GPU,
clears the fault, and leaves them running until Ctrl-C (or ``--duration`` seconds).

On the way out it leaves nothing it started: hwsim, the node agents, the controller and a broker it
had to start each run in their own session and are stopped with everything in it (hwsim's socat for
the RTU line), and the pseudo-terminal links socat made are removed. The logs stay in
/tmp/podagent-demo.
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


# The controller's sections of config/demo.toml that `hwsim agent-config` does not write.
NODES_EXTRA = """[logging]
level = "info"

[prometheus]
enabled = true
listen = "127.0.0.1:9400"

[mqtt]
enabled = true
brokers = ["127.0.0.1:1883"]
"""


def start_node_agents(stack: contextlib.ExitStack, procs: list[subprocess.Popen[bytes]]) -> Path:
    """``hwsim nodes``: a real ``podagent node`` per simulated server (8 on the demo pod), each
    seeing only its server's GPUs; returns the controller's config for them (a `node` device per
    server, PDUs and loops wired by server), written next to the agent's log."""
    from hwsim.agentconf import NodeLayout, render_agent_config

    nodes_json = MANIFEST.parent / "nodes.json"
    with contextlib.suppress(FileNotFoundError):
        nodes_json.unlink()  # a previous run's
    log = stack.enter_context(Path("/tmp/podagent-demo/nodes.log").open("wb"))  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "hwsim.cli", "nodes", "--manifest", str(MANIFEST)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # stopped with its node agents and proxies (stop() kills the group)
    )
    procs.append(proc)
    for _ in range(600):
        if nodes_json.exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    if not nodes_json.exists():
        raise SystemExit("demo: the node agents did not start; see /tmp/podagent-demo/nodes.log")
    nodes = json.loads(nodes_json.read_text())
    layout = NodeLayout(key_file=nodes["key_file"], ports={n["server"]: n["port"] for n in nodes["nodes"]})
    print(f"   {len(nodes['nodes'])} node agents: {', '.join(n['id'] for n in nodes['nodes'])}")
    config = Path("/tmp/podagent-demo/controller.toml")
    manifest = json.loads(MANIFEST.read_text())
    config.write_text(
        render_agent_config(
            manifest, state_dir="/tmp/podagent-demo", pod_id="demo-1", extra=NODES_EXTRA, nodes=layout
        )
    )
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hwsim.demo")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument(
        "--no-nodes", action="store_true", help="one whole-pod NVML device instead of 8 node agents"
    )
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
        config = CONFIG
        if not args.no_nodes:
            say("starting a node agent per GPU server (hwsim nodes)")
            config = start_node_agents(stack, procs)
        say(f"starting podagent with {config}")
        agent_log = stack.enter_context(Path("/tmp/podagent-demo/agent.log").open("wb"))  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
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
