"""podagent next to collectd 5.12 (Debian collectd-core): CPU per SNMP value and per Modbus register.

    .venv/bin/python bench/vs_collectd.py [--protocol snmp|modbus|both] [--pod full] [--seconds 30]
                                          [--rounds 3] [--quick] [--baseline CHECKOUT]
                                          [--in-flight 8] [--profile DIR] [--burners 2]

One hwsim pod; podagent (``podagent run``, only the devices compared: no NVML, host, interlocks,
MQTT, Prometheus or control socket) and collectd (``collectd -f``, only the plugin compared and
unixsock) poll the SAME simulated devices in the same run, at the same cadence, for the same
values:

- SNMP: the pod's v2c PDUs; for every column of every non-static table of the device's profile
  (``config/profiles/*.toml``) collectd has one ``<Data>`` (``Table true``); tables the profile walks
  every poll go in a ``<Host>`` with ``Interval`` = the agent's poll interval, tables it walks every
  5th poll (``every = 5``) in a second ``<Host>`` with 5x that interval;
- Modbus: the pod's Modbus TCP units; one ``<Data>`` per register point of the profile (collectd's
  modbus plugin reads holding and input registers; the agent also reads the profile's coils), each
  host at the agent's interval for it.

The values each poller gets per second come from collectd's value cache (unixsock ``LISTVAL``: one
identifier per value), the same OIDs/registers for both. Figures are CPU time per process
(``bench/harness.py``), median and range of ``--rounds`` windows: on a shared machine they hold
where wall-clock shares do not. collectd's own figure moves with the machine's load (34-83 us per
SNMP value on the same day), so ``--baseline CHECKOUT`` also runs the podagent of another checkout
(``git worktree add /tmp/base <commit>``) in the same run, on the same devices: "podagent /
baseline" is then a before/after ratio that the load cannot tilt.

``--burners N`` keeps N busy loops running through the measured windows (``make test-loaded``
runs the suite beside 2): each process's CPU per wake-up depends on whether the cores were idle,
collectd's (~120 wake-ups a second for 48 registers) most of all.

``--in-flight N`` is the ``max_in_flight`` podagent's Modbus devices (and the baseline's) get
(hwsim's server queues requests; 1 is the agent's default, for devices that do not);
``--profile DIR`` runs podagent under cProfile on the CPU-time clock and writes ``DIR/<protocol>.pstats``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402
from hwsim.agentconf import FAST_POLL_S, polled_fast, render_agent_config  # noqa: E402

PROFILES = ROOT / "config" / "profiles"
POLL_S = 1.0
TYPES_DB = "/usr/share/collectd/types.db"
MODBUS_TYPE = {
    ("int16", "big"): "Int16",
    ("int16", "little"): "Int16",
    ("uint16", "big"): "Uint16",
    ("uint16", "little"): "Uint16",
    ("int32", "big"): "Int32",
    ("int32", "little"): "Int32LE",
    ("uint32", "big"): "Uint32",
    ("uint32", "little"): "Uint32LE",
    ("float32", "big"): "Float",
    ("float32", "little"): "FloatLE",
}


def profile(name: str) -> dict[str, Any]:
    with (PROFILES / f"{name}.toml").open("rb") as f:
        return tomllib.load(f)


# ------------------------------------------------------------------------------ collectd config


def snmp_config(entries: list[dict[str, Any]]) -> str:
    data: list[str] = []
    hosts: list[str] = []
    defined: set[str] = set()
    for e in entries:
        prof = profile(e["profile"])
        groups: dict[int, list[str]] = {}
        for tname, t in prof["tables"].items():
            if t.get("static"):
                continue  # configuration columns: the agent reads them once
            for col in t["columns"]:
                dname = f"{e['profile']}_{tname}_{col}"
                if dname not in defined:
                    defined.add(dname)
                    data.append(
                        f'  <Data "{dname}">\n    Table true\n    Type "gauge"\n'
                        f'    TypeInstancePrefix "{tname}_{col}_"\n    Values "{t["entry"]}.{col}"\n  </Data>'
                    )
                groups.setdefault(int(t.get("every", 1)), []).append(dname)
        for every, names in sorted(groups.items()):
            collect = " ".join(f'"{n}"' for n in names)
            hosts.append(
                f'  <Host "{e["device"]}-every{every}">\n    Address "{e["host"]}:{e["port"]}"\n'
                f'    Version 2\n    Community "{e["community"]}"\n    Collect {collect}\n'
                f"    Interval {POLL_S * every:g}\n    Timeout 2\n    Retries 0\n  </Host>"
            )
    return "LoadPlugin snmp\n<Plugin snmp>\n" + "\n".join(data + hosts) + "\n</Plugin>\n"


def modbus_config(entries: list[dict[str, Any]]) -> str:
    data: list[str] = []
    hosts: list[str] = []
    defined: set[str] = set()
    for e in entries:
        prof = profile(e["profile"])
        order = prof.get("device", {}).get("word_order", "big")
        names = []
        for p in prof["points"]:
            if p["table"] not in ("holding", "input"):
                continue
            dname = f"{e['profile']}_{p['metric']}"
            if dname not in defined:
                defined.add(dname)
                cmd = "ReadHolding" if p["table"] == "holding" else "ReadInput"
                data.append(
                    f'  <Data "{dname}">\n    RegisterBase {p["address"]}\n'
                    f"    RegisterType {MODBUS_TYPE[(p['type'], order)]}\n    RegisterCmd {cmd}\n"
                    f'    Type "gauge"\n    Instance "{p["metric"]}"\n  </Data>'
                )
            names.append(dname)
        interval = FAST_POLL_S if polled_fast(e["profile"]) else POLL_S
        collect = "\n".join(f'      Collect "{n}"' for n in names)
        hosts.append(
            f'  <Host "{e["device"]}">\n    Address "{e["host"]}"\n    Port "{e["port"]}"\n'
            f'    Interval {interval:g}\n    <Slave {e["unit"]}>\n      Instance "{e["device"]}"\n'
            f"{collect}\n    </Slave>\n  </Host>"
        )
    return "LoadPlugin modbus\n<Plugin modbus>\n" + "\n".join(data + hosts) + "\n</Plugin>\n"


def collectd_conf(work: Path, plugin: str) -> tuple[Path, Path]:
    sock = work / "collectd.sock"
    conf = work / "collectd.conf"
    conf.write_text(
        f'Hostname "bench"\nFQDNLookup false\nBaseDir "{work}"\nPIDFile "{work}/collectd.pid"\n'
        f'TypesDB "{TYPES_DB}"\nInterval {POLL_S:g}\nReadThreads 5\n'
        f'LoadPlugin unixsock\n<Plugin unixsock>\n  SocketFile "{sock}"\n</Plugin>\n' + plugin
    )
    return conf, sock


def listval(sock: Path) -> list[tuple[float, str]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        f = s.makefile("rw")
        f.write("LISTVAL\n")
        f.flush()
        head = f.readline()
        n = int(head.split()[0])
        out = []
        for _ in range(max(0, n)):
            t, ident = f.readline().split(maxsplit=1)
            out.append((float(t), ident.strip()))
        return out


def values_per_s(sock: Path, entries: list[dict[str, Any]], protocol: str) -> float:
    """Values per second collectd gets (and asks for): identifiers in its cache, by host interval."""
    idents = [i for _, i in listval(sock)]
    rate = 0.0
    for ident in idents:
        host, plugin = ident.split("/")[:2]  # snmp: host = the <Host> name; modbus: plugin-<Slave instance>
        if protocol == "snmp":
            every = int(host.rsplit("-every", 1)[1]) if "-every" in host else 1
            rate += 1.0 / (POLL_S * every)
        else:
            entry = next((e for e in entries if plugin == f"modbus-{e['device']}"), None)
            fast = entry is not None and polled_fast(entry["profile"])
            rate += 1.0 / (FAST_POLL_S if fast else POLL_S)
    return rate


def agent_points_per_s(entries: list[dict[str, Any]]) -> float:
    """Modbus: every point the agent reads per second (its profiles' coils included)."""
    rate = 0.0
    for e in entries:
        interval = FAST_POLL_S if polled_fast(e["profile"]) else POLL_S
        rate += len(profile(e["profile"])["points"]) / interval
    return rate


def agent_config(manifest: dict[str, Any], snmp: list[Any], modbus: list[Any], state: Path) -> str:
    topo = dict(manifest.get("topology", {}))
    topo.pop("battery", None)
    topo.pop("site_meter", None)
    only = {**manifest, "snmp": snmp, "modbus": modbus, "topology": topo}
    extra = (
        "[prometheus]\nenabled = false\n\n[control]\nenabled = false\n\n[interlocks]\nenabled = false\n\n"
        "[mqtt]\nenabled = false\n"
    )
    text = render_agent_config(only, state_dir=str(state), extra=extra, poll_interval_s=POLL_S)
    head, *blocks = text.split("[[device]]")
    keep = [b for b in blocks if 'kind = "nvml"' not in b and 'kind = "host"' not in b]
    return head + "".join("[[device]]" + b for b in keep)


# ------------------------------------------------------------------------------------ running


def profiled(where: Path | None, protocol: str) -> list[str]:
    """Python arguments that run ``-m agent.cli ...`` under cProfile on the CPU-time clock (so
    waiting, for the loop or for a busy machine, costs nothing), stats written at exit."""
    if where is None:
        return []
    code = (
        "import cProfile, runpy, sys, time\n"
        "p = cProfile.Profile(time.process_time)\n"
        "sys.argv = sys.argv[2:]\n"  # past '-m agent.cli': what agent.cli parses
        "p.enable()\n"
        "try:\n    runpy.run_module('agent.cli', run_name='__main__', alter_sys=True)\n"
        f"finally:\n    p.disable()\n    p.dump_stats({str(where / f'{protocol}.pstats')!r})\n"
    )
    return ["-c", code]


def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def compare(
    protocol: str, manifest: dict[str, Any], work: Path, hw_pid: int, args: argparse.Namespace
) -> None:
    if protocol == "snmp":
        entries = [e for e in manifest["snmp"] if e["version"] == "2c"]
        snmp, modbus, plugin = entries, [], snmp_config(entries)
    else:
        entries = [e for e in manifest["modbus"] if "host" in e]
        snmp, modbus, plugin = [], entries, modbus_config(entries)
    if not entries:
        print(f"{protocol}: the pod has no such devices")
        return
    d = work / protocol
    d.mkdir()
    conf, sock = collectd_conf(d, plugin)
    cfg = d / "podagent.toml"

    # hwsim's Modbus server answers every request it has read, in order: podagent may send a
    # poll's requests back to back (the baseline too: max_in_flight is older than the benches).
    def in_flight(text: str) -> str:
        return text.replace('kind = "modbus"', f'kind = "modbus"\nmax_in_flight = {args.in_flight}')

    cfg.write_text(in_flight(agent_config(manifest, snmp, modbus, d / "state")))
    cd_log, ag_log = d / "collectd.log", d / "agent.log"
    collectd = subprocess.Popen(
        ["collectd", "-f", "-C", str(conf)], stdout=cd_log.open("wb"), stderr=subprocess.STDOUT
    )
    agent = subprocess.Popen(
        [sys.executable, *profiled(args.profile, protocol), "-m", "agent.cli", "run", "--config", str(cfg)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=ag_log.open("wb"),
    )
    pids = {"agent": agent.pid, "collectd": collectd.pid, "hwsim": hw_pid}
    baseline: subprocess.Popen[bytes] | None = None
    if args.baseline:
        base_cfg = d / "baseline.toml"
        base_cfg.write_text(in_flight(agent_config(manifest, snmp, modbus, d / "state-baseline")))
        baseline = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(base_cfg)],
            cwd=args.baseline,
            env={**os.environ, "PYTHONPATH": str(args.baseline)},
            stdout=subprocess.DEVNULL,
            stderr=(d / "baseline.log").open("wb"),
        )
        pids["baseline"] = baseline.pid
    rows: list[dict[str, float]] = []
    burners: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(sock, collectd, "collectd", cd_log)
        time.sleep(3 if args.quick else 12)  # past start-up: imports, MIB loading, a full outlet cadence
        if agent.poll() is not None:
            raise SystemExit(f"podagent exited:\n{ag_log.read_text()[-3000:]}")
        cd_rate = values_per_s(sock, entries, protocol)
        ag_rate = cd_rate if protocol == "snmp" else agent_points_per_s(entries)
        burners.extend(subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(args.burners))
        if burners:
            time.sleep(5)  # the pollers settle into the busy machine's timing
        for _ in range(harness.rounds_of(args)):
            w = harness.CpuWindow(pids).start()
            time.sleep(args.seconds)
            w.stop()
            ag_us = 1e6 * w.cpu_s["agent"] / (ag_rate * w.wall_s) if ag_rate else math.nan
            cd_us = 1e6 * w.cpu_s["collectd"] / (cd_rate * w.wall_s) if cd_rate else math.nan
            unit = "value" if protocol == "snmp" else "register point"
            answered = ag_rate * (2 if baseline is not None else 1) + cd_rate
            row = {
                f"podagent CPU us per {unit}": ag_us,
                f"collectd CPU us per {unit}": cd_us,
                "ratio podagent / collectd": ag_us / cd_us if cd_us else math.nan,
                "podagent, % of a core": w.pct("agent"),
                "collectd, % of a core": w.pct("collectd"),
                "hwsim (physics + answering all), % of a core": w.pct("hwsim"),
                f"hwsim CPU us per {unit} answered (physics included)": (
                    1e6 * w.cpu_s["hwsim"] / (answered * w.wall_s) if answered else math.nan
                ),
            }
            if baseline is not None:
                base_us = 1e6 * w.cpu_s["baseline"] / (ag_rate * w.wall_s) if ag_rate else math.nan
                row[f"baseline podagent CPU us per {unit}"] = base_us
                row["ratio podagent / baseline"] = ag_us / base_us if base_us else math.nan
            rows.append(row)
    finally:
        for b in burners:
            b.kill()
            b.wait()
        for p in (agent, collectd, *([baseline] if baseline else [])):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
    kind = "v2c PDUs" if protocol == "snmp" else "Modbus TCP units"
    print(
        f"\n{protocol}: {len(entries)} {kind}; collectd gets {cd_rate:,.0f} values/s, podagent "
        f"{ag_rate:,.0f}/s (same {'OIDs' if protocol == 'snmp' else 'registers'} and cadence)"
    )
    harness.summary(
        rows,
        title=f"{protocol}, {args.seconds:.0f} s windows (CPU time per process)",
        digits={"ratio podagent / collectd": 2, "ratio podagent / baseline": 2},
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocol", choices=("snmp", "modbus", "both"), default="both")
    ap.add_argument("--pod", default="full")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--baseline", type=Path, help="a checkout whose podagent runs alongside, same devices")
    ap.add_argument("--in-flight", type=int, default=8, help="podagent's Modbus max_in_flight")
    ap.add_argument("--profile", type=Path, help="run podagent under cProfile, stats written here")
    ap.add_argument(
        "--burners",
        type=int,
        default=0,
        help="CPU burners (busy Python loops) running through the measured windows, as on CI's machine",
    )
    harness.add_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.pod, args.seconds = "tiny", 3.0
    work = Path(tempfile.mkdtemp(prefix="vs-collectd-"))
    log = work / "hwsim.log"
    pod = subprocess.Popen(
        [sys.executable, "-m", "hwsim.cli", "run", "--pod", args.pod, "--run-dir", str(work / "pod")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        wait_for(work / "pod" / "manifest.json", pod, "hwsim", log, timeout=300.0)
        manifest = json.loads((work / "pod" / "manifest.json").read_text())
        for protocol in ("snmp", "modbus") if args.protocol == "both" else (args.protocol,):
            compare(protocol, manifest, work, pod.pid, args)
    finally:
        pod.send_signal(signal.SIGTERM)
        try:
            pod.wait(20)
        except subprocess.TimeoutExpired:
            pod.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
