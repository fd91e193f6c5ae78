"""The interlock engine's CPU at the `full` pod's size, in-process (no simulator, no I/O).

576 GPUs, 32 PDUs of 18 GPUs, 2 CDUs of 288, every input fresh and normal. One simulated second
is what the service does at the full pod: one full evaluation (the NVML poll), a partial one per
PDU poll and per CDU poll. With ``--coalesce`` the PDU and CDU batches go the way the service
sends them (agent/interlocks/urgency.py): far from every threshold, so they wait and are
evaluated together every ``coalesce_s``. Prints CPU time (process time) per step kind and per
simulated second, median and range over ``--rounds``.

    .venv/bin/python bench/interlock_cost.py [--seconds 20] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.interlocks.config import InterlockConfig  # noqa: E402
from agent.interlocks.engine import Engine, Topology  # noqa: E402
from agent.interlocks.service import INPUT_METRICS  # noqa: E402
from agent.interlocks.urgency import must_evaluate_now  # noqa: E402
from agent.model import Quality, Reading  # noqa: E402
from bench import harness  # noqa: E402

GPUS = tuple(f"gpu{i}" for i in range(576))
PDUS = {f"pdu-{p}": GPUS[p * 18 : (p + 1) * 18] for p in range(32)}
LOOPS = {f"cdu-{c}": GPUS[c * 288 : (c + 1) * 288] for c in range(2)}
TOPO = Topology(
    gpus=GPUS,
    loops=LOOPS,
    pdus=PDUS,
    pdu_rating_a=dict.fromkeys(PDUS, 32.0),
    min_flow_lpm=dict.fromkeys(LOOPS, 10.0),
    stale_after_s={**dict.fromkeys(GPUS, 3.0), **dict.fromkeys(LOOPS, 5.0), **dict.fromkeys(PDUS, 5.0)},
    alarm_metrics=dict.fromkeys(LOOPS, ("pump_fault", "alarms")),
    cooled_gpus=LOOPS,
)


class Pod:
    def __init__(self) -> None:
        self.snap: dict[tuple[str, str], Reading] = {}

    def put(self, device: str, metric: str, value: float, t: float) -> Reading:
        r = Reading(device, metric, value, ts_mono=t, ts_wall=1.8e9 + t, quality=Quality.GOOD)
        self.snap[(device, metric)] = r
        return r

    def gpus(self, t: float) -> list[Reading]:
        out = []
        for g in GPUS:
            out += [self.put(g, "temp_c", 55.0, t), self.put(g, "power_w", 500.0, t)]
            for m, v in (
                ("min_power_limit_w", 200.0),
                ("max_power_limit_w", 700.0),
                ("default_power_limit_w", 700.0),
            ):
                if (g, m) not in self.snap:
                    self.put(g, m, v, t)
        return out

    def pdu(self, p: str, t: float) -> list[Reading]:
        return [self.put(p, f"phase{ph}_current_a", 12.0, t) for ph in (1, 2, 3)]

    def cdu(self, c: str, t: float) -> list[Reading]:
        values = (
            ("supply_temp_c", 30.0),
            ("flow_lpm", 20.0),
            ("pump_fault", 0.0),
            ("leak", 0.0),
            ("alarms", 0.0),
        )
        return [self.put(c, m, v, t) for m, v in values]


def one_round(seconds: int, coalesce: bool) -> dict[str, float]:
    cfg = InterlockConfig()
    pod, eng = Pod(), Engine(cfg, TOPO, started=-100.0)
    pod.gpus(0.0)
    for p in PDUS:
        pod.pdu(p, 0.0)
    for c in LOOPS:
        pod.cdu(c, 0.0)
    eng.step(pod.snap, 0.0, 1.8e9)
    cpu = {"full": 0.0, "partial": 0.0, "observe and urgency": 0.0}
    counts = {"full": 0, "partial": 0}
    clock = time.process_time
    for s in range(1, seconds + 1):
        t0 = float(s)
        batch = pod.gpus(t0)
        c = clock()
        eng.observe(batch)
        cpu["observe and urgency"] += clock() - c
        c = clock()
        eng.step(pod.snap, t0, 1.8e9 + t0)
        cpu["full"] += clock() - c
        counts["full"] += 1
        pending: set[str] = set()
        due = None
        arrivals = [(t0 + (i + 1) / 40, p, pod.pdu) for i, p in enumerate(PDUS)]
        arrivals += [(t0 + 0.9 + i / 100, cdu, pod.cdu) for i, cdu in enumerate(LOOPS)]
        for t, device, poll in arrivals:
            if due is not None and due <= t:
                c = clock()
                eng.step(pod.snap, due, 1.8e9 + due, changed=pending)
                cpu["partial"] += clock() - c
                counts["partial"] += 1
                pending, due = set(), None
            batch = poll(device, t)
            c = clock()
            eng.observe(batch)
            urgent = not coalesce or must_evaluate_now(batch, INPUT_METRICS, cfg, TOPO, eng.busy)
            cpu["observe and urgency"] += clock() - c
            pending.add(device)
            if urgent:
                c = clock()
                eng.step(pod.snap, t, 1.8e9 + t, changed=pending)
                cpu["partial"] += clock() - c
                counts["partial"] += 1
                pending, due = set(), None
            elif due is None:
                due = t + cfg.coalesce_s
        if pending:
            c = clock()
            eng.step(pod.snap, t0 + 0.999, 1.8e9 + t0 + 0.999, changed=pending)
            cpu["partial"] += clock() - c
            counts["partial"] += 1
    total = sum(cpu.values())
    return {
        "full step, ms of CPU": 1000 * cpu["full"] / counts["full"],
        "partial step, ms of CPU": 1000 * cpu["partial"] / max(counts["partial"], 1),
        "partial steps per simulated second": counts["partial"] / seconds,
        "engine CPU, % of a core": 100 * total / seconds,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20, help="simulated seconds per round")
    harness.add_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.seconds = 2
    for coalesce in (False, True):
        rows = [one_round(args.seconds, coalesce) for _ in range(harness.rounds_of(args))]
        harness.summary(
            rows,
            title="interlock engine, 576 GPUs / 32 PDUs / 2 CDUs, every batch evaluated"
            if not coalesce
            else "same, batches coalesced as the service does (coalesce_s 0.2)",
            digits={"partial step, ms of CPU": 3},
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
