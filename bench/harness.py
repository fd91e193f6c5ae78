"""What every bench shares: CPU time per process, N rounds, median and range, a --quick smoke mode.

The machine a bench runs on is usually shared (CI, other jobs), so a bench reports the CPU time each
process of interest used (the scheduler's nanoseconds per thread, ``/proc/<pid>/task/*/schedstat``,
checked against ``/proc/<pid>/stat``'s utime + stime; children included where asked), not
wall-clock shares of the machine, and repeats the measurement ``--rounds`` times (default 3): one run
cannot tell a regression from load. ``summary`` prints the median and the range of every figure.

``--quick`` is for CI smoke only (``tests/test_bench_smoke.py``): one short round, so that a bench
that no longer runs is caught; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
# Two readings of a tick count can each be up to one tick short: the slack per process.
_TICK_SLACK_S = 2.0 / _TICK


def add_args(ap: argparse.ArgumentParser, *, rounds: int = 3) -> None:
    ap.add_argument("--rounds", type=int, default=rounds, help=f"measurement rounds (default {rounds})")
    ap.add_argument("--quick", action="store_true", help="CI smoke: one short round, figures meaningless")


def rounds_of(args: argparse.Namespace) -> int:
    return 1 if args.quick else max(1, int(args.rounds))


def _stat_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (dead threads included), in clock ticks: 10 ms steps."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def _schedstat_cpu_s(pid: int) -> float | None:
    """Time on a CPU of every live thread, in nanoseconds (``/proc/<pid>/task/*/schedstat``,
    field 1: the scheduler's sum_exec_runtime); None where the kernel does not offer it."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return total / 1e9


def proc_cpu_s(pid: int) -> float:
    """CPU seconds ``pid`` has used so far; 0.0 once it is gone.

    The scheduler's nanosecond count over its live threads where the kernel has it: utime and stime
    come in clock ticks (10 ms), and a process at 0.3% of a core gets 9 of them in a 30 s window, so
    medians and ranges were quantised to 10% steps. ``CpuWindow`` checks the result against the
    tick count (which keeps dead threads' time) and falls back on it where threads ended."""
    precise = _schedstat_cpu_s(pid)
    return _stat_cpu_s(pid) if precise is None else precise


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (socat for an RTU line, a worker process...)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out.append(int(k))
            todo.append(int(k))
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants."""
    return proc_cpu_s(pid) + sum(proc_cpu_s(k) for k in children_of(pid))


class CpuWindow:
    """CPU seconds each named process (tree) used between ``start()`` and ``stop()``, and the wall time."""

    def __init__(self, pids: Mapping[str, int], *, tree: bool = True) -> None:
        self._pids = dict(pids)
        self._read: Callable[[int], float] = tree_cpu_s if tree else proc_cpu_s
        self._tree_wanted = tree
        self._t0: dict[str, float] = {}
        self._c0: dict[str, float] = {}
        self._w0 = 0.0
        self.cpu_s: dict[str, float] = {}
        self.wall_s = 0.0

    def start(self) -> CpuWindow:
        self._c0 = {name: self._read(pid) for name, pid in self._pids.items()}
        self._t0 = {name: self._ticks(pid) for name, pid in self._pids.items()}
        self._w0 = time.monotonic()
        return self

    def stop(self) -> CpuWindow:
        self.wall_s = time.monotonic() - self._w0
        self.cpu_s = {}
        for name, pid in self._pids.items():
            precise = self._read(pid) - self._c0[name]
            ticks = self._ticks(pid) - self._t0[name]
            # A thread that ended inside the window took its nanoseconds with it; the tick count
            # keeps them. Trust the nanoseconds unless the ticks say more than their rounding can.
            self.cpu_s[name] = (
                ticks if ticks > precise + _TICK_SLACK_S * (1 + len(self._tree(pid))) else precise
            )
        return self

    def _ticks(self, pid: int) -> float:
        return sum(_stat_cpu_s(p) for p in self._tree(pid))

    def _tree(self, pid: int) -> list[int]:
        return [pid, *children_of(pid)] if self._tree_wanted else [pid]

    def pct(self, name: str) -> float:
        """CPU of ``name`` as % of one core over the window."""
        return 100.0 * self.cpu_s[name] / self.wall_s if self.wall_s > 0 else 0.0


def median_range(xs: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def fmt(xs: Sequence[float], digits: int = 1) -> str:
    """``median (min-max)`` of one figure over the rounds; ``-`` if there is none."""
    xs = [x for x in xs if not math.isnan(x)]  # NaN: a round that could not measure it
    if not xs:
        return "-"
    med, lo, hi = median_range(xs)
    if len(xs) == 1:
        return f"{med:,.{digits}f}"
    return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def summary(
    rows: Iterable[Mapping[str, float]], *, title: str = "", digits: Mapping[str, int] | None = None
) -> None:
    """Print a markdown table: one line per figure, the median and range over the rounds."""
    rows = list(rows)
    if not rows:
        print("no rounds measured")
        return
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    print(f"\n{title}" if title else "")
    print(f"| figure | median (range) over {len(rows)} round(s) |")
    print("|---|---|")
    for name in names:
        xs = [float(r[name]) for r in rows if name in r]
        print(f"| {name} | {fmt(xs, (digits or {}).get(name, 1))} |")


__all__ = [
    "CpuWindow",
    "add_args",
    "children_of",
    "fmt",
    "median_range",
    "proc_cpu_s",
    "rounds_of",
    "summary",
    "tree_cpu_s",
]
