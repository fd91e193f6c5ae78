"""hwsim's Modbus TCP server: MBAP frames answered straight from the unit's register image.

pymodbus's server costs 0.3-0.8 ms of CPU per request (framer, PDU objects, its async context
calls), which made the simulator the bottleneck of the full pod. This server parses the MBAP
header and the function codes a meter, CDU or PDU serves (1, 2, 3, 4 reads; 5, 6, 15, 16 writes)
itself and asks the same ``_ProfileContext`` the RTU line (still pymodbus) uses, so every
behaviour is kept: exception 2 for an unmapped address, 3 for a refused write or a bad count, 6
while busy, 11 for another unit id, silence while unresponsive, and the per-unit request counter.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar, cast

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException

T = TypeVar("T")
_READS = {1: 2000, 2: 2000, 3: 125, 4: 125}  # function code -> most items per request


class _Context(Protocol):
    async def async_getValues(
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes: ...

    async def async_setValues(
        self, device_id: int, func_code: int, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None: ...


def _bits(values: list[int] | list[bool]) -> bytes:
    out = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v:
            out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def _unbits(data: bytes, count: int) -> list[bool]:
    return [bool(data[i // 8] >> (i % 8) & 1) for i in range(count)]


class _Connection(asyncio.Protocol):
    def __init__(self, server: FastModbusTcpServer) -> None:
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 7:
            tid, proto, length, unit = struct.unpack_from(">HHHB", self.buf)
            if proto != 0 or not 2 <= length <= 254:
                assert self.transport is not None
                self.transport.close()  # not Modbus TCP: drop the connection, as devices do
                return
            end = 6 + length
            if len(self.buf) < end:
                return
            pdu, self.buf = self.buf[7:end], self.buf[end:]
            self.server.requests[unit] += 1
            answer = self.server.answer(unit, pdu)
            if answer is not None and self.transport is not None:
                self.transport.write(struct.pack(">HHHB", tid, 0, len(answer) + 1, unit) + answer)


class FastModbusTcpServer:
    """Serves one ``_ProfileContext`` on a TCP socket; ``shutdown()`` closes it and its clients."""

    def __init__(self, context: _Context, requests: Counter[int]) -> None:
        self.context = context
        self.requests = requests
        self.connections: set[_Connection] = set()
        self.server: asyncio.Server | None = None

    @property
    def active_connections(self) -> set[_Connection]:
        """Open client connections (pymodbus's server has the same attribute; tests count them)."""
        return self.connections

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        return int(self.server.sockets[0].getsockname()[1])

    async def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    def answer(self, unit: int, pdu: bytes) -> bytes | None:
        """The response PDU, or None for no answer (an unresponsive unit)."""
        fc = pdu[0]
        try:
            result = self._serve(unit, fc, pdu)
        except NoSuchIdException:
            return None
        except (struct.error, IndexError):
            result = ExcCodes.ILLEGAL_VALUE  # a frame too short for its function code
        if isinstance(result, ExcCodes):
            return bytes((fc | 0x80, int(result)))
        return result

    def _serve(self, unit: int, fc: int, pdu: bytes) -> bytes | ExcCodes:
        ctx = self.context
        if fc in _READS:
            address, count = struct.unpack_from(">HH", pdu, 1)
            if not 1 <= count <= _READS[fc]:
                return ExcCodes.ILLEGAL_VALUE
            values = _sync(ctx.async_getValues(unit, fc, address, count))
            if isinstance(values, ExcCodes):
                return values
            data = _bits(values) if fc in (1, 2) else struct.pack(f">{len(values)}H", *values)
            return bytes((fc, len(data))) + data
        if fc in (5, 6):
            address, value = struct.unpack_from(">HH", pdu, 1)
            if fc == 5 and value not in (0x0000, 0xFF00):
                return ExcCodes.ILLEGAL_VALUE
            written: list[int] | list[bool] = [value == 0xFF00] if fc == 5 else [value]
            err = _sync(ctx.async_setValues(unit, fc, address, written))
            return err if err is not None else pdu[:5]
        if fc in (15, 16):
            address, count, nbytes = struct.unpack_from(">HHB", pdu, 1)
            data = pdu[6 : 6 + nbytes]
            if fc == 16:
                if not 1 <= count <= 123 or nbytes != 2 * count or len(data) != nbytes:
                    return ExcCodes.ILLEGAL_VALUE
                regs: list[int] | list[bool] = list(struct.unpack(f">{count}H", data))
            else:
                if not 1 <= count <= 1968 or nbytes != (count + 7) // 8 or len(data) != nbytes:
                    return ExcCodes.ILLEGAL_VALUE
                regs = _unbits(data, count)
            err = _sync(ctx.async_setValues(unit, fc, address, regs))
            return err if err is not None else pdu[:5]
        return ExcCodes.ILLEGAL_FUNCTION


def _sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never awaits (the register image is plain memory) without the loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("the register image awaited: serve it through the event loop")
