"""What the controller costs per node agent: ``podagent run`` against N real ``podagent node``
processes (4 GPUs each, 1 Hz), with the PDUs, CDU and chiller of a simulated pod around them.

Prints the controller's CPU (share of one core) and RSS for each N, median and range over
``--rounds`` (default 3), and the slope per node (least squares over the medians), from which the
full pod (144 nodes) can be read off.

Usage: .venv/bin/python bench/controller_nodes.py [--nodes 1 8 16] [--rounds 3] [--seconds 15]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import CpuWindow
from bench.pod_full import histogram_quantile, metrics, per_device
from hwsim.agentconf import NodeLayout, render_agent_config, render_node_config
from hwsim.podspec import POD_DIR
from tests import conftest, node_helpers
from tests.conftest import start_pod, stop_pod
from tests.node_helpers import NodeProc, free_port, wait_armed

START_S = 8.0
PROFILE_WINDOW = """
import asyncio, cProfile, sys, time
out, start, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
sys.argv = ["podagent", *sys.argv[4:]]
prof, real_run = cProfile.Profile(time.process_time), asyncio.Runner.run  # CPU, not wall: a busy machine
def stop():
    prof.disable()
    prof.dump_stats(out)
async def profiled(main):
    loop = asyncio.get_running_loop()
    loop.call_later(start, prof.enable)
    loop.call_later(start + seconds, stop)
    return await main
asyncio.Runner.run = lambda self, main, **kw: real_run(self, profiled(main), **kw)  # agent/cli.py run()
from agent.cli import main
sys.exit(main())
"""
PDU_PAIR_SERVERS = 48  # hwsim's PDUs have at most 64 outlets: an A/B pair per 48 servers


def pod_file(tmp: Path, nodes: int, cooling: str = "scaled") -> Path:
    text = (POD_DIR / "tiny.toml").read_text().replace('name = "tiny"', f'name = "n{nodes}"')
    text = text.replace("count = 1\ngpus_per_server = 8", f"count = {nodes}\ngpus_per_server = 4")
    text = text.replace("outlets_per_feed = 3", "outlets_per_feed = 1")
    text = text.replace("rating_a = 16.0", "rating_a = 200.0")
    start, end = text.index("[[pdu]]"), text.index("[[cdu]]")
    pair = text[start:end]
    pairs = []
    for k, first in enumerate(range(0, nodes, PDU_PAIR_SERVERS)):
        chunk = list(range(first, min(nodes, first + PDU_PAIR_SERVERS)))
        block = pair.replace("servers = [0]", f"servers = {chunk}")
        block = block.replace("outlets = 24", f"outlets = {max(24, len(chunk))}")  # one per server
        if k:  # the first pair keeps its ids (the branch meter measures pdu-a and pdu-b)
            block = block.replace('"pdu-a"', f'"pdu-a{k}"').replace('"pdu-b"', f'"pdu-b{k}"')
        pairs.append(block)
    rest = text[end:].replace("servers = [0]", f"servers = {list(range(nodes))}")  # one loop
    if cooling == "scaled":
        # tiny's loop, chiller and branch meter are sized for its one 8-GPU server: N servers on
        # them overheat (every GPU tripped, the coolant and the meter too: the figures before
        # 2026-12-07 were measured so). Scaled per server as in tiny, the pod runs untripped.
        for key, per in (
            ("nominal_flow_lpm = 20.0", 20.0),
            ("loop_volume_l = 3.0", 3.0),
            ("ua_kw_per_k = 1.2", 1.2),
            ("capacity_kw = 25.0", 25.0),
            ("water_volume_l = 2.5", 2.5),
        ):
            name = key.split(" = ")[0]
            assert key in rest, key
            rest = rest.replace(key, f"{name} = {per * nodes:.1f}")
        assert "rating_a = 32.0" in rest
        rest = rest.replace("rating_a = 32.0", f"rating_a = {max(32.0, 16.0 * nodes):.1f}")
    path = tmp / f"n{nodes}.toml"
    path.write_text(text[:start] + "".join(pairs) + rest)
    return path


def window_quantile(before: str, after: str, family: str, device: str, q: float) -> float | None:
    """The q-quantile of one device's histogram over the window between two scrapes (the buckets'
    increase, as Prometheus' histogram_quantile over a rate)."""
    bucket = rf'^{family}_bucket\{{device="{re.escape(device)}",le="([^"]+)"\}} ([0-9.e+]+)$'
    b0 = {m.group(1): float(m.group(2)) for m in re.finditer(bucket, before, re.M)}
    increase = "\n".join(
        f'{family}_bucket{{device="{device}",le="{le}"}} {float(n) - b0.get(le, 0.0)}'
        for le, n in (m.groups() for m in re.finditer(bucket, after, re.M))
    )
    return histogram_quantile(increase, family, q, device)


def poll_figures(before: str, after: str) -> tuple[int, float]:
    """Missed deadlines of every device over the window, and the worst device's poll p99 (s)."""
    m0 = per_device(before, "podagent_poll_missed_deadlines_total")
    m1 = per_device(after, "podagent_poll_missed_deadlines_total")
    missed = sum(m1.values()) - sum(m0.values())
    p99 = [
        window_quantile(before, after, "podagent_poll_duration_seconds", d, 0.99)
        for d in per_device(after, "podagent_device_polls_total")
    ]
    return missed, max((x for x in p99 if x is not None), default=math.nan)


def one_round(
    nodes: int,
    seconds: float,
    profile: Path | None = None,
    keep_log: Path | None = None,
    cooling: str = "scaled",
) -> tuple[float, float, int, float]:
    with tempfile.TemporaryDirectory(prefix="ctlbench") as d:
        tmp = Path(d)
        pod = start_pod(tmp / "pod", str(pod_file(tmp, nodes, cooling)))
        procs: list[NodeProc] = []
        ctl: subprocess.Popen[bytes] | None = None
        try:
            key = tmp / "pod.key"
            key.write_text(os.urandom(32).hex())
            layout = NodeLayout(key_file=str(key), ports={s: free_port() for s in range(nodes)})

            def start(s: int) -> NodeProc:
                cfg = tmp / f"node-{s}.toml"
                cfg.write_text(
                    render_node_config(
                        pod.manifest,
                        s,
                        layout,
                        controller_lost_after_s=600.0,
                        extra='[logging]\nformat = "json"\n',
                    )
                )
                node = NodeProc(server=s, port=layout.ports[s], config=cfg, log=tmp / f"node-{s}.log")
                node.start()
                return node

            procs.extend(start(s) for s in range(nodes))
            for i, node in enumerate(procs):
                for attempt in range(3):
                    try:
                        wait_armed(procs[i], timeout=120)
                        break
                    except RuntimeError:
                        # Its port was taken between choosing and binding (other jobs on this
                        # machine bind port 0 too): a new port, before the controller's config.
                        if attempt == 2:
                            raise
                        procs[i].kill()
                        layout.ports[node.server] = free_port()
                        procs[i] = start(node.server)
            cfg = tmp / "ctl.toml"
            prom = free_port()
            cfg.write_text(
                render_agent_config(
                    pod.manifest,
                    state_dir=str(tmp / "state"),
                    extra=f'[prometheus]\nlisten = "127.0.0.1:{prom}"\n'
                    '[logging]\nformat = "json"\nlevel = "warning"\n',
                    nodes=layout,
                )
            )
            log = (tmp / "ctl.log").open("wb")
            run = ["-m", "agent.cli"]
            if profile is not None:  # the event loop's thread, over the measured window only
                run = ["-c", PROFILE_WINDOW, str(profile), str(START_S), str(seconds - 3)]
            ctl = subprocess.Popen(
                [sys.executable, *run, "run", "--config", str(cfg)],
                cwd=conftest.ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            proc = psutil.Process(ctl.pid)
            time.sleep(START_S)  # start, first polls, interlocks armed
            assert ctl.poll() is None, (tmp / "ctl.log").read_text()
            before = metrics(prom)  # scraped outside the window: the scrape is not the pod's cost
            window = CpuWindow({"ctl": ctl.pid}, tree=False).start()  # the scheduler's ns
            t0, rss = time.monotonic(), 0
            while time.monotonic() - t0 < seconds:
                time.sleep(1.0)
                rss = max(rss, proc.memory_info().rss)
            cpu = window.stop().pct("ctl")
            missed, p99 = poll_figures(before, metrics(prom))
            return cpu, rss / 2**20, missed, p99
        finally:
            if ctl is not None:
                ctl.terminate()
                try:
                    ctl.wait(20)
                except subprocess.TimeoutExpired:
                    ctl.kill()
                if keep_log is not None:  # what the controller logged (warnings: trips, failures)
                    keep_log.write_bytes((tmp / "ctl.log").read_bytes())
            for node in procs:
                node.kill()
            stop_pod(pod)


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument(
        "--profile", type=Path, help="one round of the first --nodes under cProfile (CPU time), to FILE"
    )
    ap.add_argument("--quick", action="store_true", help="CI smoke: 2 nodes, one short round")
    ap.add_argument("--log", type=Path, help="with --profile: keep the controller's log in FILE")
    ap.add_argument(
        "--cooling",
        choices=["scaled", "tiny"],
        default="scaled",
        help="scaled: loop, chiller and meter sized per server (no trips); tiny: tiny's, overheated "
        "by N servers (every GPU tripped: the scenario of the figures before 2026-12-07)",
    )
    ap.add_argument(
        "--root",
        type=Path,
        help="run the controller and nodes from this checkout (a baseline in the same run)",
    )
    args = ap.parse_args()
    if args.root is not None:
        root = args.root.resolve()
        conftest.ROOT = node_helpers.ROOT = root  # the pod, the nodes and the controller run there
    if args.quick:
        args.nodes, args.rounds, args.seconds = [2], 1, 3.0
    if args.profile is not None:
        print(one_round(args.nodes[0], args.seconds, args.profile.resolve(), args.log, args.cooling))
        return
    med_cpu, med_rss = [], []
    for n in args.nodes:
        load0 = os.getloadavg()[0]
        runs = [one_round(n, args.seconds, cooling=args.cooling) for _ in range(args.rounds)]
        cpus, rsss = [r[0] for r in runs], [r[1] for r in runs]
        missed, p99 = [r[2] for r in runs], [r[3] for r in runs]
        med_cpu.append(statistics.median(cpus))
        med_rss.append(statistics.median(rsss))
        print(
            f"controller, {n:3d} nodes x 4 GPUs, 1 Hz: CPU median {med_cpu[-1]:.1f}% of a core "
            f"({min(cpus):.1f}-{max(cpus):.1f}), RSS median {med_rss[-1]:.1f} MiB "
            f"({min(rsss):.1f}-{max(rsss):.1f}); missed deadlines {sum(missed)} (all devices, every "
            f"round); worst device's poll p99 {1000 * max(p99):.0f} ms; "
            f"{len(runs)} round(s) of {args.seconds:g} s; "
            f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    if len(args.nodes) > 1:
        xs = [float(n) for n in args.nodes]
        c, r = slope(xs, med_cpu), slope(xs, med_rss)
        base_c = med_cpu[0] - c * xs[0]
        base_r = med_rss[0] - r * xs[0]
        print(
            f"slope: {c:.2f}% of a core and {r:.2f} MiB per node; 144 nodes (full pod) ~ "
            f"{base_c + 144 * c:.0f}% of a core, {base_r + 144 * r:.0f} MiB"
        )


if __name__ == "__main__":
    main()
