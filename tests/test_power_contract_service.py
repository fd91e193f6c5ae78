"""The grid contract measured live by the PowerService on the site meter of a simulated pod
(Modbus): status says which term binds, Prometheus carries the per-term ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.interlocks.service import InterlockService
from agent.power.service import PowerService
from tests.agent_helpers import running_agent, until
from tests.conftest import start_pod, stop_pod
from tests.test_power_e2e import POWER, _pod_file

CONTRACT = """
[power.grid_contract]
import_limit_w = 15000.0
ramp_up_w_per_s = 2000.0
ramp_down_w_per_s = 2000.0
dynamic_range_w = 3000.0
dynamic_range_window_s = 5.0
band_share_max = 0.2
window_s = 10.0
evaluate_every_s = 0.5
"""


async def test_contract_is_measured_on_the_site_meter_and_names_the_binding_term(tmp_path: Path) -> None:
    sim = start_pod(tmp_path / "pod", str(_pod_file(tmp_path)))
    try:
        path = tmp_path / "podagent.toml"
        path.write_text(sim.agent_config(tmp_path / "state", extra=POWER + CONTRACT, poll_interval_s=0.5))
        config = load_config(path)
        assert config.power.grid_contract is not None
        power = PowerService(config.power)
        async with running_agent(path, services=[InterlockService(config.interlocks), power]) as agent:
            await until(
                agent,
                lambda: power.contract is not None and power.contract.report is not None,
                timeout=20.0,
                what="a contract evaluation",
            )
            status = agent.summary()["power"]["contract"]
            assert status["evaluated"] and status["rate_hz"] == 5.0
            terms = status["terms"]
            assert set(terms) == {
                "import_limit",
                "ramp_up_1s",
                "ramp_down_1s",
                "dynamic_range",
                "band_share",
            } | ({"ramp_up_0.2s", "ramp_down_0.2s"})  # 0.1 s is under one sample at 5 Hz
            assert status["binding"] in terms
            # The tiny pod draws ~6-9 kW steady: under the import limit, by the measured peak.
            grid = agent.store.value("site-meter", "power_w")
            assert grid is not None and terms["import_limit"]["measured"] >= grid * 0.5
            assert terms["import_limit"]["measured"] < 15000.0
            assert status["band_hz"] == [0.1, 2.5]  # the band a 5 Hz series can see
            names = {(m[0], tuple(m[1])) for m in power.metrics()}
            assert ("podagent_pod_grid_contract_binding", (("term", status["binding"]),)) in names
            assert any(n == "podagent_pod_grid_contract_ratio" for n, _ in names)
    finally:
        stop_pod(sim)


SOFT = """
[interlocks]
release_interval_s = 0.5
release_step_pct = 50.0

[power]
enabled = true
control_period_s = 0.2
site_meter = "site-meter"
ramp_limit_w_per_s = 500.0
no_battery_fallback = "soft_floor"
soft_floor_frac = 0.85
"""


async def test_soft_floor_fallback_plans_floors_and_caps_nothing(tmp_path: Path) -> None:
    sim = start_pod(tmp_path / "pod", str(_pod_file(tmp_path)))
    try:
        path = tmp_path / "podagent.toml"
        path.write_text(sim.agent_config(tmp_path / "state", extra=SOFT, poll_interval_s=0.5))
        config = load_config(path)
        power = PowerService(config.power)
        async with running_agent(path, services=[InterlockService(config.interlocks), power]) as agent:
            await until(agent, lambda: len(power.floors) == 8, timeout=20.0, what="filler floors for 8 GPUs")
            for gpu, floor in power.floor_source().items():
                draw = agent.store.value(gpu, "power_w")
                default = agent.store.value(gpu, "default_power_limit_w")
                assert draw is not None and default is not None
                assert 0.0 < floor <= default
                # Steady load: the floor is frac x the peak seen, so about frac x the draw.
                assert floor >= 0.85 * draw * 0.8
            assert not power.caps  # the ramp is not held with caps in this mode
            status = agent.summary()["power"]["allocation"]
            assert status["soft_floor_gpus"] == 8 and status["capped_gpus"] == 0
    finally:
        stop_pod(sim)


async def test_soft_floor_without_a_filler_backend_falls_back_on_trough_caps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every real GPU host today: no burn kernel, so the fake's filler call answers FUNCTION_NOT_FOUND
    # (read by the agent's NVML driver in this process).
    monkeypatch.setenv("HWSIM_NVML_FILLER", "0")
    sim = start_pod(tmp_path / "pod", str(_pod_file(tmp_path)))
    try:
        path = tmp_path / "podagent.toml"
        path.write_text(sim.agent_config(tmp_path / "state", extra=SOFT, poll_interval_s=0.5))
        config = load_config(path)
        power = PowerService(config.power)
        async with running_agent(path, services=[InterlockService(config.interlocks), power]) as agent:
            await until(
                agent,
                lambda: power.fallback_in_force == "trough_caps",
                timeout=20.0,
                what="the soft floor given up for trough caps",
            )
            # The ramp is now held with caps: the control step's budget comes from the ramp, and
            # no filler floor is planned or asked again.
            await until(
                agent,
                lambda: power.decision is not None and power.decision.budget_source == "grid_ramp",
                timeout=10.0,
                what="a ramp budget",
            )
            assert power.floors == {} and not any(w > 0.0 for w in power.filler_sent.values())
            (event,) = [e for e in agent.events.recent() if e.kind == "soft_floor_unavailable"]
            gpus = set(event.detail["gpus"])
            assert gpus and gpus <= {g for g in agent.store.devices() if g.startswith("gpu")}
            assert "no filler backend" in event.detail["reason"]
            assert event.detail["in_force"] == "trough_caps"
            # One event for the pod, not a settings failure per GPU, and no retries of the filler.
            assert not [e for e in agent.events.recent() if e.kind == "gpu_settings_failed"]
            status = agent.summary()["power"]
            assert status["allocation"]["no_battery_fallback"] == "trough_caps"
            assert status["gpu_smoothing"]["no_filler_backend_gpus"] == len(power.filler_unsupported) >= 1
            assert status["allocation"]["soft_floor_gpus"] == 0
    finally:
        stop_pod(sim)
