"""GPU identity with node agents, end to end: a controller polling real ``podagent node`` processes
labels each GPU's Prometheus series as dcgm-exporter on that server would (``Hostname`` = the
server's name, ``gpu`` = its local index, its ``UUID``), and publishes its MQTT telemetry under the
pod-unique device id ``{node id}-gpu{local index}``, with the identity in the birth."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.config import load_config
from agent.interlocks.service import InterlockService
from agent.publish.mqtt import build_service as mqtt_service
from hwsim.agentconf import render_agent_config
from tests.agent_helpers import running_agent
from tests.conftest_mqtt import Mosquitto, Subscriber, free_port
from tests.node_helpers import RawClient, node_fleet, request_body
from tests.prom_helpers import get, parse
from tests.test_node_e2e import CONTROLLER_EXTRA, NODE_POLL_S, duo, fresh, gpu_ids, until_agent


async def test_node_gpus_carry_their_servers_identity_in_prometheus_and_mqtt(tmp_path: Path) -> None:
    broker = Mosquitto()
    broker.start()
    prom_port = free_port()
    try:
        with (
            duo(tmp_path) as pod,
            node_fleet(pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S) as fleet,
        ):
            extra = (
                f'[prometheus]\nenabled = true\nlisten = "127.0.0.1:{prom_port}"\n'
                f'[mqtt]\nenabled = true\nbrokers = ["127.0.0.1:{broker.port}"]\ntelemetry_period_s = 0.5\n'
                + CONTROLLER_EXTRA
            )
            path = tmp_path / "ctl.toml"
            path.write_text(
                render_agent_config(
                    pod.manifest,
                    state_dir=str(tmp_path / "st"),
                    extra=extra,
                    poll_interval_s=0.5,
                    nodes=fleet.layout,
                )
            )
            sub = await Subscriber(broker.port, filter="podagent/v1/lab/duo/#").start()
            config = load_config(path)
            service = InterlockService(config.interlocks)
            link = mqtt_service(config)
            assert link is not None
            try:
                async with running_agent(path, services=[service, link]) as agent:
                    everything = [g for s in (0, 1) for g in gpu_ids(s)]
                    await until_agent(
                        agent, lambda: all(fresh(agent, g) for g in everything), within=20, what="fresh"
                    )
                    # Prometheus: one temperature series per GPU, labelled with its own server.
                    text = await asyncio.to_thread(get, f"http://127.0.0.1:{prom_port}/metrics")
                    temps = [s.label_dict for s in parse(text).samples if s.name == "DCGM_FI_DEV_GPU_TEMP"]
                    ident = sorted((t["Hostname"], t["gpu"]) for t in temps)
                    assert ident == [(f"duo-srv-{s}", str(i)) for s in (0, 1) for i in range(4)], temps
                    uuids = [t["UUID"] for t in temps]
                    assert len(set(uuids)) == 8 and all(u.startswith("GPU-") for u in uuids), uuids
                    for t in temps:  # the UUID is the one that server's NVML reports for that index
                        dev = f"srv-{t['Hostname'].rsplit('-', 1)[1]}-gpu{t['gpu']}"
                        assert agent.store.info(dev)["uuid"] == t["UUID"]
                        assert t["device"] == f"nvidia{t['gpu']}"

                    # MQTT: telemetry under the pod-unique device id; the birth maps it to the identity.
                    def telemetry_of(ms: list) -> set[str]:  # type: ignore[type-arg]
                        return {m.json()["device"] for m in ms if "/telemetry/" in m.topic}

                    await sub.wait_for(lambda ms: set(everything) <= telemetry_of(ms), timeout=20)
                    for m in sub.messages:
                        if "/telemetry/srv-" in m.topic:
                            assert m.topic.rsplit("/", 1)[1] == m.json()["device"]
                    # A birth is re-published when the inventory grows (each node's first answer):
                    # the one after both nodes answered names every GPU.
                    birth = await sub.wait_for(
                        lambda ms: [
                            m
                            for m in ms
                            if m.topic.endswith("/birth") and set(everything) <= set(m.json()["gpus"])
                        ],
                        timeout=20,
                    )
                    gpus = birth[-1].json()["gpus"]
                    assert gpus["srv-1-gpu2"]["hostname"] == "duo-srv-1" and gpus["srv-1-gpu2"]["gpu"] == "2"
                    assert gpus["srv-1-gpu2"]["node"] == "srv-1"
                    assert gpus["srv-1-gpu2"]["uuid"] == agent.store.info("srv-1-gpu2")["uuid"]
            finally:
                await sub.stop()
    finally:
        broker.close()


async def test_node_agents_health_in_the_controllers_prometheus(tmp_path: Path) -> None:
    """podagent_node_up per GPU server (named, with its Hostname), its lease age, and what the
    node itself counts: a forged request shows as a refusal by reason; a killed node goes to 0
    while the other stays up."""
    prom_port = free_port()
    with (
        duo(tmp_path) as pod,
        node_fleet(pod, tmp_path, lost_after_s=600.0, poll_interval_s=NODE_POLL_S) as fleet,
    ):
        extra = f'[prometheus]\nenabled = true\nlisten = "127.0.0.1:{prom_port}"\n' + CONTROLLER_EXTRA
        path = tmp_path / "ctl.toml"
        path.write_text(
            render_agent_config(
                pod.manifest,
                state_dir=str(tmp_path / "st"),
                extra=extra,
                poll_interval_s=0.5,
                nodes=fleet.layout,
            )
        )
        config = load_config(path)
        async with running_agent(path, services=[InterlockService(config.interlocks)]) as agent:
            everything = [g for s in (0, 1) for g in gpu_ids(s)]
            await until_agent(
                agent, lambda: all(fresh(agent, g) for g in everything), within=20, what="fresh"
            )

            async def scrape() -> list[tuple[str, dict[str, str], float]]:
                text = await asyncio.to_thread(get, f"http://127.0.0.1:{prom_port}/metrics")
                return [(s.name, s.label_dict, float(s.value)) for s in parse(text).samples]

            samples = await scrape()
            up = {(d["node"], d["Hostname"]): v for n, d, v in samples if n == "podagent_node_up"}
            assert up == {("srv-0", "duo-srv-0"): 1.0, ("srv-1", "duo-srv-1"): 1.0}
            ages = [v for n, _, v in samples if n == "podagent_node_lease_age_seconds"]
            assert len(ages) == 2 and all(a >= 0 for a in ages)
            failsafe = {d["device"]: v for n, d, v in samples if n == "podagent_node_failsafe_active"}
            assert failsafe == {"srv-0": 0.0, "srv-1": 0.0}

            client = RawClient(fleet.nodes[1].port, fleet.key)
            try:
                forged = client.frame(key=b"f" * 32, **request_body("srv-1", "forger", 1, {"0": 250.0}))
                assert client.send_raw(forged)["error"] == "mac"
            finally:
                client.close()

            def refused(ss: list[tuple[str, dict[str, str], float]]) -> dict[tuple[str, str], float]:
                return {
                    (d["device"], d["reason"]): v
                    for n, d, v in ss
                    if n == "podagent_node_requests_refused_total"
                }

            async with asyncio.timeout(20):
                while refused(samples).get(("srv-1", "mac")) != 1.0:
                    await asyncio.sleep(0.2)
                    samples = await scrape()
            assert ("srv-0", "mac") not in refused(samples)

            fleet.nodes[1].kill()
            async with asyncio.timeout(20):
                while True:
                    up = {d["node"]: v for n, d, v in await scrape() if n == "podagent_node_up"}
                    if up.get("srv-1") == 0.0:
                        break
                    await asyncio.sleep(0.2)
            assert up["srv-0"] == 1.0
