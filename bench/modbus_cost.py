"""CPU cost of Modbus TCP polling: the agent's driver, and hwsim's server answering it.

    .venv/bin/python bench/modbus_cost.py [--polls 200] [--rounds 3] [--quick]

Each simulated unit (the demo pod's CDU, chiller, BMS, site meter and a metered Modbus PDU, served
through the same profile the agent reads) runs in a child process; the agent's ``ModbusDriver``
polls it here. Printed per unit: registers and values per poll, the driver's CPU per poll and per
value (this process), and hwsim's CPU per register answered (the child's CPU time), median and
range of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import ModbusDevice
from agent.drivers.modbus import ModbusDriver, load_profile
from bench import harness

UNITS = {
    "cdu": "generic-cdu",
    "chiller": "generic-chiller",
    "bms": "generic-bms",
    "meter": "generic-site-meter",
    "pdu": "modbus-pdu",
}


def unit_state(kind: str) -> object:
    from hwsim.physics import Physics
    from hwsim.podspec import load_pod_spec

    st = Physics(load_pod_spec("demo"), seed=1).state
    if kind == "cdu":
        return st.cdus[0]
    if kind == "chiller":
        return st.chillers[0]
    if kind == "bms":
        return st.battery
    if kind == "meter":
        return st.site_meter
    from bench.snmp_cost import make_pdu

    return make_pdu("modbus", 24)


async def serve(kind: str) -> None:
    from hwsim.modbus_devices import start_modbus_tcp

    h = await start_modbus_tcp(unit_state(kind), profile=UNITS[kind])  # type: ignore[arg-type]
    print(f"PORT {h.port}", flush=True)
    await asyncio.Event().wait()


def registers_per_poll(profile: str) -> int:
    return sum(p.width for p in load_profile(profile).points)


async def measure(kind: str, port: int, polls: int, server_pid: int) -> dict[str, float]:
    cfg = ModbusDevice(kind="modbus", id=f"bench-{kind}", profile=UNITS[kind], host="127.0.0.1", port=port)
    d = ModbusDriver(cfg)
    await d.open()
    try:
        for _ in range(3):
            await d.poll()
        values = 0
        c0, s0 = time.process_time(), harness.proc_cpu_s(server_pid)
        for _ in range(polls):
            values += len(await d.poll())
        cpu = (time.process_time() - c0) / polls
        server = (harness.proc_cpu_s(server_pid) - s0) / polls
    finally:
        await d.close()
    regs = registers_per_poll(UNITS[kind])
    return {
        "values": values / polls,
        "cpu": cpu,
        "per_value": cpu / (values / polls),
        "hwsim_per_reg": server / regs,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--polls", type=int, default=200)
    ap.add_argument("--serve", metavar="KIND")
    harness.add_args(ap)
    args = ap.parse_args()
    if args.serve:
        await serve(args.serve)
        return
    if args.quick:
        args.polls = 10
    n = harness.rounds_of(args)
    print(f"CPU time per process, median (range) of {n} round(s) of {args.polls} polls")
    print(f"{'unit':8} {'profile':20} {'regs/poll':>9} {'values/poll':>11} {'CPU/poll ms':>11} "
          f"{'agent CPU/value us':>22} {'hwsim CPU/register us':>22}")  # fmt: skip
    for kind, profile in UNITS.items():
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve",
            kind,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        try:
            while not (line := (await proc.stdout.readline()).decode()).startswith("PORT "):
                if not line:
                    raise SystemExit(f"the {kind} server did not start")
            port = int(line.split()[1])
            rs = [await measure(kind, port, args.polls, proc.pid) for _ in range(n)]
        finally:
            proc.terminate()
            await proc.wait()
        cpu = statistics.median(r["cpu"] for r in rs)
        print(f"{kind:8} {profile:20} {registers_per_poll(profile):9} {rs[0]['values']:11.1f} "
              f"{cpu * 1e3:11.2f} {harness.fmt([r['per_value'] * 1e6 for r in rs]):>22} "
              f"{harness.fmt([r['hwsim_per_reg'] * 1e6 for r in rs]):>22}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
