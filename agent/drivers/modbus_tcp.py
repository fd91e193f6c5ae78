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

A poll goes through ``exchange``: its ``Request``s are built once with the driver (only the
transaction id is new each time), and a full answer to a request that has an ``unpack`` (the
driver's per-block decoder: one ``struct`` call from the received bytes to the block's typed
values) is read in place, with no ``Answer``, register list or PDU copy in between. Anything else
(an exception, a short, long or odd answer) takes the checked path (``_answer``) as before.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

_MBAP = struct.Struct(">HHH")  # transaction id, protocol id (0), length (then the unit id)
_HEAD = struct.Struct(">HBBB")  # an answer's length, unit, function, byte count
_TID = struct.Struct(">H")  # the frame's first field: what differs between two polls' requests
_TAIL = struct.Struct(">HHBBHH")  # the rest of a request: protocol id, length, unit, function, address, count
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


# A full answer's values, read in place from its data (the buffer, the data's offset): what a
# driver decodes a block with, decided once per block (``Request.unpack``).
Unpack = Callable[[bytes, int], tuple[Any, ...]]
# What an exchange got for a request: the values ``unpack`` read off a full answer, an ``Answer``
# (an exception, or anything else ``_answer`` took apart), or None (no answer came).
Got = tuple[Any, ...] | Answer | None


class Request(NamedTuple):
    """One request of an exchange with everything but its transaction id decided once (a poll
    asks the same blocks every time: its requests are built when the driver is)."""

    tail: bytes  # the frame after the transaction id: protocol id, length, unit, PDU
    function: int
    asked: int  # registers or bits asked for (a write: what it writes)
    # A full answer's bytes 4-8 (MBAP length, unit, function, byte count): an answer that has
    # them is read in place by ``unpack``. b"": never (an ``Answer`` instead).
    head: bytes = b""
    unpack: Unpack | None = None


def read_request(unit: int, function: int, address: int, count: int, unpack: Unpack | None = None) -> Request:
    """A read of ``count`` registers (functions 3, 4) or bits (1, 2) from ``address``. With
    ``unpack``, a full answer (this unit, function, byte count and length) is read in place by
    it; anything else (an exception, a short or odd answer) goes through ``_answer`` as before."""
    data = 2 * count if function in (3, 4) else (count + 7) // 8
    head = _HEAD.pack(3 + data, unit, function, data) if unpack is not None else b""
    return Request(_TAIL.pack(0, 6, unit, function, address, count), function, count, head, unpack)


class _Exchange:
    """Requests on the wire, answers matched by transaction id as they arrive (in any order).

    The requests of one exchange take consecutive transaction ids, so an answer's place is its id
    minus the first (no lookup table built per poll). At most ``window`` requests are outstanding:
    the next goes out from ``data_received`` as an answer comes in, so a whole poll wakes the
    polling coroutine once, not once per request.
    """

    __slots__ = ("answers", "error", "first_tid", "future", "left", "progress", "requests", "sent", "timer")

    def __init__(self, future: asyncio.Future[None], requests: Sequence[Request], first_tid: int) -> None:
        self.future = future
        self.requests = requests
        self.first_tid = first_tid
        self.answers: list[Got] = [None] * len(requests)
        self.sent = 0
        self.left = len(requests)
        self.error: Exception | None = None
        self.progress = False  # an answer since the timer was last armed
        self.timer: asyncio.TimerHandle | None = None

    def frames(self, k: int) -> bytes:
        """The next ``k`` requests' frames, in order (they count as sent)."""
        first, tid, requests = self.sent, self.first_tid, self.requests
        self.sent = first + k
        if k == 1:
            return _TID.pack(tid + first) + requests[first].tail
        return b"".join([_TID.pack(tid + i) + requests[i].tail for i in range(first, first + k)])

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer = bytearray()  # the start of a frame whose rest has not arrived
        self._next_tid = 1  # transaction ids 1..65535, in turn
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
        self._loop = loop
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

    async def exchange(
        self, requests: Sequence[Request], *, window: int, timeout_s: float | None
    ) -> tuple[list[Got], Exception | None]:
        """All ``requests``, at most ``window`` outstanding. Ends when every one is answered, on a
        broken frame, a lost connection, or after ``timeout_s`` without any answer; then the
        answers got so far are kept (None for the rest) and the connection dropped (late answers
        belong to no one). Returns the answers, in the requests' order, and the error it ended on.
        """
        n = len(requests)
        if not n:
            return [], None  # nothing to ask: no answer to wait for
        transport, loop = self._transport, self._loop
        if transport is None or loop is None or transport.is_closing():
            raise ConnectionError("not connected")
        if self._exchange is not None:
            raise ConnectionError("an exchange is already in flight")
        tid = self._next_tid
        if tid + n > 0x10000:
            tid = 1
        self._next_tid = tid + n
        ex = self._exchange = _Exchange(loop.create_future(), requests, tid)
        transport.write(ex.frames(min(max(1, window), n)))
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
        return ex.answers, ex.error

    def _check_timer(self, ex: _Exchange, timeout_s: float) -> None:
        # One timer per exchange, re-armed only when an answer came since: "timeout_s without an
        # answer", as a timeout per request would say, without arming a timer per request.
        if ex.progress and not ex.future.done() and self._loop is not None:
            ex.progress = False
            ex.timer = self._loop.call_later(timeout_s, self._check_timer, ex, timeout_s)
            return
        ex.end(TimeoutError(f"no answer within {timeout_s:g} s"))

    async def _call(self, request: Request) -> Answer:
        answers, error = await self.exchange([request], window=1, timeout_s=None)
        if error is not None:
            raise error
        answer = answers[0]
        # An exchange ends without an error only when all are answered; without ``unpack`` an
        # answer is an Answer.
        assert isinstance(answer, Answer)
        return answer

    def _data(self, data: bytes) -> None:
        if self._buffer:  # the rest of a frame split across segments (rare: answers are small)
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        ex = self._exchange
        if ex is not None and ex.future.done():
            ex = None  # it ended (timed out, broken): what comes now is no one's
        if ex is None:
            answers: list[Got] = []
            requests: Sequence[Request] = ()
            first = sent = 0
        else:
            answers, requests, first, sent = ex.answers, ex.requests, ex.first_tid, ex.sent
        got = 0
        pos, size = 0, len(data)
        while size - pos >= 7:
            tid, proto, length = _MBAP.unpack_from(data, pos)
            if proto != 0 or not 2 <= length <= _MAX_FRAME - 6:
                self._broken(f"not a Modbus TCP frame (protocol {proto}, length {length})")
                return
            end = pos + 6 + length
            if end > size:
                break  # the rest is on its way
            i = tid - first
            # Else an answer to no request in flight, or to one answered already: not ours to use.
            if 0 <= i < sent and answers[i] is None:
                request = requests[i]
                # The common case, checked in place: the full answer to what was asked (length,
                # unit, function and byte count as asked), its values read off the received bytes.
                # (``startswith``: no slice copied. A request without ``unpack`` has head b"",
                # which every answer would start with: it takes the checked path.)
                head = request.head
                if head and data.startswith(head, pos + 4):
                    assert request.unpack is not None  # head is b"" without it
                    answers[i] = request.unpack(data, pos + 9)
                else:
                    try:
                        answers[i] = _answer(data[pos + 7 : end], request.function, request.asked)
                    except ModbusAnswerError as err:
                        self._broken(str(err))
                        return
                got += 1
            pos = end
        if pos < size:
            self._buffer += data[pos:]
        if not got:
            return
        assert ex is not None
        ex.left -= got
        ex.progress = True
        if sent < len(requests):  # room for as many more requests as answers came
            more = ex.frames(min(got, len(requests) - sent))
            if self._transport is not None:
                self._transport.write(more)
        elif not ex.left:
            ex.end(None)

    def _broken(self, why: str) -> None:
        self._fail(ModbusAnswerError(why))
        self._buffer.clear()

    # -- the calls the driver makes (pymodbus names and keywords)

    async def read_holding_registers(self, address: int, *, count: int, device_id: int) -> Answer:
        return await self._call(read_request(device_id, 3, address, count))

    async def read_input_registers(self, address: int, *, count: int, device_id: int) -> Answer:
        return await self._call(read_request(device_id, 4, address, count))

    async def read_coils(self, address: int, *, count: int, device_id: int) -> Answer:
        return await self._call(read_request(device_id, 1, address, count))

    async def read_discrete_inputs(self, address: int, *, count: int, device_id: int) -> Answer:
        return await self._call(read_request(device_id, 2, address, count))

    async def write_coil(self, address: int, value: bool, *, device_id: int) -> Answer:
        tail = _TAIL.pack(0, 6, device_id, 5, address, 0xFF00 if value else 0)
        return await self._call(Request(tail, 5, 1))

    async def write_register(self, address: int, value: int, *, device_id: int) -> Answer:
        return await self._call(Request(_TAIL.pack(0, 6, device_id, 6, address, value), 6, 1))

    async def write_registers(self, address: int, values: list[int], *, device_id: int) -> Answer:
        n = len(values)
        body = struct.pack(f">BHHB{n}H", 16, address, n, 2 * n, *values)
        return await self._call(Request(struct.pack(">HHB", 0, 1 + len(body), device_id) + body, 16, n))


__all__ = [
    "Answer",
    "Got",
    "LeanModbusTcpClient",
    "ModbusAnswerError",
    "Request",
    "Unpack",
    "read_request",
]
