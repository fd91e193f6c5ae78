"""The controller's node driver against a hand-made node: it believes only authentic, matching
answers, and a bad value from a node is missing (ERROR), never a number."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.config import NodeDevice
from agent.drivers.base import DeviceError, DeviceUnavailable
from agent.drivers.node import NodeDriver
from agent.model import Quality
from agent.node.protocol import REQ, RSP, decode, encode, mac

KEY = b"0123456789abcdef0123456789abcdef"
LIMITS = {"min_power_limit_w": 200.0, "max_power_limit_w": 700.0, "default_power_limit_w": 700.0}
Answer = Callable[[dict[str, Any]], bytes | None]


def gpu(readings: dict[str, list[object]]) -> dict[str, Any]:
    return {"index": 0, "info": {"uuid": "GPU-1"}, "readings": readings}


def good(req: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "ok": True,
        "re": {"boot": req["boot"], "seq": req["seq"]},
        "node": "srv-0",
        "node_boot": "nb",
        "hostname": "host-0",
        "mode": "controller",
        "lease_v": req.get("lease_v"),
        "applied_w": {"0": 400.0},
        "gpus": [gpu({"temp_c": [55.0, "good", None, 0.2]})],
        "status": {"controller_lost": 0.0},
        **extra,
    }


@asynccontextmanager
async def fake_node(answer: Answer) -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            out = answer(decode(KEY, REQ, line.rstrip(b"\n")))
            if out is None:
                await asyncio.sleep(30)  # hung
            else:
                writer.write(out)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def driver(tmp_path: Path, port: int) -> NodeDriver:
    key = tmp_path / "pod.key"
    key.write_bytes(KEY)
    return NodeDriver(
        NodeDevice(kind="node", id="srv-0", host="127.0.0.1", port=port, key_file=key, timeout_s=0.5)
    )


async def test_good_answer_gives_readings_with_identity(tmp_path: Path) -> None:
    async with fake_node(lambda req: encode(KEY, RSP, good(req))) as port:
        d = driver(tmp_path, port)
        await d.open()
        readings = await d.poll()
        temp = next(r for r in readings if r.metric == "temp_c")
        assert (temp.device, temp.value, temp.quality) == ("srv-0-gpu0", 55.0, Quality.GOOD)
        assert d.device_info()["srv-0-gpu0"] == {
            "uuid": "GPU-1",
            "hostname": "host-0",
            "gpu": "0",
            "node": "srv-0",
        }
        assert any(r.device == "srv-0" and r.metric == "node_controller_lost" for r in readings)
        assert await d.set_caps({"srv-0-gpu0": 450.0}) == {"srv-0-gpu0": 450.0}  # 400 <= 450: honoured
        await d.close()


@pytest.mark.parametrize(
    "answer",
    [
        lambda req: encode(b"not-the-pod-key-not-the-pod-key!", RSP, good(req)),  # forged
        lambda req: encode(KEY, REQ, good(req)),  # a request reflected back
        lambda req: encode(KEY, RSP, good({**req, "seq": req["seq"] - 1})),  # an older answer
        lambda req: encode(KEY, RSP, good({**req, "boot": "someone-else"})),
        lambda req: encode(
            KEY, RSP, {"ok": False, "error": "expired", "re": {"boot": req["boot"], "seq": req["seq"]}}
        ),
        lambda req: b"{not json\n",
    ],
)
async def test_bad_answers_are_errors(tmp_path: Path, answer: Answer) -> None:
    async with fake_node(answer) as port:
        d = driver(tmp_path, port)
        await d.open()
        with pytest.raises(DeviceError):
            await d.poll()
        results = await d.set_power_limits({"srv-0-gpu0": 300.0})
        assert isinstance(results["srv-0-gpu0"], DeviceError)
        await d.close()


async def test_hung_node_times_out(tmp_path: Path) -> None:
    async with fake_node(lambda req: None) as port:
        d = driver(tmp_path, port)
        await d.open()
        with pytest.raises(DeviceUnavailable):
            await d.poll()
        await d.close()


async def test_bad_values_are_missing_never_numbers(tmp_path: Path) -> None:
    readings: dict[str, list[object]] = {
        "temp_c": ["hot", "good", None, 0.1],
        "power_w": [None, "good", None, 0.1],
        "pstate": [5.0, "excellent", None, 0.1],
        "util_gpu_pct": [5.0, "good", None, -3],
        "clock_sm_mhz": [5.0, "good"],
        "fan_pct": [True, "good", None, 0.1],  # JSON true is not 1.0
        "mem_temp_c": [123456.789, "good", None, 0.1],  # sent as 1e999: JSON parses it as inf
        "clock_mem_mhz": [5.0, "good", None, "0.1"],
        "mem_used_mib": [7, "good", None, 0],  # an integer is a number
        "energy_mj": [10**400, "good", None, 0.1],  # past float's range
        "util_enc_pct": [1.0, "good", None, 10**400],
    }

    def answer(req: dict[str, Any]) -> bytes:
        body = json.dumps(good(req, gpus=[gpu(readings)]), separators=(",", ":")).encode()
        body = body.replace(b"123456.789", b"1e999")
        return b"v2 %s %s\n" % (mac(KEY, RSP, body), body)

    async with fake_node(answer) as port:
        d = driver(tmp_path, port)
        await d.open()
        got = {r.metric: r for r in await d.poll() if r.device == "srv-0-gpu0"}
        # Unknown quality, bad age, a short item: dropped. A non-number or a "good" null: ERROR.
        assert set(got) == {"temp_c", "power_w", "fan_pct", "mem_temp_c", "mem_used_mib", "energy_mj"}
        assert got.pop("mem_used_mib").value == 7.0
        assert all(r.value is None and r.quality is Quality.ERROR for r in got.values())
        await d.close()


def test_an_infinity_cannot_even_be_signed() -> None:
    with pytest.raises(ValueError):
        encode(KEY, RSP, {"v": float("inf")})


async def test_two_sets_in_flight_compose_and_every_request_carries_the_whole_lease(
    tmp_path: Path,
) -> None:
    """Two sets started before either is answered: the later request carries both caps, and the
    polls after them carry the whole lease at its newest version."""
    seen: list[dict[str, Any]] = []

    def answer(req: dict[str, Any]) -> bytes:
        seen.append(req)
        applied = {k: float(v) for k, v in (req["caps"] or {}).items()}
        reply = good(req, applied_w=applied or {"0": 700.0, "1": 700.0})
        reply["gpus"] = [
            {"index": i, "info": {}, "readings": {m: [w, "good", None, 0.1] for m, w in LIMITS.items()}}
            for i in (0, 1)
        ]
        return encode(KEY, RSP, reply)

    async with fake_node(answer) as port:
        drv = driver(tmp_path, port)
        await drv.open()
        await drv.poll()  # the first poll: no decision yet, the lease starts as the limits applied
        assert seen[0]["caps"] is None
        first = drv.submit_power_limits({"srv-0-gpu0": 500.0})
        second = drv.submit_power_limits({"srv-0-gpu1": 450.0})
        one, two = await first, await second
        assert one == {"srv-0-gpu0": 500.0} and two == {"srv-0-gpu1": 450.0}
        caps_sent = [r for r in seen if r["op"] == "caps"]
        assert caps_sent[-1]["caps"] == {"0": 500.0, "1": 450.0}
        await drv.poll()
        assert seen[-1]["caps"] == {"0": 500.0, "1": 450.0}
        assert seen[-1]["lease_v"] == caps_sent[-1]["lease_v"] == 2
        assert len({r["ctl"] for r in seen}) == 1
        await drv.close()


async def test_a_node_holding_an_older_lease_has_not_honoured_the_cap(tmp_path: Path) -> None:
    def answer(req: dict[str, Any]) -> bytes:
        return encode(KEY, RSP, good(req, lease_v=0, applied_w={"0": 300.0}))

    async with fake_node(answer) as port:
        drv = driver(tmp_path, port)
        await drv.open()
        result = await drv.set_power_limits({"srv-0-gpu0": 500.0})
        assert isinstance(result["srv-0-gpu0"], DeviceError)
        await drv.close()
