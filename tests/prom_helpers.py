"""Helpers for the Prometheus tests: free ports, scrapes, and the text format parsed strictly."""

from __future__ import annotations

import re
import urllib.request
from dataclasses import dataclass

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
        return body.decode()


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: str  # as printed

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass
class Exposition:
    helps: dict[str, str]
    types: dict[str, str]
    samples: list[Sample]

    def family_of(self, sample_name: str) -> str:
        for suffix in ("_bucket", "_sum", "_count"):
            base = sample_name.removesuffix(suffix)
            if base != sample_name and self.types.get(base) == "histogram":
                return base
        return sample_name

    def values(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {s.labels: float(s.value) for s in self.samples if s.name == name}


def parse(text: str) -> Exposition:
    """The 0.0.4 text format; a sample line with a third field (a timestamp) fails to parse."""
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: list[Sample] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_ = line[7:].partition(" ")
            helps[name] = help_
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"not a sample line without timestamp: {line!r}"
            labels = tuple(_LABEL.findall(m.group(2) or ""))
            samples.append(Sample(m.group(1), labels, m.group(3)))
    return Exposition(helps, types, samples)
