"""``podagent``: the daemon (``run``) and its config checker (``check-config``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__

if sys.argv[1:2] == ["node"]:  # a GPU server's node agent: keep modules it never uses out
    from agent.node.lean import trim_imports

    trim_imports()

from agent.config_base import ConfigError
from agent.node.cli import DEFAULT_NODE_CONFIG

if TYPE_CHECKING:  # agent.config (every controller model) is imported only by what needs it
    from agent.app import Agent
    from agent.config import AgentConfig

DEFAULT_CONFIG = Path("/etc/podagent/podagent.toml")


def _load(path: Path) -> AgentConfig | None:
    """The config with every profile it names, or None after printing each problem on one line."""
    from agent.config import load_config

    try:
        return load_config(path)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
    except Exception as err:  # a checker bug must still read as one line, never a traceback
        print(f"{path}: cannot be checked: {type(err).__name__}: {err}", file=sys.stderr)
    return None


def check_config(path: Path) -> int:
    from agent.node.cli import check_node_config, is_node_config

    if is_node_config(path):  # a [node] table: a GPU server's node agent config
        return check_node_config(path)
    config = _load(path)
    if config is None:
        return 1
    kinds: dict[str, int] = {}
    for dev in config.device:
        kinds[dev.kind] = kinds.get(dev.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"{path}: ok (pod {config.pod.site}/{config.pod.id}; {len(config.device)} devices: {summary})")
    return 0


# Young objects allocated between gen-0 collections (CPython's default 700): the poll loop's
# readings and frames die young by refcount; a collection every ~10,000 container allocations.
GC_GEN0_THRESHOLD = 10_000
EX_CONFIG = 78  # systemd's Restart=on-failure would loop on a bad file; the unit stops on 78


def run(path: Path) -> int:
    config = _load(path)
    if config is None:
        print("podagent: refusing to start with an invalid config", file=sys.stderr)
        return EX_CONFIG
    import asyncio

    from agent.aio import loop_factory
    from agent.app import Agent
    from agent.logs import configure_logging

    configure_logging(config.logging.level, config.logging.format)
    try:
        agent = Agent(config, config_path=path)
    except ConfigError as err:  # the files changed between the check and the build
        print(err.render(), file=sys.stderr)
        print("podagent: refusing to start with an invalid config", file=sys.stderr)
        return EX_CONFIG
    for factory in _services():
        service = factory(config)
        if service is not None:
            agent.add_service(service)
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(_run_frozen(agent))
    return 0


async def _run_frozen(agent: Agent) -> None:
    """The daemon, its start-up heap frozen once every device has answered: modules, config,
    profiles and per-point decoders are most of the heap and never garbage, yet each full
    collection walked them; the poll loop's short-lived objects are left to the young
    generations, collected less often (a pod's 24 PDUs polled at one instant allocate together:
    gen-0 ran ~60 times a minute at 0.5 ms each, ~8% of the agent's CPU at the SNMP bench)."""
    import asyncio
    import gc

    async def freeze_when_ready() -> None:
        await agent.ready.wait()
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])

    freezer = asyncio.get_running_loop().create_task(freeze_when_ready(), name="gc.freeze")
    try:
        await agent.run()
    finally:
        freezer.cancel()


def _services() -> list[Callable[[AgentConfig], Any]]:
    """The long-lived services (interlocks, MQTT, control socket, power), each built from the
    config. Imported directly: a service that cannot be imported is a broken install, and the
    daemon must not start without its interlocks."""
    from agent.control.server import build_service as control_service
    from agent.interlocks.service import build_service as interlock_service
    from agent.power.service import build_service as power_service
    from agent.publish.mqtt import build_service as mqtt_service

    return [interlock_service, mqtt_service, control_service, power_service]


def build_parser() -> argparse.ArgumentParser:
    """The command line (also what ``agent.manpages`` renders into podagent(1))."""
    parser = argparse.ArgumentParser(prog="podagent", description="The pod's edge agent.")
    parser.add_argument("--version", action="version", version=f"podagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run the agent in the foreground (systemd runs this)",
        description="Run the agent in the foreground: poll every device, run the interlocks, publish, "
        "serve podctl. Logs go to stderr (journald under systemd). Exits 78 on an invalid config.",
    )
    r.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"the config file ({DEFAULT_CONFIG})")
    n = sub.add_parser(
        "node",
        help="run a GPU server's node agent in the foreground",
        description="Run a GPU server's node agent: NVML on this server only, the node-local GPU "
        "rules, cap leases from the controller and a fail-safe when it is lost (docs/node.md).",
    )
    n.add_argument(
        "--config", type=Path, default=DEFAULT_NODE_CONFIG, help=f"the config file ({DEFAULT_NODE_CONFIG})"
    )
    c = sub.add_parser(
        "check-config",
        help="validate a config file (controller or node); print every problem",
        description="Validate a config file without starting anything: every problem is printed as "
        "file, key and what was expected; secret files (*_file keys) must be readable. "
        "Exit status 0 when valid, 1 otherwise.",
    )
    c.add_argument(
        "file", type=Path, nargs="?", default=DEFAULT_CONFIG, help=f"the config file ({DEFAULT_CONFIG})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "node":
        _lean_node_imports()
        from agent.node.cli import run_node

        return run_node(args.config)
    return run(args.config)


def _lean_node_imports() -> None:
    """Keep what a node agent never uses out of its memory (issue 12: <= 40 MB RSS on every GPU
    server): structlog's rich tracebacks (~4 MB resident; it logs JSON lines to journald, plain
    tracebacks do) and ssl (~1 MB: the pod protocol is HMAC-signed TCP, no TLS; asyncio runs
    without it). Both libraries fall back when the import fails."""
    for name in ("rich", "ssl"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
