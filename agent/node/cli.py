"""``podagent node`` and the node half of ``podagent check-config`` (dispatched from agent/cli.py)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

from agent.config_base import ConfigError
from agent.node.config import is_node_config, load_node_config
from agent.node.protocol import load_key

DEFAULT_NODE_CONFIG = Path("/etc/podagent/node.toml")


def check_node_config(path: Path) -> int:
    try:
        cfg = load_node_config(path)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return 1
    source = f"hwsim server {cfg.nvml.hwsim_server}" if cfg.nvml.library == "hwsim" else cfg.nvml.library
    print(
        f"{path}: ok (node {cfg.node.id}, listen {cfg.listen}, NVML {source}, "
        f"fail-safe {cfg.failsafe_cap_pct:g}% after {cfg.controller_lost_after_s:g} s)"
    )
    return 0


def run_node(path: Path) -> int:
    try:
        cfg = load_node_config(path)
        key = load_key(cfg.key_file)
    except (ConfigError, ValueError, OSError) as err:
        print(err.render() if isinstance(err, ConfigError) else f"{path}: {err}", file=sys.stderr)
        print("podagent node: refusing to start with an invalid config", file=sys.stderr)
        return 78  # EX_CONFIG: the unit does not restart on it
    # Usually done already by agent/cli.py, before pydantic and asyncio are imported.
    from agent.node.lean import trim_imports

    trim_imports()
    from agent.logs import configure_logging
    from agent.node.app import NodeAgent

    configure_logging(cfg.logging.level, cfg.logging.format)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(NodeAgent(cfg, key=key).run())
    return 0


__all__ = ["DEFAULT_NODE_CONFIG", "check_node_config", "is_node_config", "run_node"]
