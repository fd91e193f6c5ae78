"""bench/grid_ramp.py's output contract: one JSON object per case with the agreed keys, the series
CSVs, and the fallback's work above the old trough capping (short run, in-process physics)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import grid_ramp


def test_json_and_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--seconds", "45", "--rounds", "1", "--only", "software", "--only", "trough_caps", "--json"]
    assert grid_ramp.main([*argv, "--series", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["case"] for r in rows] == ["none", "software", "trough_caps"]
    for r in rows:
        for key in (
            "case",
            "peak_w",
            "max_ramp_w_per_s_100ms",
            "band_share",
            "work_ratio",
            "extra_energy_ratio",
        ):
            assert r[key] is not None, key
        assert 0.0 <= r["band_share"] <= 1.0
    by = {r["case"]: r for r in rows}
    assert by["none"]["work_ratio"] == 1.0
    assert by["software"]["work_ratio"] > by["trough_caps"]["work_ratio"]
    with (tmp_path / "software.csv").open() as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["t_s", "grid_w"]
    t = [float(x[0]) for x in lines[1:]]
    assert t[1] - t[0] == pytest.approx(0.025)
