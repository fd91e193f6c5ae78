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
    c = sub.add_parser(
        "check-config",
        help="validate a config file; print every problem",
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
    return run(args.config)


if __name__ == "__main__":
    sys.exit(main())
