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


def _answer(pdu: bytes, asked_function: int, asked: int) -> Answer:
    """The answer in ``pdu`` to a request of ``asked_function`` for ``asked`` items."""
    function = pdu[0]
    if function == asked_function | 0x80:
        code = pdu[1] if len(pdu) == 2 else 0
        if not code:
            raise ModbusAnswerError("malformed exception answer")
        return Answer(exception_code=code)
    if function != asked_function:
        raise ModbusAnswerError(f"answer for function {function}, asked {asked_function}")
    if function in (3, 4):
        count = pdu[1] if len(pdu) > 1 else -1
        if count != len(pdu) - 2 or count % 2:
            raise ModbusAnswerError(f"byte count {count} in a {len(pdu)}-byte answer")
        return Answer(registers=list(struct.unpack(f">{count // 2}H", pdu[2:])))
    if function in (1, 2):
        count = pdu[1] if len(pdu) > 1 else -1
        if count != len(pdu) - 2 or count * 8 < asked:
            raise ModbusAnswerError(f"byte count {count} in a {len(pdu)}-byte answer")
        bits = int.from_bytes(pdu[2:], "little")
        return Answer(bits=[bool(bits >> i & 1) for i in range(asked)])
    if len(pdu) != 5:  # writes echo address and value / quantity
        raise ModbusAnswerError(f"write answer of {len(pdu)} bytes")
    return Answer()


@dataclass(frozen=True, slots=True)
class Read:
    """One read request of a batch: function code (1-4), first address, how many."""

    function: int
    address: int
    count: int


@dataclass(slots=True)
class Batch:
    """What a batch got: an answer per request (None: none came), and why it ended early."""

    answers: list[Answer | None]
    error: Exception | None = None  # TimeoutError, ConnectionError or ModbusAnswerError


# A request not yet sent: its frame, transaction id, place in the batch, function, items asked.
_Frame = tuple[bytes, int, int, int, int]


class _Exchange:
    """Requests on the wire, answers matched by transaction id as they arrive (in any order).

    At most ``window`` requests are outstanding: the next goes out from ``data_received`` as an
    answer comes in, so a whole poll wakes the polling coroutine once, not once per request.
    """

    __slots__ = ("answers", "error", "expect", "future", "left", "progress", "queue", "timer")

    def __init__(self, future: asyncio.Future[None], frames: list[_Frame]) -> None:
        self.future = future
        self.answers: list[Answer | None] = [None] * len(frames)
        self.expect: dict[int, tuple[int, int, int]] = {}  # tid -> (index, function, asked)
        self.queue = frames[::-1]  # popped from the end
        self.left = len(frames)
        self.error: Exception | None = None
        self.progress = False  # an answer since the timer was last armed
        self.timer: asyncio.TimerHandle | None = None

    def send_next(self) -> bytes:
        frame, tid, index, function, asked = self.queue.pop()
        self.expect[tid] = (index, function, asked)
        return frame

    def end(self, error: Exception | None) -> None:
        if not self.future.done():
            self.error = error
            self.future.set_result(None)


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
    """One Modbus TCP connection; one exchange (one request, or a batch of reads) at a time (the
    driver holds a lock)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._tids = itertools.cycle(range(1, 0x10000))
        self._exchange: _Exchange | None = None

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
        if self._exchange is not None:
            self._exchange.end(err)

    # -- exchanges

    async def read_batch(self, reads: list[Read], *, device_id: int, window: int, timeout_s: float) -> Batch:
        """All ``reads``, at most ``window`` outstanding. Ends when every one is answered, on a
        broken frame, a lost connection, or after ``timeout_s`` without any answer; then the
        answers got so far are kept and the connection dropped (late answers belong to no one).
        """
        frames: list[_Frame] = []
        for i, r in enumerate(reads):
            tid = next(self._tids)
            frame = _READ.pack(tid, 0, 6, device_id, r.function, r.address, r.count)
            frames.append((frame, tid, i, r.function, r.count))
        return await self._run(frames, window, timeout_s)

    async def _run(self, frames: list[_Frame], window: int, timeout_s: float | None) -> Batch:
        if not frames:
            return Batch([])  # nothing to ask: no answer to wait for
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionError("not connected")
        if self._exchange is not None:
            raise ConnectionError("an exchange is already in flight")
        loop = asyncio.get_running_loop()
        ex = self._exchange = _Exchange(loop.create_future(), frames)
        transport.write(b"".join([ex.send_next() for _ in range(min(max(1, window), len(frames)))]))
        if timeout_s is not None:
            ex.timer = loop.call_later(timeout_s, self._check_timer, ex, timeout_s)
        try:
            await ex.future
        except BaseException:
            # Cancelled (the driver's or the poll's deadline): whatever is still on this stream
            # belongs to no request. Start the next one on a new connection.
            if self._transport is not None:
                self.close()
            raise
        finally:
            self._exchange = None
            if ex.timer is not None:
                ex.timer.cancel()
        if ex.error is not None and self._transport is not None:
            self.close()  # timed out or broken: the stream is out of step
        return Batch(ex.answers, ex.error)

    def _check_timer(self, ex: _Exchange, timeout_s: float) -> None:
        # One timer per exchange, re-armed only when an answer came since: "timeout_s without an
        # answer", as a timeout per request would say, without arming a timer per request.
        if ex.progress and not ex.future.done():
            ex.progress = False
            ex.timer = asyncio.get_running_loop().call_later(timeout_s, self._check_timer, ex, timeout_s)
            return
        ex.end(TimeoutError(f"no answer within {timeout_s:g} s"))

    async def _call(self, frame: bytes, tid: int, function: int, asked: int) -> Answer:
        batch = await self._run([(frame, tid, 0, function, asked)], 1, None)
        if batch.error is not None:
            raise batch.error
        answer = batch.answers[0]
        assert answer is not None  # an exchange ends without an error only when all are answered
        return answer

    def _data(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        ex = self._exchange
        more = b""  # requests the answers free room for, sent together
        while len(buf) >= 7:
            tid, proto, length, _unit = _HEADER.unpack_from(buf)
            if proto != 0 or not 2 <= length <= _MAX_FRAME - 6:
                self._broken(f"not a Modbus TCP frame (protocol {proto}, length {length})")
                return
            if len(buf) < 6 + length:
                break  # the rest is on its way
            pdu = bytes(buf[7 : 6 + length])
            del buf[: 6 + length]
            meta = None if ex is None or ex.future.done() else ex.expect.pop(tid, None)
            if ex is None or meta is None:
                continue  # an answer to no request in flight: not ours to use
            index, function, asked = meta
            try:
                ex.answers[index] = _answer(pdu, function, asked)
            except ModbusAnswerError as err:
                self._broken(str(err))
                return
            ex.left -= 1
            ex.progress = True
            if ex.queue:
                more += ex.send_next()
            elif not ex.left:
                ex.end(None)
        if more and self._transport is not None:
            self._transport.write(more)

    def _broken(self, why: str) -> None:
        self._fail(ModbusAnswerError(why))
        self._buffer.clear()

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


__all__ = ["Answer", "Batch", "LeanModbusTcpClient", "ModbusAnswerError", "Read"]
