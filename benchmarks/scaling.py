"""Benchmark: how the cost of a simulated run grows with the number of clients.

  .venv/bin/python benchmarks/scaling.py [--clients 10,100,1000] [--per-round 10] [--rounds 3] [--set key=value ...]

For each client count N: `flain run` with num-clients=N, clients-per-round=10 (all of them
when N <= 10), --rounds rounds on Fashion-MNIST, no post-training defense, and prints
start-up (the command to round 1), round 1 (it includes the partition query to all N nodes
and the actors' first data load), the mean of the later rounds, and the peak memory of the
whole process tree (the command, the SuperLink, the simulation, Ray and its workers):
proportional set size (PSS, shared pages split between the processes that share them) read
from /proc every 0.5 s. Figures are printed, never asserted. What grows and why is in
docs/speed.md ("Many clients").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.speed import flain_run  # noqa: E402
from launch.superlink import descendants  # noqa: E402


def _pss_kib(pid: int) -> int:
    """The process's proportional set size (its RSS where smaps_rollup cannot be read)."""
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in (Path("/proc") / str(pid) / name).read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1])
        except OSError:
            continue
    return 0


def tree_memory_mib(root: int) -> tuple[float, int]:
    """(PSS of `root` and all its descendants in MiB, how many processes)."""
    tree = [root, *descendants(root)]
    return sum(_pss_kib(p) for p in tree) / 1024, len(tree)


class PeakMemory:
    """Samples a process tree's memory in a thread until the root exits."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.peak, self.processes = every, 0.0, 0

    def __call__(self, pid: int) -> None:
        threading.Thread(target=self._sample, args=(pid,), daemon=True).start()

    def _sample(self, pid: int) -> None:
        while Path(f"/proc/{pid}").exists():
            mib, count = tree_memory_mib(pid)
            if mib > self.peak:
                self.peak, self.processes = mib, count
            time.sleep(self.every)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="10,100,1000", help="client counts, comma-separated")
    p.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more run-config overrides")
    args = p.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    print("| clients | per round | start-up (s) | round 1 (s) | later rounds (s, mean) | peak memory (MiB, PSS) "
          "| processes | total (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in counts:
        k = min(n, args.per_round)
        sets = [f"num-clients={n}", f"clients-per-round={k if k < n else 0}", "post-defenses=''", *args.set]
        memory = PeakMemory()
        with tempfile.TemporaryDirectory() as tmp:
            got = flain_run(sets, args.rounds, Path(tmp), watch=memory)
        later = got["rounds"][1:]
        print(f"| {n} | {k} | {got['startup']:.0f} | {got['rounds'][0]:.1f} | "
              f"{sum(later) / max(len(later), 1):.1f} | {memory.peak:.0f} | {memory.processes} | {got['total']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
