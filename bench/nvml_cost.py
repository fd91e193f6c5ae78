"""What the NVML fake and the NVML driver cost: per call, per publish, per poll.

Usage: .venv/bin/python bench/nvml_cost.py [--gpus 576] [--real] [--rounds 3] [--quick]
CPU time of this process, median (range) of --rounds rounds.
``--real`` also times the same calls against NVIDIA's pynvml (needs a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pynvml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hwsim.nvml as fake
from agent.config import NvmlDevice
from agent.drivers.nvml import NvmlDriver
from bench import harness
from hwsim.nvml.shm import NvmlShmWriter
from hwsim.state import GpuState, PodState


def make_pod(n: int) -> PodState:
    gpus = [
        GpuState(
            index=i,
            uuid=f"GPU-{i:08x}-0000-0000-0000-000000000000",
            name="NVIDIA H100 80GB HBM3",
            pci_bus_id=f"00000000:{i % 256:02X}:00.0",
            serial=f"{i:013d}",
            server=i // 8,
            loop="cdu-1",
            default_limit_w=700.0,
            min_limit_w=200.0,
            max_limit_w=700.0,
            power_limit_w=700.0,
            enforced_limit_w=700.0,
            power_w=500.0,
            power_avg_w=500.0,
        )
        for i in range(n)
    ]
    return PodState(name="bench", gpus=gpus)


# Rounds per figure, and the share of the default call counts (--quick: fewer calls).
OPTS = {"rounds": 3, "scale": 1.0}


def per_call_us(fn: Callable[[], Any], n: int = 20000) -> float:
    """CPU time (this process) per call, the median over the rounds of n calls."""
    return statistics.median(per_call_rounds(fn, n))


def per_call_rounds(fn: Callable[[], Any], n: int) -> list[float]:
    n = max(1, int(n * OPTS["scale"]))
    out = []
    for _ in range(int(OPTS["rounds"])):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        out.append((time.process_time() - t0) / n * 1e6)
    return out


def time_calls(lib: ModuleType, label: str) -> None:
    h = lib.nvmlDeviceGetHandleByIndex(0)
    calls: dict[str, Callable[[], Any]] = {
        "GetPowerUsage": lambda: lib.nvmlDeviceGetPowerUsage(h),
        "GetTemperature": lambda: lib.nvmlDeviceGetTemperature(h, lib.NVML_TEMPERATURE_GPU),
        "GetMemoryInfo": lambda: lib.nvmlDeviceGetMemoryInfo(h),
        "GetUtilizationRates": lambda: lib.nvmlDeviceGetUtilizationRates(h),
        "GetPowerManagementLimit": lambda: lib.nvmlDeviceGetPowerManagementLimit(h),
        "GetTotalEccErrors": lambda: lib.nvmlDeviceGetTotalEccErrors(
            h, lib.NVML_MEMORY_ERROR_TYPE_CORRECTED, lib.NVML_VOLATILE_ECC
        ),
        # The driver's per-GPU fields: two single-field calls vs one call for both.
        "GetFieldValues[MEM_TEMP]": lambda: lib.nvmlDeviceGetFieldValues(h, [lib.NVML_FI_DEV_MEMORY_TEMP]),
        "GetFieldValues[POWER_INSTANT]": lambda: lib.nvmlDeviceGetFieldValues(
            h, [lib.NVML_FI_DEV_POWER_INSTANT]
        ),
        "GetFieldValues[both]": lambda: lib.nvmlDeviceGetFieldValues(
            h, [lib.NVML_FI_DEV_MEMORY_TEMP, lib.NVML_FI_DEV_POWER_INSTANT]
        ),
    }
    for name, fn in calls.items():
        try:
            us = per_call_rounds(fn, 2000 if label == "pynvml" else 20000)
            print(f"{label:8} {name:32} {harness.fmt(us, 2):>24} us/call (CPU)")
        except lib.NVMLError as err:
            print(f"{label:8} {name:32} {err}")


async def time_driver(cfg: NvmlDevice, polls: int) -> float:
    drv = NvmlDriver(cfg)
    await drv.open()
    await drv.poll()
    t0 = time.process_time()
    for _ in range(polls):
        await drv.poll()
    dt = (time.process_time() - t0) / polls
    await drv.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=576)
    ap.add_argument("--real", action="store_true")
    harness.add_args(ap)
    args = ap.parse_args()
    OPTS["rounds"] = harness.rounds_of(args)
    if args.quick:
        args.gpus, OPTS["scale"] = 16, 0.01
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nvml.shm"
        pod = make_pod(args.gpus)
        writer = NvmlShmWriter(path, args.gpus)
        writer.publish(pod)
        pub = per_call_us(lambda: writer.publish(pod), 200)
        print(f"publish {args.gpus} GPUs: {pub / 1000:.2f} ms ({pub / args.gpus:.2f} us/GPU)")
        print(f"CPU time of this process, median (range) of {OPTS['rounds']} round(s)")
        fake.set_state_path(path)
        fake.nvmlInit()
        time_calls(fake, "fake")
        fake.nvmlShutdown()
        cfg = NvmlDevice.model_validate(
            {"id": "gpus", "kind": "nvml", "library": "hwsim", "hwsim_state": path}
        )
        dts = [asyncio.run(time_driver(cfg, 5)) for _ in range(int(OPTS["rounds"]))]
        dt = statistics.median(dts)
        print(
            f"driver poll of {args.gpus} GPUs (fake): {harness.fmt([d * 1000 for d in dts])} ms CPU "
            f"({dt / args.gpus * 1e6:.0f} us/GPU)"
        )
        writer.close()
    if args.real:
        pynvml.nvmlInit()
        time_calls(pynvml, "pynvml")
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        dt = asyncio.run(time_driver(NvmlDevice.model_validate({"id": "gpus", "kind": "nvml"}), 5))
        print(f"driver poll of {n} GPUs (pynvml): {dt * 1000:.1f} ms ({dt / max(n, 1) * 1e6:.0f} us/GPU)")


if __name__ == "__main__":
    main()
