"""CPU cost of SNMP polling (driver side only), before/after table, and of idle simulated agents.

    .venv/bin/python bench/snmp_cost.py [--polls 30] [--outlets 24] [--idle-agents 32] [--rounds 3] [--quick]

The agent under test runs in a child process, so the CPU measured here is the driver's alone
(encode/decode, v3 crypto, our table walk and scaling). Rows, per vendor and SNMP version:

- ``before``: the driver as of commit c6850a1 (pysnmp, every table every poll, fixed
  max-repetitions), loaded from git; skipped when git or that commit is not there.
- ``pysnmp/all``: today's driver on pysnmp walking every table every poll (adaptive
  max-repetitions only).
- ``pysnmp/cadence``: pysnmp with the profile's per-table cadence (outlet tables every 5th poll).
- ``netsnmp/all``, ``netsnmp/cadence``: the same on net-snmp's C library (netsnmp-cffi), v2c and
  v3 (authPriv SHA + AES-128).
- ``native/all``, ``native/cadence``: podagent's own v2c client (``agent/drivers/snmp_v2c.py``,
  the default for v2c).

"CPU/poll" is the mean over ``--polls`` polls (a multiple of 5 averages the cadence); "values/poll"
the mean readings a poll returns; "CPU/value" divides the two. The pod projection is the full pod of
design.md: 24 v2c + 8 v3 PDUs polled every second, APC-shaped (the larger table), as a share of one
core (the agent's whole budget at that size is 15%).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import SnmpDevice
from agent.drivers.snmp import SnmpDriver
from bench import harness
from hwsim.snmp_pdu import start_snmp_agent
from hwsim.state import OutletState, PduState, PhaseState

ROOT = Path(__file__).resolve().parent.parent
USER, AUTH, PRIV = "bench", "bench-auth-key", "bench-priv-key"
BEFORE_COMMIT = "c6850a1"
POD_V2C, POD_V3 = 24, 8


def make_pdu(vendor: str, outlets: int) -> PduState:
    phases = [
        PhaseState(index=i, current_a=20.0 + i, power_w=4500.0, apparent_power_va=4600.0) for i in (1, 2, 3)
    ]
    outs = [
        OutletState(index=o, name=f"o{o}", phase=(o - 1) % 3 + 1, current_a=2.5, power_w=560.0, energy_wh=9e5)
        for o in range(1, outlets + 1)
    ]
    return PduState(
        id=f"pdu-{vendor}", vendor=vendor, model="bench", rating_a=63.0, phases=phases, outlets=outs,
        power_w=13500.0, apparent_power_va=13800.0, energy_wh=4.2e6,
    )  # fmt: skip


async def serve(vendor: str, version: str, outlets: int) -> None:
    v3 = {"v3_user": USER, "v3_auth_key": AUTH, "v3_priv_key": PRIV} if version == "3" else {}
    h = await start_snmp_agent(make_pdu(vendor, outlets), version=version, **v3)  # type: ignore[arg-type]
    print(h.port, flush=True)
    await asyncio.Event().wait()


def load_before() -> ModuleType | None:
    """The driver module as of BEFORE_COMMIT (the baseline), or None."""
    try:
        src = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:agent/drivers/snmp.py"],
            capture_output=True, check=True, text=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "snmp_before.py"
    # Its @register("snmp") would clash with today's driver in the registry: not needed here.
    path.write_text(src.replace('@register("snmp")\n', ""))
    spec = importlib.util.spec_from_file_location("snmp_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["snmp_before"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


VARIANTS = (
    "before", "pysnmp/all", "pysnmp/cadence", "netsnmp/all", "netsnmp/cadence", "native/all", "native/cadence"
)  # fmt: skip


async def measure(
    *, vendor: str, version: str, variant: str, port: int, polls: int, before: Any, server_pid: int
) -> dict[str, float]:
    creds: dict[str, object] = (
        {"user": USER, "auth_key": AUTH, "priv_key": PRIV} if version == "3" else {"community": "public"}
    )
    profile = {"apc": "apc-rpdu2", "raritan": "raritan-pdu2"}[vendor]
    transport, _, cadence = variant.partition("/")
    extra: dict[str, object] = {}
    if variant != "before":
        extra = {"transport": transport, "slow_table_every": None if cadence == "cadence" else 1}
    cfg = SnmpDevice(kind="snmp", id="bench", profile=profile, host="127.0.0.1", port=port,
                     version=version, max_repetitions=25, **creds, **extra)  # type: ignore[arg-type]  # fmt: skip
    d = before.SnmpDriver(cfg) if variant == "before" else SnmpDriver(cfg)
    await d.open()
    try:
        for _ in range(5):  # warm-up: engine discovery, static tables, MIB view, one full cadence
            await d.poll()
        values = 0
        c0, t0, s0 = time.process_time(), time.perf_counter(), harness.proc_cpu_s(server_pid)
        for _ in range(polls):
            values += len(await d.poll())
        cpu = (time.process_time() - c0) / polls
        wall = (time.perf_counter() - t0) / polls
        server = (harness.proc_cpu_s(server_pid) - s0) / polls
    finally:
        await d.close()
    per_poll = values / polls
    return {
        "cpu": cpu,
        "wall": wall,
        "values": per_poll,
        "per_value": cpu / per_poll,
        "hwsim_per_value": server / per_poll,
    }


async def table(
    polls: int, outlets: int, n_rounds: int, variants: tuple[str, ...], vendors: tuple[str, ...]
) -> dict[tuple[str, str, str], dict[str, float]]:
    before = load_before() if "before" in variants else None
    results: dict[tuple[str, str, str], dict[str, float]] = {}
    print(f"CPU time per process, median (range) of {n_rounds} round(s); hwsim = the simulated PDU's process")
    print(f"{'PDU':8} {'ver':3} {'variant':16} {'values/poll':>11} {'CPU/poll ms':>11} {'wall/poll ms':>12} "
          f"{'CPU/value us':>24} {'hwsim CPU/value us':>24}")  # fmt: skip
    for vendor in vendors:
        for version in ("2c", "3"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--serve",
                vendor,
                version,
                str(outlets),
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            port = int((await proc.stdout.readline()).decode())
            try:
                for variant in variants:
                    if (variant == "before" and before is None) or (
                        variant.startswith("native") and version == "3"
                    ):
                        continue  # no baseline here; the native client is v2c only
                    rs = [
                        await measure(
                            vendor=vendor, version=version, variant=variant, port=port, polls=polls,
                            before=before, server_pid=proc.pid,
                        )
                        for _ in range(n_rounds)
                    ]  # fmt: skip
                    r = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
                    results[(vendor, version, variant)] = r
                    per_value = harness.fmt([x["per_value"] * 1e6 for x in rs])
                    hw = harness.fmt([x["hwsim_per_value"] * 1e6 for x in rs])
                    print(f"{vendor:8} v{version:2} {variant:16} {r['values']:11.1f} {r['cpu'] * 1e3:11.2f} "
                          f"{r['wall'] * 1e3:12.2f} {per_value:>24} {hw:>24}")  # fmt: skip
            finally:
                proc.terminate()
                await proc.wait()
    return results


def projection(results: dict[tuple[str, str, str], dict[str, float]]) -> None:
    print(f"\nfull pod: {POD_V2C} v2c + {POD_V3} v3 APC-shaped PDUs polled every 1 s (share of one core)")

    def pod(v2c: str, v3: str) -> None:
        a, b = results.get(("apc", "2c", v2c)), results.get(("apc", "3", v3))
        if a and b:
            share = POD_V2C * a["cpu"] + POD_V3 * b["cpu"]
            print(f"  v2c {v2c:16} v3 {v3:16} {share * 100:6.1f}%")

    pod("before", "before")
    pod("pysnmp/all", "pysnmp/all")
    pod("pysnmp/cadence", "pysnmp/cadence")
    pod("netsnmp/all", "pysnmp/all")
    pod("netsnmp/cadence", "pysnmp/cadence")
    pod("netsnmp/all", "netsnmp/all")
    pod("netsnmp/cadence", "netsnmp/cadence")
    pod("native/all", "netsnmp/all")
    pod("native/cadence", "netsnmp/cadence")


async def idle(agents: int, seconds: float) -> None:
    t0 = time.perf_counter()
    handles = [await start_snmp_agent(make_pdu("apc" if i % 2 else "raritan", 24)) for i in range(agents)]
    start_s = time.perf_counter() - t0
    c0 = time.process_time()
    await asyncio.sleep(seconds)
    cpu = time.process_time() - c0
    for h in handles:
        h.close()
    print(
        f"{agents} idle agents: start {start_s:.2f} s, CPU {cpu / seconds * 100:.2f}% of one core while idle"
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--polls", type=int, default=30)
    ap.add_argument("--outlets", type=int, default=24)
    ap.add_argument("--idle-agents", type=int, default=32)
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--serve", nargs=3, metavar=("VENDOR", "VERSION", "OUTLETS"))
    ap.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--vendors", default="apc,raritan")
    harness.add_args(ap)
    args = ap.parse_args()
    if args.serve:
        await serve(args.serve[0], args.serve[1], int(args.serve[2]))
        return
    variants = tuple(args.variants.split(",")) if args.variants else VARIANTS
    vendors = tuple(args.vendors.split(","))
    if args.quick:
        args.polls, args.idle_agents, args.idle_s = 5, 2, 0.5
        variants, vendors = ("native/cadence",), ("apc",)
    projection(await table(args.polls, args.outlets, harness.rounds_of(args), variants, vendors))
    if args.idle_agents:
        await idle(args.idle_agents, args.idle_s)


if __name__ == "__main__":
    asyncio.run(main())
