"""podagent's own Modbus TCP client: MBAP frames over one asyncio connection per device.

Why not pymodbus for TCP: at a pod's rate (a few units, ~50 registers a second) the cost is per
request, not per register, and pymodbus spends most of it in its framer, transaction manager and
PDU classes (profiled in the running agent: ~2x collectd's CPU per register). A read is 12 bytes
out and ``9 + 2n`` back, so this client builds the frame with one ``struct.pack`` and decodes all
registers of a block with one ``struct.unpack``. RTU keeps pymodbus (its serial framing and
timing are the hard part there, and it is not what a pod polls most).

It offers the few calls the driver makes of a pymodbus client (``connect``, ``connected``,
``close``, ``read_*``, ``write_*``), each answering an ``Answer``. An exception answer is an
``Answer`` with ``exception_code`` (as pymodbus does); a frame that is not the answer to the
request (wrong function, byte count, length) raises ``ModbusAnswerError`` and drops the connection,
so that the next request starts on a clean stream; a lost connection raises ``ConnectionError``.
Timeouts are the driver's (``asyncio.timeout`` around each call): a request cancelled half-way also
drops the connection, since its late answer would otherwise be read as the next one's.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from dataclasses import dataclass, field

_HEADER = struct.Struct(">HHHB")  # transaction id, protocol id (0), length, unit id
_READ = struct.Struct(">HHHBBHH")  # header + function, address, count
_MAX_FRAME = 260  # MBAP header (7) + the largest PDU (253)


class ModbusAnswerError(Exception):
    """An answer that does not fit the request (not a Modbus exception: a broken frame)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A device's answer: registers or bits read, or the exception code it sent."""

    registers: list[int] = field(default_factory=list)
    bits: list[bool] = field(default_factory=list)
    exception_code: int = 0

    def isError(self) -> bool:  # the pymodbus name the driver calls
        return self.exception_code != 0


class _Stream(asyncio.Protocol):
    def __init__(self, client: LeanModbusTcpClient) -> None:
        self._client = client
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._client._transport is self._transport:
            self._client._data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        # A connection we dropped (close) reports its end later: by then the client may be on a
        # new one, which this must not touch.
        if self._client._transport is self._transport:
            self._client._lost(exc)


class LeanModbusTcpClient:
    """One Modbus TCP connection; one request in flight at a time (the driver holds a lock)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._tids = itertools.cycle(range(1, 0x10000))
        # The request in flight: its transaction id, function code, what it asked, its future.
        self._tid = -1
        self._function = 0
        self._asked = 0
        self._future: asyncio.Future[Answer] | None = None

    # -- connection

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    async def connect(self) -> bool:
        if self.connected:
            return True
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(lambda: _Stream(self), self.host, self.port)
        except OSError:
            return False
        self._buffer.clear()
        self._transport = transport
        return True

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()  # nothing we sent is worth flushing; no half-closed socket left
        self._fail(ConnectionError("connection closed"))

    def _lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(ConnectionError(f"connection lost: {exc}" if exc else "connection closed by the device"))

    def _fail(self, err: Exception) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_exception(err)

    # -- one exchange

    async def _call(self, frame: bytes, tid: int, function: int, asked: int) -> Answer:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionError("not connected")
        if self._future is not None and not self._future.done():
            raise ConnectionError("a request is already in flight")
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._future, self._tid, self._function, self._asked = future, tid, function, asked
        transport.write(frame)
        try:
            return await future
        except BaseException:
            # Cancelled (the driver's timeout), a broken answer or a lost connection: whatever
            # is still on this stream belongs to no request. Start the next one on a new one.
            if self._transport is not None:
                self.close()
            raise
        finally:
            self._future = None
            self._tid = -1

    def _data(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        while len(buf) >= 7:
            tid, proto, length, _unit = _HEADER.unpack_from(buf)
            if proto != 0 or not 2 <= length <= _MAX_FRAME - 6:
                self._broken(f"not a Modbus TCP frame (protocol {proto}, length {length})")
                return
            if len(buf) < 6 + length:
                return  # the rest is on its way
            pdu = bytes(buf[7 : 6 + length])
            del buf[: 6 + length]
            future = self._future
            if future is None or future.done() or tid != self._tid:
                continue  # an answer to no request in flight: not ours to use
            try:
                future.set_result(self._answer(pdu))
            except ModbusAnswerError as err:
                self._broken(str(err))
                return

    def _broken(self, why: str) -> None:
        self._fail(ModbusAnswerError(why))
        self._buffer.clear()

    def _answer(self, pdu: bytes) -> Answer:
        function = pdu[0]
        if function == self._function | 0x80:
            code = pdu[1] if len(pdu) == 2 else 0
            if not code:
                raise ModbusAnswerError("malformed exception answer")
            return Answer(exception_code=code)
        if function != self._function:
            raise ModbusAnswerError(f"answer for function {function}, asked {self._function}")
        if function in (3, 4):
            count = pdu[1] if len(pdu) > 1 else -1
            if count != len(pdu) - 2 or count % 2:
                raise ModbusAnswerError(f"byte count {count} in a {len(pdu)}-byte answer")
            return Answer(registers=list(struct.unpack(f">{count // 2}H", pdu[2:])))
        if function in (1, 2):
            count = pdu[1] if len(pdu) > 1 else -1
            if count != len(pdu) - 2 or count * 8 < self._asked:
                raise ModbusAnswerError(f"byte count {count} in a {len(pdu)}-byte answer")
            bits = int.from_bytes(pdu[2:], "little")
            return Answer(bits=[bool(bits >> i & 1) for i in range(self._asked)])
        if len(pdu) != 5:  # writes echo address and value / quantity
            raise ModbusAnswerError(f"write answer of {len(pdu)} bytes")
        return Answer()

    # -- the calls the driver makes (pymodbus names and keywords)

    async def read_holding_registers(self, address: int, *, count: int, device_id: int) -> Answer:
        tid = next(self._tids)
        return await self._call(_READ.pack(tid, 0, 6, device_id, 3, address, count), tid, 3, count)

    async def read_input_registers(self, address: int, *, count: int, device_id: int) -> Answer:
        tid = next(self._tids)
        return await self._call(_READ.pack(tid, 0, 6, device_id, 4, address, count), tid, 4, count)

    async def read_coils(self, address: int, *, count: int, device_id: int) -> Answer:
        tid = next(self._tids)
        return await self._call(_READ.pack(tid, 0, 6, device_id, 1, address, count), tid, 1, count)

    async def read_discrete_inputs(self, address: int, *, count: int, device_id: int) -> Answer:
        tid = next(self._tids)
        return await self._call(_READ.pack(tid, 0, 6, device_id, 2, address, count), tid, 2, count)

    async def write_coil(self, address: int, value: bool, *, device_id: int) -> Answer:
        tid = next(self._tids)
        frame = _READ.pack(tid, 0, 6, device_id, 5, address, 0xFF00 if value else 0)
        return await self._call(frame, tid, 5, 1)

    async def write_register(self, address: int, value: int, *, device_id: int) -> Answer:
        tid = next(self._tids)
        return await self._call(_READ.pack(tid, 0, 6, device_id, 6, address, value), tid, 6, 1)

    async def write_registers(self, address: int, values: list[int], *, device_id: int) -> Answer:
        tid = next(self._tids)
        n = len(values)
        body = struct.pack(f">BHHB{n}H", 16, address, n, 2 * n, *values)
        frame = _HEADER.pack(tid, 0, 1 + len(body), device_id) + body
        return await self._call(frame, tid, 16, n)


__all__ = ["Answer", "LeanModbusTcpClient", "ModbusAnswerError"]
