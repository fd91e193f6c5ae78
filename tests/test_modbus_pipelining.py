"""Modbus TCP requests of one poll in flight together (``max_in_flight``), against hwsim's Modbus
server directly and through a proxy in front of it that behaves like devices do: answers out of
order, answers one request at a time and drops what arrives meanwhile, or goes silent half-way."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import pytest

from agent.config import ModbusDevice
from agent.drivers.base import DeviceError, DeviceUnavailable
from agent.drivers.modbus import ModbusDriver
from agent.drivers.modbus_tcp import LeanModbusTcpClient
from agent.model import Quality
from hwsim.modbus_devices import ModbusHandle, start_modbus_tcp
from tests.test_driver_modbus import CASES, State, check_all_good, make_cdu, make_pdu

Behaviour = Literal["reverse", "one_at_a_time", "silent_after_first", "duplicate", "spare_bytes"]


def frames(buf: bytearray) -> list[bytes]:
    """Whole MBAP frames taken off the front of ``buf``."""
    out = []
    while len(buf) >= 7:
        end = 6 + struct.unpack_from(">H", buf, 4)[0]
        if len(buf) < end:
            break
        out.append(bytes(buf[:end]))
        del buf[:end]
    return out


def spare_byte(answer: bytes) -> bytes:
    """A bit read's answer with one byte more than the bits asked need (allowed: the byte count
    covers at least the bits asked); other answers as they are."""
    tid, proto, length, unit, function, count = struct.unpack(">HHHBBB", answer[:9])
    if function not in (1, 2):
        return answer
    return struct.pack(">HHHBBB", tid, proto, length + 1, unit, function, count + 1) + answer[9:] + b"\x00"


@dataclass
class Proxy:
    """Between the driver and hwsim: counts what it forwards and how many arrived at once."""

    upstream_port: int
    behaviour: Behaviour
    forwarded: int = 0
    dropped: int = 0
    most_at_once: int = 0
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in self.tasks:
            t.cancel()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        buf = bytearray()
        try:
            while data := await reader.read(4096):
                buf += data
                got = frames(buf)
                self.most_at_once = max(self.most_at_once, len(got))
                if self.behaviour == "one_at_a_time":
                    # Busy answering the first: what came with it is lost, as on some gateways.
                    self.dropped += len(got) - 1
                    got = got[:1]
                if self.behaviour == "silent_after_first" and self.forwarded:
                    continue
                answers = []
                for request in got:
                    up_w.write(request)
                    head = await up_r.readexactly(6)
                    answers.append(head + await up_r.readexactly(struct.unpack(">H", head[4:6])[0]))
                    self.forwarded += 1
                    if self.behaviour == "silent_after_first":
                        break
                if self.behaviour == "reverse":
                    answers.reverse()
                if self.behaviour == "duplicate":
                    answers += answers  # a gateway that repeats itself: the copies are no one's
                if self.behaviour == "spare_bytes":
                    answers = [spare_byte(a) for a in answers]
                writer.write(b"".join(answers))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            up_w.close()


@pytest.fixture
async def served() -> AsyncIterator[list[ModbusHandle]]:
    handles: list[ModbusHandle] = []
    yield handles
    for h in handles:
        await h.close()


@contextlib.asynccontextmanager
async def proxied(h: ModbusHandle, behaviour: Behaviour) -> AsyncIterator[tuple[Proxy, int]]:
    proxy = Proxy(tcp_port(h), behaviour)
    port = await proxy.start()
    try:
        yield proxy, port
    finally:
        await proxy.close()


def tcp_port(h: ModbusHandle) -> int:
    assert h.port is not None  # a TCP server, not an RTU line
    return h.port


def cfg(port: int, profile: str, device: str, **kw: object) -> ModbusDevice:
    base: dict[str, object] = {"timeout_s": 0.5, "retries": 0}
    return ModbusDevice.model_validate(
        {"id": device, "kind": "modbus", "profile": profile, "host": "127.0.0.1", "port": port} | base | kw
    )


@pytest.mark.parametrize(("profile", "make"), CASES)
async def test_pipelined_poll_reads_every_metric_from_hwsim(
    served: list[ModbusHandle], profile: str, make: Callable[[], State]
) -> None:
    state = make()
    h = await start_modbus_tcp(state, profile=profile, unit=3)
    served.append(h)
    drv = ModbusDriver(cfg(tcp_port(h), profile, state.id, unit=3, max_in_flight=8))
    await drv.open()
    try:
        for _ in range(2):
            check_all_good(await drv.poll(), state, profile)
        assert h.requests[3] == 2 * len(drv.blocks)
    finally:
        await drv.close()


async def test_answers_out_of_order_are_matched_by_transaction_id(served: list[ModbusHandle]) -> None:
    cdu = make_cdu()
    h = await start_modbus_tcp(cdu, profile="generic-cdu")
    served.append(h)
    async with proxied(h, "reverse") as (proxy, port):
        drv = ModbusDriver(cfg(port, "generic-cdu", cdu.id, max_in_flight=16))
        assert len(drv.blocks) > 1
        await drv.open()
        try:
            check_all_good(await drv.poll(), cdu, "generic-cdu")
        finally:
            await drv.close()
    assert proxy.most_at_once > 1  # they were in flight together, and answered last-first


async def test_default_waits_for_each_answer_on_a_device_that_drops_the_rest(
    served: list[ModbusHandle],
) -> None:
    cdu = make_cdu()
    h = await start_modbus_tcp(cdu, profile="generic-cdu")
    served.append(h)
    async with proxied(h, "one_at_a_time") as (proxy, port):
        safe = ModbusDriver(cfg(port, "generic-cdu", cdu.id))
        assert safe.max_in_flight == 1  # the default: profiles and devices opt in
        await safe.open()
        try:
            check_all_good(await safe.poll(), cdu, "generic-cdu")
        finally:
            await safe.close()
        assert proxy.dropped == 0 and proxy.most_at_once == 1

        # Told it may pipeline, the same device loses requests: ERROR readings, never numbers.
        eager = ModbusDriver(cfg(port, "generic-cdu", cdu.id, max_in_flight=4, timeout_s=0.3))
        await eager.open()
        try:
            readings = await eager.poll()
        finally:
            await eager.close()
    assert proxy.dropped > 0
    bad = [r for r in readings if r.quality is not Quality.GOOD]
    assert bad and all(r.value is None and r.error and "timeout" in r.error for r in bad)
    assert any(r.quality is Quality.GOOD for r in readings)


async def test_silence_half_way_keeps_what_answered_and_a_retry_asks_only_the_rest(
    served: list[ModbusHandle],
) -> None:
    cdu = make_cdu()
    h = await start_modbus_tcp(cdu, profile="generic-cdu")
    served.append(h)
    async with proxied(h, "silent_after_first") as (proxy, port):
        drv = ModbusDriver(cfg(port, "generic-cdu", cdu.id, max_in_flight=4, timeout_s=0.2, retries=1))
        await drv.open()
        try:
            readings = await drv.poll()
            first = drv.blocks[0].points
            by_metric = {r.metric: r for r in readings}
            assert all(by_metric[p.metric].quality is Quality.GOOD for p in first)
            rest = [r for r in readings if r.metric not in {p.metric for p in first}]
            assert rest and all(r.quality is Quality.ERROR and r.value is None for r in rest)
            # One try, then one retry of the unanswered blocks only (on a new connection).
            assert drv.requests_sent == len(drv.blocks) + len(drv.blocks) - 1
        finally:
            await drv.close()
    assert proxy.forwarded == 1


async def test_busy_is_device_error_and_silent_is_one_timeout(served: list[ModbusHandle]) -> None:
    cdu = make_cdu()
    h = await start_modbus_tcp(cdu, profile="generic-cdu")
    served.append(h)
    drv = ModbusDriver(cfg(tcp_port(h), "generic-cdu", cdu.id, max_in_flight=8, timeout_s=0.2))
    await drv.open()
    try:
        cdu.busy = True
        with pytest.raises(DeviceError, match=r"modbus exception 6 \(device busy\)"):
            await drv.poll()
        cdu.busy = False
        cdu.unresponsive = True
        with pytest.raises(DeviceUnavailable, match="timeout"):
            await drv.poll()
        cdu.unresponsive = False
        check_all_good(await drv.poll(), cdu, "generic-cdu")
    finally:
        await drv.close()


async def test_an_empty_batch_asks_nothing_and_waits_for_nothing() -> None:
    client = LeanModbusTcpClient("127.0.0.1", 9)  # never connected: nothing may go out
    answers, error = await client.exchange([], window=4, timeout_s=30.0)
    assert answers == [] and error is None


async def test_repeated_answers_are_no_ones_and_spare_bytes_of_a_bit_read_are_read(
    served: list[ModbusHandle],
) -> None:
    """An answer is read in place only when it is the full answer asked for; a repeated one (its
    request answered already, or a past poll's) is dropped, and a bit read answered with spare
    bytes goes through the checked path to the same readings."""
    pdu = make_pdu()
    h = await start_modbus_tcp(pdu, profile="modbus-pdu")
    served.append(h)
    for behaviour in ("duplicate", "spare_bytes"):
        async with proxied(h, behaviour) as (proxy, port):
            drv = ModbusDriver(cfg(port, "modbus-pdu", pdu.id, max_in_flight=8))
            await drv.open()
            try:
                for _ in range(3):
                    check_all_good(await drv.poll(), pdu, "modbus-pdu")
            finally:
                await drv.close()
        assert proxy.forwarded == 3 * len(drv.blocks), behaviour


async def test_transaction_ids_wrap_within_one_poll(served: list[ModbusHandle]) -> None:
    """A poll's requests take consecutive transaction ids; near the top of the 16-bit range the
    next poll starts again from 1, never past 65535 and never 0."""
    cdu = make_cdu()
    h = await start_modbus_tcp(cdu, profile="generic-cdu")
    served.append(h)
    for window in (1, 8):
        drv = ModbusDriver(cfg(tcp_port(h), "generic-cdu", cdu.id, max_in_flight=window))
        await drv.open()
        try:
            check_all_good(await drv.poll(), cdu, "generic-cdu")
            assert drv._line is not None and isinstance(drv._line.client, LeanModbusTcpClient)
            drv._line.client._next_tid = 0x10000 - len(drv.blocks) + 2  # this poll would pass 65535
            check_all_good(await drv.poll(), cdu, "generic-cdu")
            assert drv._line.client._next_tid == 1 + len(drv.blocks)
        finally:
            await drv.close()
