"""Device answers that are errors: NVML error codes from any call the driver makes, and Modbus
exception responses, short and garbage frames from a real TCP server.

Each asserts what the standards ask of hostile input: the driver does not crash (it raises only its
own ``DriverError`` kinds, or returns readings), and every value it does return is either a finite
GOOD number or ERROR with a reason, never a number made up from an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hwsim.nvml as nv
from agent.config import ModbusDevice, NvmlDevice
from agent.drivers.base import DriverError
from agent.drivers.modbus import ModbusDriver
from agent.drivers.nvml import NvmlDriver
from agent.model import Quality, Reading
from hwsim.nvml.shm import NvmlShmWriter
from hwsim.state import PodState
from tests.fuzz.conftest import FUZZ
from tests.test_driver_nvml import make_gpu

# Every per-GPU read the NVML driver makes in a poll (not open/close: those are its own tests).
NVML_READS = [
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetPowerManagementLimit",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetFieldValues",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetTemperatureThreshold",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetRemappedRows",
    "nvmlDeviceGetPcieReplayCounter",
]
# pynvml's own codes (and one it does not know: a newer driver's).
NVML_CODES = sorted(
    {v for k, v in vars(pynvml).items() if k.startswith("NVML_ERROR_") and isinstance(v, int)} | {9999}
)


def _check(readings: list[Reading]) -> None:
    for r in readings:
        if r.quality is Quality.GOOD:
            assert r.value is not None and math.isfinite(r.value), r
        else:
            assert r.value is None and r.error, r


@pytest.fixture(scope="module")
def nvml_state(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("nvml") / "nvml.shm"
    gpus = [make_gpu(i) for i in range(2)]
    writer = NvmlShmWriter(path, len(gpus))
    writer.publish(PodState(name="fuzz", gpus=gpus))
    yield path
    writer.close()


@contextlib.contextmanager
def _raising(name: str, code: int) -> Iterator[None]:
    original: Callable[..., Any] = getattr(nv, name)

    def fail(*_args: Any, **_kw: Any) -> Any:
        raise pynvml.NVMLError(code)

    setattr(nv, name, fail)
    try:
        yield
    finally:
        setattr(nv, name, original)


@FUZZ
@given(calls=st.lists(st.tuples(st.sampled_from(NVML_READS), st.sampled_from(NVML_CODES)), max_size=4))
def test_nvml_error_codes_from_any_read(nvml_state: Path, calls: list[tuple[str, int]]) -> None:
    cfg = NvmlDevice.model_validate(
        {"id": "gpus", "kind": "nvml", "library": "hwsim", "hwsim_state": nvml_state}
    )

    async def poll() -> list[Reading]:
        driver = NvmlDriver(cfg)
        await driver.open()
        try:
            with contextlib.ExitStack() as stack:
                for name, code in dict(calls).items():
                    stack.enter_context(_raising(name, code))
                try:
                    return await driver.poll()
                except DriverError as err:  # the whole device unusable: said so, in its own type
                    assert err.reason
                    return []
        finally:
            await driver.close()

    _check(asyncio.run(poll()))


# ------------------------------------------------------------------------------ Modbus TCP
def _exception_frame(request: bytes, code: int) -> bytes:
    tid, _proto, _length, unit, function = struct.unpack(">HHHBB", request[:8])
    return struct.pack(">HHHBBB", tid, 0, 3, unit, function | 0x80, code)


answers = st.one_of(
    st.builds(lambda code: ("exception", code), st.integers(1, 255)),
    st.builds(lambda n: ("short", n), st.integers(0, 8)),  # the frame cut after n bytes
    st.builds(lambda b: ("garbage", b), st.binary(min_size=1, max_size=40)),
    st.builds(lambda words: ("wrong_count", words), st.integers(0, 3)),  # fewer registers than asked
)


@settings(FUZZ, max_examples=40)  # an answer that never completes costs the 0.3 s timeout
@given(
    profile=st.sampled_from(["generic-cdu", "generic-chiller", "modbus-pdu"]),
    answer=answers,
)
def test_modbus_exception_and_broken_answers(profile: str, answer: tuple[str, Any]) -> None:
    kind, arg = answer

    async def serve_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                length = struct.unpack(">H", head[4:6])[0]
                body = await reader.readexactly(length - 1)
                request = head + body
                if kind == "exception":
                    writer.write(_exception_frame(request, arg))
                elif kind == "short":
                    writer.write(_exception_frame(request, 2)[:arg])
                elif kind == "garbage":
                    writer.write(arg)
                else:
                    tid, _p, _l, unit, function = struct.unpack(">HHHBB", request[:8])
                    data = bytes(2 * arg)
                    writer.write(
                        struct.pack(">HHHBBB", tid, 0, 3 + len(data), unit, function, len(data)) + data
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def poll() -> list[Reading]:
        server = await asyncio.start_server(serve_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        cfg = ModbusDevice.model_validate(
            {
                "id": "dev-1",
                "kind": "modbus",
                "host": "127.0.0.1",
                "port": port,
                "profile": profile,
                "timeout_s": 0.3,
                "retries": 0,
            }
        )
        driver = ModbusDriver(cfg)
        try:
            async with asyncio.timeout(10):
                await driver.open()
                try:
                    return await driver.poll()
                except DriverError as err:
                    assert err.reason
                    return []
        finally:
            with contextlib.suppress(DriverError):
                await driver.close()
            server.close()
            await server.wait_closed()

    _check(asyncio.run(poll()))
