"""Everything we want to know on a GPU machine, in one call of under 8 minutes.

  .venv/bin/python benchmarks/gpu_check.py [--out gpu_check.md] [--budget 480]

1. the CUDA tests (`pytest -k cuda`: FLAIN's search and the masks on the GPU);
2. a 10-round default `flain run --gpu`: start-up, seconds per round, how many clients `--gpu`
   let share the GPU, and GPU utilisation and memory sampled with `nvidia-smi` every second;
3. `flain reproduce table1 --datasets fmnist --tasks 0-5 --gpu --jobs N` at the paper's training
   length, with whatever time is left (it resumes where it stopped if run again).
Every step has a deadline inside the budget; the figures go to one markdown file (`--out`).
Where there is no GPU it says so in one line and exits with code 3, measuring nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from server.results import RunDir  # noqa: E402

NO_GPU = 3


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check (None: it can)."""
    import torch

    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA device or driver visible)"
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi is not on PATH (utilisation cannot be sampled)"
    return None


class Sampler(threading.Thread):
    """nvidia-smi every second: utilisation (%) and memory used (MiB) of GPU 0."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits", "-i", "0"],
                                     capture_output=True, text=True, timeout=10).stdout
                util, mem = (float(v) for v in out.strip().split(",")[:2])
                self.samples.append((util, mem))
            except (subprocess.SubprocessError, ValueError, OSError):
                pass
            self.stop.wait(1.0)

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        utils = [u for u, _ in self.samples]
        return {"gpu_util_mean": sum(utils) / len(utils), "gpu_util_max": max(utils),
                "gpu_mem_peak_mib": max(m for _, m in self.samples), "samples": len(self.samples)}


def _run(cmd: list[str], deadline: float) -> tuple[int, str, float]:
    """(exit code, last lines of output, seconds); 124 when the deadline passed (the process
    group is stopped)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        code = proc.returncode
    except subprocess.TimeoutExpired:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        code = 124
    return code, "\n".join((out or "").splitlines()[-15:]), time.monotonic() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "gpu_check.md")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps (default 480)")
    args = p.parse_args()
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu_check: no GPU: {reason}; nothing measured", file=sys.stderr)
        return NO_GPU
    end = time.monotonic() + args.budget
    py = sys.executable
    report: dict[str, object] = {}

    code, tail, secs = _run([py, "-m", "pytest", "-q", "-k", "cuda", "tests/"], min(end, time.monotonic() + 90))
    report["cuda tests"] = {"exit": code, "seconds": round(secs, 1), "last line": tail.splitlines()[-1] if tail else ""}

    run_dir = ROOT / "runs" / "gpu-check"
    sampler = Sampler()
    sampler.start()
    code, tail, secs = _run([py, "-m", "launch.cli", "run", "--gpu", "--overwrite", "--set", "num-rounds=10",
                             "--set", f"run-dir='{run_dir}'"], min(end, time.monotonic() + 240))
    sampler.stop.set()
    sampler.join()
    run: dict[str, object] = {"exit": code, "seconds": round(secs, 1), **sampler.summary()}
    chose = [line for line in tail.splitlines() if "--gpu:" in line]
    run["--gpu chose"] = chose[-1].split("--gpu:", 1)[1].strip() if chose else "?"
    run_files = RunDir(run_dir)
    rounds_file = run_files.rounds_file
    if rounds_file.is_file():
        rows = list(csv.DictReader(rounds_file.open()))
        trained = [float(r["seconds"]) for r in rows if int(r["round"]) > 0]
        run["start-up + round 0 seconds"] = float(rows[0]["seconds"]) if rows else None
        run["seconds per round"] = round(sum(trained) / len(trained), 2) if trained else None
    if run_files.summary_file.is_file():
        run["final"] = run_files.summary().get("final")
    report["flain run --gpu (10 rounds)"] = run

    left = end - time.monotonic()
    if left > 60:
        code, tail, secs = _run([py, "-m", "launch.cli", "reproduce", "table1", "--datasets", "fmnist", "--tasks", "0-5",
                                 "--gpu", "--jobs", "2", "--out", str(ROOT / "runs" / "gpu-check-reproduce")], end)
        report["reproduce table1 fmnist (0,5) --gpu --jobs 2"] = {
            "exit": code, "seconds": round(secs, 1), "stopped by the budget": code == 124,
            "last lines": tail.splitlines()[-3:]}
    lines = ["# GPU check", "", f"{time.strftime('%Y-%m-%d %H:%M')}, budget {args.budget:.0f} s", ""]
    for step, figures in report.items():
        lines += [f"## {step}", "", "```json", json.dumps(figures, indent=1), "```", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
