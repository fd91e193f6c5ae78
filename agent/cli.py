"""``podagent``: the daemon (``run``) and its config checker (``check-config``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import __version__
from agent.config import AgentConfig, ConfigError, load_config

DEFAULT_CONFIG = Path("/etc/podagent/podagent.toml")


def check_config(path: Path) -> int:
    from agent.node.cli import check_node_config, is_node_config

    if is_node_config(path):  # a [node] table: a GPU server's node agent config
        return check_node_config(path)
    try:
        config = load_config(path)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return 1
    kinds: dict[str, int] = {}
    for dev in config.device:
        kinds[dev.kind] = kinds.get(dev.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"{path}: ok (pod {config.pod.site}/{config.pod.id}; {len(config.device)} devices: {summary})")
    return 0


def run(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        print("podagent: refusing to start with an invalid config", file=sys.stderr)
        return 78  # EX_CONFIG: systemd's Restart=on-failure would loop; the unit stops on 78
    from agent.app import Agent
    from agent.logs import configure_logging

    configure_logging(config.logging.level, config.logging.format)
    agent = Agent(config, config_path=path)
    for factory in _services():
        service = factory(config)
        if service is not None:
            agent.add_service(service)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(agent.run())
    return 0


def _services() -> list[Callable[[AgentConfig], Any]]:
    """Optional long-lived services (interlocks, MQTT, control socket), each built from the config."""
    import importlib

    found = []
    for module, name in (
        ("agent.interlocks.service", "build_service"),
        ("agent.publish.mqtt", "build_service"),
        ("agent.control.server", "build_service"),
        ("agent.power.service", "build_service"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="podagent", description="The pod's edge agent.")
    parser.add_argument("--version", action="version", version=f"podagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the agent in the foreground (systemd runs this)")
    r.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    n = sub.add_parser("node", help="run a GPU server's node agent in the foreground")
    n.add_argument("--config", type=Path, default=Path("/etc/podagent/node.toml"))
    c = sub.add_parser(
        "check-config", help="validate a config file (controller or node); print every problem"
    )
    c.add_argument("file", type=Path, nargs="?", default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "node":
        from agent.node.cli import run_node

        return run_node(args.config)
    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
