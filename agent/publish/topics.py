"""MQTT v1 topic names (``docs/mqtt.md``): everything under ``podagent/v1/{site}/{pod}``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[+#/\x00]")


def segment(name: str) -> str:
    """A device id as one topic level: MQTT wildcards and separators become ``_``."""
    return _UNSAFE.sub("_", name) or "_"


@dataclass(frozen=True)
class Topics:
    root: str

    @classmethod
    def for_pod(cls, site: str, pod: str, *, override: str | None = None) -> Topics:
        return cls(override or f"podagent/v1/{site}/{pod}")

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def birth(self) -> str:
        return f"{self.root}/birth"

    @property
    def state(self) -> str:
        return f"{self.root}/state"

    @property
    def event(self) -> str:
        return f"{self.root}/event"

    @property
    def cmd_filter(self) -> str:
        return f"{self.root}/cmd/+"

    @property
    def cmd_reply(self) -> str:
        return f"{self.root}/cmd_reply"

    def telemetry(self, device: str) -> str:
        return f"{self.root}/telemetry/{segment(device)}"

    def command_name(self, topic: str) -> str | None:
        """``{root}/cmd/poll_now`` -> ``poll_now``; ``{root}/cmd/`` -> ``""`` (``+`` matches an empty
        level: it gets its ``unknown_command`` reply like any other name); None for anything else."""
        prefix = f"{self.root}/cmd/"
        if not topic.startswith(prefix):
            return None
        name = topic[len(prefix) :]
        return name if "/" not in name else None
