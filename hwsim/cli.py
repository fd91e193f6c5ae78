"""``hwsim``: run a simulated pod, inject faults into a running one, look at it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import structlog

from hwsim.faults import FAULTS
from hwsim.nodes import NODE_FAULTS
from hwsim.podspec import PodSpecError, load_pod_spec
from hwsim.runner import PodRunner, control_request
from hwsim.scenario import load_scenario

DEFAULT_MANIFESTS = (Path("/tmp/hwsim-demo/manifest.json"),)


def _configure_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_manifest(explicit: str | None) -> Path:
    """The running pod's manifest: --manifest, else the demo pod's, else the only live one in /tmp."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise PodSpecError(f"no manifest at {path}: is the pod running?")
        return path
    candidates = [*DEFAULT_MANIFESTS, *sorted(Path("/tmp").glob("hwsim-*/manifest.json"))]
    for path in candidates:
        try:
            pid = json.loads(path.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            continue
        if _pid_alive(int(pid)):
            return path
    raise PodSpecError(
        "no running pod found (start one with `hwsim run --pod demo`, or pass --manifest PATH)"
    )


def _nodes_manifest(args: argparse.Namespace) -> dict[str, Any]:
    """The `hwsim nodes` manifest next to the running pod's."""
    path = find_manifest(args.manifest).parent / "nodes.json"
    if not path.is_file():
        raise PodSpecError(f"no node agents running for this pod (no {path}): start `hwsim nodes`")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def _run_nodes(args: argparse.Namespace) -> int:
    from hwsim.nodes import NodeFleet

    manifest_path = find_manifest(args.manifest)
    manifest = json.loads(manifest_path.read_text())
    fleet = NodeFleet(
        manifest,
        manifest_path.parent,
        key_file=Path(args.key_file) if args.key_file else None,
        poll_interval_s=args.poll_interval,
        controller_lost_after_s=args.lost_after,
        base_port=args.base_port,
    )
    try:
        nodes = await fleet.start()
        structlog.get_logger("hwsim").info(
            "node agents running", nodes=len(nodes["nodes"]), manifest=str(fleet.manifest_path)
        )
        await fleet.run()
    finally:
        await fleet.close()
    return 0


def _request(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    if request.get("cmd") == "fault" and request.get("name") in NODE_FAULTS:
        control = _nodes_manifest(args)["control"]
        try:
            return control_request(control, request)
        except OSError as err:
            raise PodSpecError(f"cannot reach the node agents at {control}: {err.strerror or err}") from err
    manifest = json.loads(find_manifest(args.manifest).read_text())
    try:
        return control_request(manifest["control"], request)
    except OSError as err:
        raise PodSpecError(f"cannot reach the pod at {manifest['control']}: {err.strerror or err}") from err


async def _run(args: argparse.Namespace) -> int:
    spec = load_pod_spec(args.pod)
    scenario = load_scenario(Path(args.scenario)) if args.scenario else None
    run_dir = Path(args.run_dir or spec.run_dir or f"/tmp/hwsim-{spec.name}")
    manifest_path = Path(args.manifest) if args.manifest else run_dir / "manifest.json"
    if manifest_path.exists():
        try:
            other = int(json.loads(manifest_path.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            other = 0
        if other and other != os.getpid() and _pid_alive(other):
            raise PodSpecError(f"a pod is already running with manifest {manifest_path} (pid {other})")
    runner = PodRunner(
        spec,
        seed=args.seed,
        speed=args.speed,
        run_dir=run_dir,
        manifest_path=manifest_path,
        scenario=scenario,
    )
    try:
        manifest = await runner.start()
    except OSError as err:
        raise PodSpecError(f"cannot start pod {spec.name}: {err}") from err
    log = structlog.get_logger("hwsim")
    log.info(
        "pod running",
        pod=spec.name,
        gpus=len(runner.physics.state.gpus),
        snmp=len(manifest["snmp"]),
        modbus=len(manifest["modbus"]),
        manifest=str(manifest_path),
        speed=args.speed,
    )
    try:
        await runner.run()
    finally:
        await runner.close()
        log.info("pod stopped", pod=spec.name, ticks=runner.ticks, late_ticks=runner.late_ticks)
    return 0


def _fault_value(name: str, text: str) -> float | str:
    """--value as the fault takes it: a number (an int where it is one), or bad-value's words."""
    if name == "bad-value":
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise PodSpecError(f"fault {name}: --value must be a number (got {text!r})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hwsim", description="A simulated pod speaking SNMP, Modbus and NVML."
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a simulated pod in the foreground")
    run.add_argument("--pod", default="demo", help="tiny, demo, full, or a pod file (TOML)")
    run.add_argument("--manifest", help="where to write the endpoint manifest (JSON)")
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--speed", type=float, default=1.0, help="simulated seconds per real second")
    run.add_argument("--run-dir", help="where the pod keeps its sockets and NVML state")
    run.add_argument("--scenario", help="a TOML timeline of faults and workload changes")

    fault = sub.add_parser("fault", help="inject or clear a fault in a running pod")
    all_faults = {**FAULTS, **NODE_FAULTS}
    fault.add_argument("name", choices=sorted(all_faults), metavar="NAME", help=", ".join(all_faults))
    fault.add_argument("--device", help="device id (default: the first the fault applies to)")
    fault.add_argument("--clear", action="store_true")
    fault.add_argument(
        "--value",
        help="xid: the XID number; snmp-slow: seconds; battery-fault: the bitmask;"
        " bad-value: nan, inf, -inf, garbage or a number",
    )
    fault.add_argument("--point", help="bad-value: the profile point (metric) to corrupt, e.g. supply_temp_c")
    fault.add_argument("--manifest")

    status = sub.add_parser("status", help="what a running pod is doing")
    status.add_argument("--manifest")
    status.add_argument("--state", action="store_true", help="dump the full device state as JSON")

    workload = sub.add_parser("workload", help="change the running pod's workload")
    workload.add_argument("profile", choices=["training", "synchronized", "steady", "idle"])
    workload.add_argument("--level", type=float)
    workload.add_argument("--manifest")

    sub.add_parser("faults", help="list the faults")

    agentconf = sub.add_parser("agent-config", help="print a podagent config for a running pod")
    agentconf.add_argument("--manifest")
    agentconf.add_argument("--state-dir", default="/var/lib/podagent")
    agentconf.add_argument(
        "--nodes", action="store_true", help="GPUs through the `hwsim nodes` agents (kind = node)"
    )
    agentconf.add_argument("--node", metavar="ID", help="print node ID's own config (e.g. srv-0)")

    nodes = sub.add_parser("nodes", help="run a podagent node per simulated server (foreground)")
    nodes.add_argument("--manifest")
    nodes.add_argument("--key-file", help="the pod key (default: RUN_DIR/pod.key, made if missing)")
    nodes.add_argument("--poll-interval", type=float, default=1.0)
    nodes.add_argument("--lost-after", type=float, default=10.0, help="controller_lost_after_s")
    nodes.add_argument("--base-port", type=int, default=0, help="server N listens on BASE+N (0: free)")

    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        if args.command == "run":
            return asyncio.run(_run(args))
        if args.command == "faults":
            for name, text in {**FAULTS, **NODE_FAULTS}.items():
                print(f"{name:18} {text}")
            return 0
        if args.command == "nodes":
            return asyncio.run(_run_nodes(args))
        if args.command == "agent-config":
            from hwsim.agentconf import NodeLayout, render_agent_config

            manifest = json.loads(find_manifest(args.manifest).read_text())
            if args.node:
                found = [n for n in _nodes_manifest(args)["nodes"] if n["id"] == args.node]
                if not found:
                    raise PodSpecError(f"no node {args.node!r} in this pod's node agents")
                sys.stdout.write(Path(found[0]["config"]).read_text())
                return 0
            layout = None
            if args.nodes:
                nm = _nodes_manifest(args)
                layout = NodeLayout(
                    key_file=nm["key_file"], ports={n["server"]: n["port"] for n in nm["nodes"]}
                )
            sys.stdout.write(render_agent_config(manifest, state_dir=args.state_dir, nodes=layout))
            return 0
        if args.command == "fault":
            request: dict[str, Any] = {
                "cmd": "fault",
                "name": args.name,
                "device": args.device,
                "clear": args.clear,
            }
            if args.value is not None:
                request["value"] = _fault_value(args.name, args.value)
            if args.point is not None:
                request["point"] = args.point
        elif args.command == "workload":
            request = {"cmd": "workload", "profile": args.profile, "level": args.level}
        else:
            request = {"cmd": "state" if args.state else "status"}
        reply = _request(args, request)
        if not reply.get("ok"):
            print(f"hwsim: {reply.get('error')}", file=sys.stderr)
            return 1
        reply.pop("ok")
        print(json.dumps(reply, indent=2))
        return 0
    except PodSpecError as err:
        print(f"hwsim: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
