"""Scripted scenarios: a timeline of faults and workload changes in a TOML file.

name = "chiller trip and recovery"
[[step]]
at_s = 10                 # simulated seconds after the pod starts
fault = "chiller-trip"
device = "chiller-1"      # optional: the first matching device otherwise
[[step]]
at_s = 70
fault = "chiller-trip"
clear = true
[[step]]
at_s = 20
workload = "steady"       # training | synchronized | steady | idle
level = 0.95
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hwsim.faults import FAULTS
from hwsim.podspec import PodSpecError, one_line


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at_s: float = Field(ge=0)
    fault: str | None = None
    device: str | None = None
    clear: bool = False
    # A number for most faults; bad-value also takes "nan", "inf", "-inf", "garbage".
    value: int | float | str | None = None
    point: str | None = None  # bad-value: the profile point to corrupt
    workload: Literal["training", "synchronized", "steady", "idle"] | None = None
    level: float | None = Field(None, ge=0, le=1.2)

    @model_validator(mode="after")
    def _one_thing(self) -> Step:
        if (self.fault is None) == (self.workload is None):
            raise ValueError("a step sets exactly one of fault or workload")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r} (known: {', '.join(FAULTS)})")
        return self


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "scenario"
    step: list[Step] = Field(min_length=1)


def load_scenario(path: Path) -> Scenario:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise PodSpecError(f"{path}: no such scenario file") from err
    except tomllib.TOMLDecodeError as err:
        raise PodSpecError(f"{path}: not valid TOML: {err}") from err
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as err:
        raise PodSpecError(one_line(path, err)) from err
    scenario.step.sort(key=lambda s: s.at_s)
    return scenario
