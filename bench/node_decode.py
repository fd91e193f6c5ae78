"""The controller's decode of one node poll answer: JSON parse plus ``NodeDriver._readings``
(4 GPUs x 13 readings, the size of a sparse answer on the pod), microseconds per answer, the
minimum of 5 repeats (the least disturbed by other jobs on the machine).

Usage: .venv/bin/python bench/node_decode.py [--gpus 4] [--answers 2000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import NodeDevice
from agent.drivers.node import NodeDriver
from bench import harness

METRICS = (
    "temp_c",
    "power_w",
    "power_instant_w",
    "power_limit_w",
    "enforced_power_limit_w",
    "util_gpu_pct",
    "util_mem_pct",
    "energy_mj",
    "mem_temp_c",
    "clock_sm_mhz",
    "clock_mem_mhz",
    "util_enc_pct",
    "util_dec_pct",
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--answers", type=int, default=2000)
    harness.add_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.answers = 50
    driver = NodeDriver(NodeDevice(id="srv-0", kind="node", host="127.0.0.1", port=1, key_file="/dev/null"))
    answer = {
        "hostname": "host-0",
        "node_boot": "b",
        "mode": "controller",
        "gpus": [
            {"index": i, "readings": {m: [123.5, "good", None, 0.12] for m in METRICS}}
            for i in range(args.gpus)
        ],
        "status": {"failsafe_entered_total": 0},
    }
    raw = json.dumps(answer)
    count = len(driver._readings(json.loads(raw)))
    per_answer_us: list[float] = []
    for _ in range(harness.rounds_of(args)):
        # CPU time of this process (the decode is all it does), not the wall clock.
        t0 = time.process_time()
        for _ in range(args.answers):
            driver._readings(json.loads(raw))
        per_answer_us.append((time.process_time() - t0) / args.answers * 1e6)
    print(
        f"{harness.fmt(per_answer_us)} us of CPU per answer ({args.gpus} GPUs, {count} readings), "
        f"{len(per_answer_us)} round(s) of {args.answers} answers: median (range)"
    )


if __name__ == "__main__":
    main()
