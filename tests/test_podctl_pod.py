"""podctl, as a subprocess, against the daemon (in this test's loop) watching a simulated `tiny` pod,
through the real control socket: status with a tripped interlock, overrides and their expiry,
ack, --json agreeing with the daemon, poll now, probe without the daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.app import Agent
from agent.config import load_config
from agent.control.server import build_service as build_control
from agent.events import Event
from agent.interlocks.service import build_service as build_interlocks
from agent.model import Quality
from tests.agent_helpers import running_agent, until
from tests.conftest import SimPod
from tests.test_podctl_support import podctl, sock_dir_fixture, socket_of  # noqa: F401  (fixture)


def pod_config(tiny_pod: SimPod, sock_dir: Path) -> Path:
    path = sock_dir / "podagent.toml"
    path.write_text(tiny_pod.agent_config(sock_dir / "state"))
    return path


def services(config: Path) -> list[object]:
    cfg = load_config(config)
    return [s for s in (build_interlocks(cfg), build_control(cfg)) if s is not None]


def active_on(agent: Agent, device: str) -> list[dict[str, object]]:
    service = getattr(agent, "interlocks", None)
    if service is None:
        return []
    return [a for a in service.status()["active"] if a["device"] == device]


async def wait_event(agent: Agent, kind: str, within: float = 15) -> Event:
    seen = [e for e in agent.events.recent() if e.kind == kind]
    if seen:
        return seen[-1]
    got: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

    def on_event(e: Event) -> None:
        if e.kind == kind and not got.done():
            got.set_result(e)

    unsubscribe = agent.events.subscribe(on_event)
    try:
        async with asyncio.timeout(within):
            return await got
    finally:
        unsubscribe()


async def test_status_shows_a_tripped_interlock_and_overrides_expire(
    tiny_pod: SimPod, sock_dir: Path
) -> None:
    config = pod_config(tiny_pod, sock_dir)
    async with running_agent(config, services=services(config)) as agent:
        sock = socket_of(config)
        ran = await podctl(sock, "status")
        assert ran.rc == 0, ran
        assert "lab/tiny" in ran.out and "cdu-1" in ran.out and "chiller-1" in ran.out
        assert "none active" in ran.out and "L/min" in ran.out and " kW" in ran.out
        # The interlock settings in force, as the MQTT birth and the reload event name them.
        assert agent.interlocks is not None
        assert f"config {agent.interlocks.status()['config_hash']}" in ran.out

        tiny_pod.fault("gpu-runaway", "gpu3")
        await until(agent, lambda: bool(active_on(agent, "gpu3")), timeout=20, what="interlock on gpu3")
        ran = await podctl(sock, "status")
        assert ran.rc == 0, ran
        tripped = {a["interlock"] for a in active_on(agent, "gpu3")}
        assert any(name in ran.out for name in tripped), ran
        assert "Active interlock" in ran.out and "gpu3" in ran.out

        # --json is the daemon's own view.
        ran = await podctl(sock, "interlocks", "--json")
        assert ran.rc == 0, ran
        shown = ran.json()
        assert shown["running"] is True
        assert {(a["interlock"], a["device"]) for a in shown["interlocks"]["active"]} >= {
            (name, "gpu3") for name in tripped
        }
        trip_id = str(active_on(agent, "gpu3")[0]["id"])

        # Ack the trip (as root: allowed), audited with the caller.
        ran = await podctl(sock, "ack", trip_id)
        assert ran.rc == 0, ran
        assert trip_id in agent.events.acks and "root" in agent.events.acks[trip_id].by

        # Override one tripped interlock for 8 s (two podctl runs must fit in it on a busy
        # machine): listed with its reason, then it expires by itself.
        name = sorted(tripped)[0]
        ran = await podctl(
            sock, "override", name, "--device", "gpu3", "--for", "8s", "--reason", "burn-in test"
        )
        assert ran.rc == 0, ran
        overrides = agent.interlocks.overrides()
        assert [(o["interlock"], o["device"], o["reason"]) for o in overrides] == [
            (name, "gpu3", "burn-in test")
        ]
        assert "root" in overrides[0]["by"]
        ran = await podctl(sock, "interlocks")
        assert "burn-in test" in ran.out and "overridden" in ran.out, ran
        expired = await wait_event(agent, "override_expired", within=30)
        assert expired.detail["id"] == overrides[0]["id"]
        assert agent.interlocks.overrides() == []
        ran = await podctl(sock, "interlocks", "--json")
        assert ran.json()["interlocks"]["overrides"] == []

        # An override cleared early; a bad one refused with the service's reason, nothing added.
        ran = await podctl(
            sock, "override", name, "--device", "gpu3", "--for", "30m", "--reason", "x", "--json"
        )
        assert ran.rc == 0, ran
        ov_id = ran.json()["id"]
        ran = await podctl(sock, "override", "clear", ov_id)
        assert ran.rc == 0 and agent.interlocks.overrides() == [], ran
        ran = await podctl(
            sock, "override", "no_such_interlock", "--device", "gpu3", "--for", "5m", "--reason", "x"
        )
        assert ran.rc == 1 and "unknown interlock" in ran.err, ran
        ran = await podctl(sock, "override", "clear", "ov-999")
        assert ran.rc == 1 and "no override" in ran.err, ran
        assert agent.interlocks.overrides() == []
        tiny_pod.fault("gpu-runaway", "gpu3", clear=True)


async def test_json_matches_the_daemon_and_poll_shows_raw_and_scaled(
    tiny_pod: SimPod, sock_dir: Path
) -> None:
    config = pod_config(tiny_pod, sock_dir)
    async with running_agent(config, services=services(config)) as agent:
        sock = socket_of(config)
        ran = await podctl(sock, "status", "--json")
        assert ran.rc == 0, ran
        status = ran.json()
        summary = agent.summary()
        assert (status["site"], status["pod"]) == (summary["site"], summary["pod"])
        assert set(status["devices"]) == set(summary["devices"])
        assert status["stale_devices"] == summary["stale_devices"] == []
        pod_w = agent.store.value("pod", "power_w")
        assert pod_w is not None and abs(status["pod_power_w"] - pod_w) < 0.25 * pod_w
        cdu = next(c for c in status["cooling"] if c["device"] == "cdu-1")
        assert cdu["kind"] == "cdu" and cdu["metrics"]["flow_lpm"]["unit"] == "L/min"
        assert cdu["metrics"]["setpoint_c"]["value"] == agent.store.value("cdu-1", "setpoint_c")
        assert len(status["gpus"]) == 8

        ran = await podctl(sock, "device", "gpu3", "--json")
        assert ran.rc == 0, ran
        dev = ran.json()
        assert {m["metric"] for m in dev["metrics"]} == set(agent.store.device_readings("gpu3"))
        assert dev["parent"] == "gpus" and dev["info"]["uuid"].startswith("GPU-")
        limit = next(m for m in dev["metrics"] if m["metric"] == "power_limit_w")
        assert limit["value"] == agent.store.value("gpu3", "power_limit_w") and limit["quality"] == "good"

        ran = await podctl(sock, "devices", "--json")
        ids = {d["id"] for d in ran.json()}
        assert {"gpus", "gpu0", "gpu7", "pdu-a", "pdu-b", "cdu-1", "chiller-1", "meter-1"} <= ids

        ran = await podctl(sock, "device", "gpu42")
        assert ran.rc == 1 and "no device" in ran.err, ran

        # Poll now: Modbus shows registers (raw) and what they mean (scaled).
        polls = agent.pollers["cdu-1"].stats.polls
        ran = await podctl(sock, "poll", "cdu-1", "--json")
        assert ran.rc == 0, ran
        polled = ran.json()
        assert agent.pollers["cdu-1"].stats.polls > polls
        scaled = {r["metric"]: r for r in polled["readings"]}
        assert scaled["supply_temp_c"]["quality"] == "good"
        raw = {p["metric"]: p for p in polled["raw"]}
        assert raw["supply_temp_c"]["raw"] and raw["supply_temp_c"]["table"] == "input"
        assert abs(raw["supply_temp_c"]["value"] - scaled["supply_temp_c"]["value"]) < 1.0
        ran = await podctl(sock, "poll", "pdu-a", "--no-raw")
        assert ran.rc == 0 and "phase1_current_a" in ran.out and " A " in ran.out, ran

        # A faulty device: the poll reports why, in red words, exit 1.
        tiny_pod.fault("modbus-exception", "cdu-1")
        ran = await podctl(sock, "poll", "cdu-1", "--json")
        assert ran.rc == 1 and ran.json()["error"], ran
        r = agent.store.get("cdu-1", "supply_temp_c")
        assert r is not None and r.quality is Quality.ERROR and r.value is None
        tiny_pod.fault("modbus-exception", "cdu-1", clear=True)

        # probe: the driver directly, no daemon involved (same config file; a TCP unit, since the
        # daemon holds the RTU line's lock).
        ran = await podctl(None, "probe", "--config", str(config), "cdu-1", "--json")
        assert ran.rc == 0, ran
        probed = {r["metric"]: r for r in ran.json()["readings"]}
        assert probed["supply_temp_c"]["quality"] == "good" and probed["supply_temp_c"]["value"] is not None
        assert ran.json()["raw"]
        ran = await podctl(None, "probe", "--config", str(config), "pdu-b")
        assert ran.rc == 0 and "phase1_voltage_v" in ran.out and "OID" in ran.out, ran
