"""The fleet link against a real mosquitto and a tiny hwsim pod: birth/status/will, telemetry and
deadbands, retained state, TLS with client certificates, password auth + ACL, commands."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.app import Agent
from agent.config import load_config
from agent.publish.commands import canonical
from agent.publish.mqtt import MqttService, build_service
from hwsim.agentconf import render_agent_config
from tests.conftest_mqtt import ROOT, Mosquitto, Subscriber, mqtt_toml, tiny_pod_process

ROOT_TOPIC = "podagent/v1/lab/tiny"
HMAC_KEY = b"pod-tiny-secret-key"


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with tiny_pod_process(tmp_path_factory.mktemp("pod")) as manifest:
        yield manifest


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    b = Mosquitto()
    b.start()
    yield b
    b.close()


def write_config(pod: dict[str, Any], tmp: Path, mqtt: str) -> Path:
    path = tmp / "podagent.toml"
    path.write_text(render_agent_config(pod, state_dir=str(tmp / "state"), extra=mqtt))
    return path


@contextlib.asynccontextmanager
async def running_agent(config_path: Path) -> AsyncIterator[tuple[Agent, MqttService]]:
    config = load_config(config_path)
    agent = Agent(config, config_path=config_path)
    service = build_service(config)
    assert service is not None
    agent.add_service(service)
    task = asyncio.create_task(agent.run())
    try:
        yield agent, service
    finally:
        agent.stop()
        # The agent re-delivers cancels lost to Python 3.11's wait_for race itself (5 s, then every
        # 3 s): a stop that takes longer than this is a bug, not load.
        async with asyncio.timeout(30):
            await task


async def test_a_reload_publishes_a_new_birth_with_the_config_in_force(
    pod: dict[str, Any], broker: Mosquitto, tmp_path: Path
) -> None:
    sub = await Subscriber(broker.port).start()
    path = write_config(pod, tmp_path, mqtt_toml([broker.port], telemetry_period_s=0.5))

    def intervals(m: Any) -> dict[str, float]:
        return {d["id"]: d["poll_interval_s"] for d in m.json()["devices"]}

    async with running_agent(path) as (agent, _service):
        first = await sub.wait_for(lambda ms: sub.on("/birth"))
        before = intervals(first[0])
        assert before["cdu-1"] != 2.5
        text = path.read_text()
        block = text.index('id = "cdu-1"')
        at = text.index("poll_interval_s = ", block)
        end = text.index("\n", at)
        path.write_text(text[:at] + "poll_interval_s = 2.5" + text[end:])
        await agent.ready.wait()
        assert await agent.reload(), agent.last_reload_error
        births = await sub.wait_for(lambda ms: [m for m in sub.on("/birth") if intervals(m)["cdu-1"] == 2.5])
        after = intervals(births[-1])
        assert {d: v for d, v in after.items() if d != "cdu-1"} == {
            d: v for d, v in before.items() if d != "cdu-1"
        }
    await sub.stop()


def telemetry_metrics(messages: list[Any], device: str) -> list[list[str]]:
    return [
        [r["m"] for r in m.json()["readings"]] for m in messages if m.topic.endswith(f"/telemetry/{device}")
    ]


async def test_birth_status_telemetry_state_and_clean_offline(
    pod: dict[str, Any], broker: Mosquitto, tmp_path: Path
) -> None:
    sub = await Subscriber(broker.port).start()
    path = write_config(pod, tmp_path, mqtt_toml([broker.port], telemetry_period_s=0.5))
    async with running_agent(path) as (_agent, service):
        status = await sub.wait_for(lambda ms: [m for m in ms if m.topic == f"{ROOT_TOPIC}/status"])
        online = status[0].json()
        assert online["status"] == "online" and online["boot_id"] == service.boot_id
        birth = (await sub.wait_for(lambda ms: [m for m in ms if m.topic == f"{ROOT_TOPIC}/birth"]))[0].json()
        assert {d["id"] for d in birth["devices"]} >= {"gpus", "pdu-a", "cdu-1"}
        assert birth["versions"]["mqtt_protocol"] == "5"
        tele = await sub.wait_for(lambda ms: [m for m in ms if m.topic == f"{ROOT_TOPIC}/telemetry/gpu0"])
        body = tele[0].json()
        assert body["device"] == "gpu0" and "historical" not in body
        values = {r["m"]: r["v"] for r in body["readings"]}
        assert 10 < values["temp_c"] < 100 and values["power_w"] > 0
        # A later birth carries the metric inventory with units once the first polls are in.
        births = await sub.wait_for(
            lambda ms: [m for m in sub.on("/birth") if m.json()["metrics"].get("gpu0")]
        )
        assert births[-1].json()["metrics"]["gpu0"]["temp_c"] == "C"
        state = await sub.wait_for(lambda ms: [m for m in sub.on("/state") if m.json()["state"]["ready"]])
        summary = state[-1].json()["state"]
        assert summary["mqtt"]["link"] == "connected" and summary["pod"] == "tiny"
        assert "spool_depth" in summary["mqtt"] and summary["mqtt"]["dropped_telemetry"] == 0
    offline = await sub.wait_for(lambda ms: [m for m in sub.on("/status") if m.json()["status"] == "offline"])
    assert offline[-1].json()["reason"] == "stopped"
    await sub.stop()
    # A subscriber arriving later finds the retained status and state.
    late = await Subscriber(broker.port, filter=f"{ROOT_TOPIC}/#").start()
    got = await late.wait_for(
        lambda ms: {m.topic for m in ms} >= {f"{ROOT_TOPIC}/status", f"{ROOT_TOPIC}/state"}
    )
    assert got
    assert all(m.retain for m in late.messages)
    assert late.on("/status")[0].json()["status"] == "offline"
    await late.stop()


async def test_will_says_offline_when_the_agent_is_killed(
    pod: dict[str, Any], broker: Mosquitto, tmp_path: Path
) -> None:
    sub = await Subscriber(broker.port).start()
    path = write_config(pod, tmp_path, mqtt_toml([broker.port]))
    proc = subprocess.Popen(  # noqa: ASYNC220 - spawning is brief; the test waits on the child elsewhere
        [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        online = await sub.wait_for(
            lambda ms: [m for m in sub.on("/status") if m.json()["status"] == "online"], timeout=20
        )
        boot = online[0].json()["boot_id"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        off = await sub.wait_for(lambda ms: [m for m in sub.on("/status") if m.json()["status"] == "offline"])
        assert off[0].json()["boot_id"] == boot and off[0].json()["reason"] == "connection lost"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        await sub.stop()


async def test_deadbands_report_by_exception(pod: dict[str, Any], broker: Mosquitto, tmp_path: Path) -> None:
    sub = await Subscriber(broker.port).start()
    mqtt = mqtt_toml(
        [broker.port],
        telemetry_period_s=0.3,
        deadbands=[{"pattern": "temp_c", "absolute": 1000.0}, {"pattern": "gpu*/clock_*", "relative": 5.0}],
    )
    async with running_agent(write_config(pod, tmp_path, mqtt)):
        await sub.wait_for(lambda ms: len(telemetry_metrics(ms, "gpu0")) >= 5, timeout=15)
    batches = telemetry_metrics(sub.messages, "gpu0")
    assert sum(b.count("temp_c") for b in batches) == 1  # sent once, then inside its band
    assert sum(b.count("clock_sm_mhz") for b in batches) == 1
    assert sum(b.count("power_w") for b in batches) >= 3  # no deadband: every poll
    await sub.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(b: Mosquitto) -> dict[str, Path]:
    d = b.dir
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(ext + "\n" if ext else "basicConstraints=CA:FALSE\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    out = {}
    for f in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key"):
        Mosquitto.own(d / f)
        out[f] = d / f
    return out


async def test_tls_with_client_certificate(pod: dict[str, Any], tmp_path: Path) -> None:
    import ssl

    b = Mosquitto()
    try:
        pki = make_pki(b)
        b.extra = (
            f"cafile {pki['ca.crt']}\ncertfile {pki['server.crt']}\nkeyfile {pki['server.key']}\n"
            "require_certificate true\ntls_version tlsv1.2\n"
        )
        b.start()
        ctx = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        # Without a client certificate the broker refuses the handshake.
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", b.port, tls_context=ctx, timeout=3):
                pass
        ctx.load_cert_chain(str(pki["client.crt"]), str(pki["client.key"]))
        sub = await Subscriber(b.port, kwargs={"tls_context": ctx}).start()
        mqtt = mqtt_toml(
            [b.port],
            tls_ca_file=str(pki["ca.crt"]),
            tls_cert_file=str(pki["client.crt"]),
            tls_key_file=str(pki["client.key"]),
        )
        async with running_agent(write_config(pod, tmp_path, mqtt)) as (_, service):
            await sub.wait_for(lambda ms: sub.on("/telemetry/gpu0"), timeout=15)
            assert service.link == "connected"
        await sub.stop()
    finally:
        b.close()


async def test_password_auth_and_acl_keep_a_pod_to_its_topics(pod: dict[str, Any], tmp_path: Path) -> None:
    b = Mosquitto()
    try:
        pw = b.file("passwd", "")
        for user, password in (("pod-tiny", "tiny-pass"), ("fleet", "fleet-pass")):
            subprocess.run(["mosquitto_passwd", "-b", str(pw), user, password], check=True)  # noqa: ASYNC221 - mosquitto_passwd runs in milliseconds
        Mosquitto.own(pw)
        acl = b.file(
            "acl",
            f"user pod-tiny\ntopic readwrite {ROOT_TOPIC}/#\n\nuser fleet\ntopic readwrite podagent/#\n",
        )
        b.extra = f"allow_anonymous false\npassword_file {pw}\nacl_file {acl}\n"
        b.start()
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", b.port, username="pod-tiny", password="wrong", timeout=3):
                pass
        fleet = await Subscriber(b.port, kwargs={"username": "fleet", "password": "fleet-pass"}).start()
        secret = tmp_path / "mqtt.pass"
        secret.write_text("tiny-pass\n")
        mqtt = mqtt_toml([b.port], username="pod-tiny", password_file=str(secret))
        async with running_agent(write_config(pod, tmp_path, mqtt)):
            await fleet.wait_for(lambda ms: fleet.on("/birth"), timeout=15)
            # The pod tries another pod's topics, then its own: only its own arrive.
            async with aiomqtt.Client("127.0.0.1", b.port, username="pod-tiny", password="tiny-pass") as c:
                await c.publish("podagent/v1/lab/other/cmd/rebirth", b'{"id":"x"}', qos=1)
                await c.publish("podagent/v1/lab/other/status", b'{"status":"online"}', qos=1)
                await c.publish(f"{ROOT_TOPIC}/marker", b"{}", qos=1)
            await fleet.wait_for(lambda ms: fleet.on("/marker"))
        assert not [m for m in fleet.messages if "/lab/other/" in m.topic]
        await fleet.stop()
    finally:
        b.close()


def signed(obj: dict[str, Any], key: bytes = HMAC_KEY) -> bytes:
    body = dict(obj)
    body["sig"] = hmac.new(key, canonical(body), hashlib.sha256).hexdigest()
    return json.dumps(body).encode()


def cmd(cmd_id: str, ttl_ms: int = 60_000, **fields: Any) -> dict[str, Any]:
    now = int(time.time() * 1000)
    return {"id": cmd_id, "issued_at": now, "expires_at": now + ttl_ms, **fields}


async def test_commands_round_trip_and_each_bad_command_refused(
    pod: dict[str, Any], broker: Mosquitto, tmp_path: Path
) -> None:
    key = tmp_path / "cmd.key"
    key.write_bytes(HMAC_KEY + b"\n")
    sub = await Subscriber(broker.port).start()
    mqtt = mqtt_toml([broker.port], command_hmac_key_file=str(key), command_max_bytes=2048)
    async with running_agent(write_config(pod, tmp_path, mqtt)) as (agent, _):
        await sub.wait_for(lambda ms: sub.on("/birth"), timeout=15)

        async def send(name: str, payload: bytes) -> dict[str, Any]:
            before = len(sub.on("/cmd_reply"))
            await sub.publish(f"{ROOT_TOPIC}/cmd/{name}", payload)
            replies = await sub.wait_for(lambda ms: sub.on("/cmd_reply")[before:] or None)
            return dict(replies[0].json())

        bad = [
            ("set_power_budget", signed(cmd("b1", watts=-5)), "schema"),
            ("set_power_budget", signed(cmd("b2", ttl_ms=-1000, watts=5000)), "expired"),
            ("set_power_budget", json.dumps(cmd("b3", watts=5000)).encode(), "missing_signature"),
            ("set_power_budget", signed(cmd("b4", watts=5000), key=b"wrong"), "bad_signature"),
            ("self_destruct", signed(cmd("b5")), "unknown_command"),
            ("set_power_budget", b"{not json", "not_json"),
            ("set_power_budget", signed(cmd("b6", watts=5000, pad="x" * 3000)), "too_large"),
            ("ack", signed(cmd("b7", event_id="ev-nope")), "unknown_event"),
            ("poll_now", signed(cmd("b8", device="pdu-zz")), "unknown_device"),
        ]
        for name, payload, code in bad:
            reply = await send(name, payload)
            assert reply["ok"] is False and reply["error"] == code, (name, reply)
        assert agent.fleet_budget is None

        ok = await send("set_power_budget", signed(cmd("c1", watts=4200.0, ramp_w_per_s=100.0)))
        assert ok["ok"] is True and ok["id"] == "c1"
        assert agent.fleet_budget is not None and agent.fleet_budget.watts == 4200.0
        replayed = await send("set_power_budget", signed(cmd("c1", watts=2000.0)))
        assert replayed["error"] == "replayed" and agent.fleet_budget.watts == 4200.0

        births = len(sub.on("/birth"))
        assert (await send("rebirth", signed(cmd("c2"))))["ok"]
        await sub.wait_for(lambda ms: len(sub.on("/birth")) > births)
        assert (await send("poll_now", signed(cmd("c3", device="pdu-a"))))["ok"]
        target = agent.events.emit("test_alarm", "warning", "needs an ack", needs_ack=True)  # type: ignore[arg-type]
        assert (await send("ack", signed(cmd("c4", event_id=target.id))))["ok"]
        assert agent.events.acks[target.id].by == "fleet:c4"
        # Every command is audited on the bus, and the audit reaches the fleet as an event.
        audits = [e for e in agent.events.recent(limit=1000) if e.kind == "command"]
        assert len(audits) == len(bad) + 5
        await sub.wait_for(
            lambda ms: [m for m in sub.on("/event") if m.json()["event"]["detail"].get("id") == "c4"]
        )
    await sub.stop()


class OldBroker:
    """A broker that speaks MQTT 3.1.1 only, as Mosquitto 1.4 did: a TCP proxy to the real one
    that answers an MQTT 5 CONNECT with 3.1.1's CONNACK "unacceptable protocol version" (0x01)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refused_v5 = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> OldBroker:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(1)
            length, shift, raw = 0, 0, b""
            while True:
                b = await reader.readexactly(1)
                raw += b
                length |= (b[0] & 0x7F) << shift
                shift += 7
                if not b[0] & 0x80:
                    break
            body = await reader.readexactly(length)
            name_len = int.from_bytes(body[:2], "big")
            level = body[2 + name_len]
            if head[0] >> 4 == 1 and level == 5:
                self.refused_v5 += 1
                writer.write(bytes([0x20, 0x02, 0x00, 0x01]))
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            up_writer.write(head + raw + body)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_falls_back_to_mqtt_311_on_a_broker_without_mqtt5(
    pod: dict[str, Any], broker: Mosquitto, tmp_path: Path
) -> None:
    old = await OldBroker(broker.port).start()
    sub = await Subscriber(broker.port).start()
    try:
        path = write_config(pod, tmp_path, mqtt_toml([old.port], telemetry_period_s=0.5))
        async with running_agent(path) as (_agent, service):
            births = await sub.wait_for(lambda ms: sub.on("/birth"))
            assert births[0].json()["versions"]["mqtt_protocol"] == "3.1.1"
            await sub.wait_for(lambda ms: sub.on("/telemetry/gpu0"))
            assert old.refused_v5 == 1 and service.protocol == "3.1.1" and service.link == "connected"
    finally:
        await sub.stop()
        await old.stop()
