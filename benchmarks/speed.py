"""Benchmark: `flain run` against the compute floor, and FLAIN's search on every data set.

  .venv/bin/python benchmarks/speed.py [--rounds N] [--set key=value ...] [--skip-run] [--skip-search]

Measured in one run, on this machine, with the same settings (defaults: the default experiment):
 (a) the floor: one round of the clients' local training with the project's own model, data,
     optimizer and precision (client_data + train_local, what a ClientApp runs), without
     Flower, in each process x thread layout that fills the machine's cores; the fastest
     layout is the floor, measured again after the run in that layout (the floor used is
     the mean of the two, and the gap between them shows how steady the machine was);
 (b) `flain run` for --rounds rounds (default: the configuration's num-rounds): startup (from
     the command to the start of round 1, stage by stage), each round's seconds (rounds.csv:
     training, aggregation and the round's central evaluation, whose share is printed too),
     and the ratio mean round / floor;
 (c) FLAIN's threshold search (Algorithm 1, `flain_search`) against the plain loop
     (every step of lambda, the whole model on the aux set) for fmnist, mnist, emnist and
     cifar10 at the paper's aux-set sizes. Data sets missing from the data directory are
     replaced by generated images of the same shape (the cost depends on the shapes and the
     number of thresholds, not on the pictures); the plain loop's time is its per-evaluation
     time times the number of steps Algorithm 1 takes, when that would exceed --plain-budget.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from experiment.config import ExperimentConfig, default_run_config, parse_overrides  # noqa: E402
from experiment.data import num_rounds  # noqa: E402
from server.results import RunDir  # noqa: E402


# ---- (a) the floor ------------------------------------------------------------------------
def _train_clients(args: tuple[dict, list[int], int, str]) -> float:
    run_config, clients, threads, precision = args
    torch.set_num_threads(threads)
    from client.training import client_data
    from models.training import train_local
    from models import build_model

    cfg = ExperimentConfig.from_run_config(run_config)
    for pid in clients:  # data loading happens once per process, before the clock (a Ray actor caches it too)
        client_data(cfg, pid)
    torch.manual_seed(0)
    initial = build_model(cfg.dataset, cfg.network).state_dict()
    started = time.perf_counter()
    for pid in clients:
        model = build_model(cfg.dataset, cfg.network)
        model.load_state_dict(initial)
        data = client_data(cfg, pid)
        train_local(model, data.images, data.labels, cfg.local_epochs, cfg.batch_size, cfg.lr,
                    torch.Generator().manual_seed(pid), precision)
    return time.perf_counter() - started


def floor(cfg: ExperimentConfig, precision: str, cores: int,
          only: tuple[int, int] | None = None) -> tuple[float, tuple[int, int]]:
    """Seconds of one round of local training in the best process x thread layout (or in
    `only`), and that layout."""
    layouts = {}
    for procs in [only[0]] if only else sorted({1, cores}):
        threads = max(1, cores // procs)
        shares = [list(range(cfg.num_clients))[i::procs] for i in range(procs)]
        with mp.get_context("spawn").Pool(procs) as pool:
            # each worker's own clock starts after its data are loaded; the round is the slowest worker
            times = pool.map(_train_clients, [(cfg.to_run_config(), s, threads, precision) for s in shares])
        layouts[(procs, threads)] = max(times)
        print(f"  floor, {procs} process(es) x {threads} thread(s): {max(times):.1f}s for {cfg.num_clients} clients",
              flush=True)
    best = min(layouts, key=layouts.get)
    return layouts[best], best


# ---- (b) flain run --------------------------------------------------------------------------
# where start-up goes: the first log line of each stage, in order
STARTUP_MARKS = (
    ("configuration checked, data in place", " rounds, simulation;"),
    ("private SuperLink up, app packaged and submitted", "Using SuperLink"),
    ("simulation (Ray) starting", "Starting Flower Simulation"),
    ("ServerApp running", "Run directory"),
    ("test data, evaluator, nodes ready", "strategy:"),
    ("initial model evaluated (round 0)", "[flain] round 0/"),
    ("round 1 starts", "[ROUND 1/"),
)
def flain_run(overrides: list[str], rounds: int, workdir: Path,
              watch: Callable[[int], None] | None = None) -> dict[str, float]:
    """`flain run` of `rounds` rounds: start-up by stage, round seconds (`watch(pid)` is called
    once the command started, e.g. to sample its memory)."""
    run_dir = workdir / "run"
    cmd = [sys.executable, "-m", "launch.cli", "run", "--verbose", "--set", f"num-rounds={rounds}",
           "--set", f"run-dir='{run_dir}'", *sum((["--set", s] for s in overrides), [])]
    started = time.perf_counter()
    first_round = last_round_end = None
    marks: dict[str, float] = {}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if watch is not None:
        watch(proc.pid)
    for line in proc.stdout:
        now = time.perf_counter() - started
        for label, pattern in STARTUP_MARKS:
            if label not in marks and pattern in line:
                marks[label] = now
        if first_round is None and "[ROUND 1/" in line:
            first_round = now
        if re.search(rf"\[flain\] round {rounds}/{rounds}", line):
            last_round_end = now
    proc.wait()
    total = time.perf_counter() - started
    if proc.returncode not in (0, 4):
        raise SystemExit(f"flain run failed ({proc.returncode})")
    run = RunDir(run_dir)
    rows = run.rounds()
    seconds = [r["seconds"] for r in rows if r["round"] > 0]
    evaluation = [r["eval_seconds"] for r in rows if r["round"] > 0]
    config = run.config()
    return {"startup": first_round or float("nan"), "marks": marks, "rounds": seconds, "evaluation": evaluation, "total": total,
            "after_last_round": total - (last_round_end or total), "precision": config["resolved"]["precision"]}


# ---- (c) FLAIN's search ---------------------------------------------------------------------
def search_costs(data_dir: str, budget: float) -> None:
    from experiment.data import DATASETS, DataUnavailable, load, split_test, to_float
    from models import build_model, split_at
    from strategies.post_training import PostTrainingInput
    from strategies.post_training.flain import Flain, flain_search_reference
    from strategies.post_training.tau import tau_inputs

    for name, size in (("fmnist", 200), ("mnist", 200), ("emnist", 200), ("cifar10", 600)):
        torch.manual_seed(0)
        model = build_model(name).eval()
        w0 = model.fc1.weight.detach().clone()
        with torch.no_grad():  # a "trained" model: W0 plus an update of a trained run's size
            model.fc1.weight.add_(0.5 * w0.std() * torch.randn_like(w0))
        try:
            x, y = load(name, data_dir, train=False)
            idx, _ = split_test(len(y), size, seed=42)
            images, labels, source = to_float(x[idx]), y[idx], "real"
        except (DataUnavailable, FileNotFoundError, OSError):
            c, h, w = DATASETS[name].shape
            images = torch.rand(size, c, h, w)
            labels = torch.randint(0, DATASETS[name].num_classes, (size,))
            source = "generated"
        body, _ = split_at(model, "fc1")
        started = time.perf_counter()  # the one pass of the aux set through the body (Flain.apply makes it too)
        scores = tau_inputs(body, images).mean(0).double().numpy()
        body_s = time.perf_counter() - started
        weight = model.fc1.weight.detach().clone()
        initial = {k: v.clone() for k, v in model.state_dict().items()} | {"fc1.weight": w0}

        started = time.perf_counter()  # what a run does: Flain.apply, incremental flips included
        _, info = Flain(step=0.001, rho=0.02).apply(PostTrainingInput(model, initial, images, labels))
        fast_s = time.perf_counter() - started
        steps = int(round((info["threshold"] - scores.min()) / 0.001))

        @torch.no_grad()
        def whole(wt: torch.Tensor) -> float:
            model.fc1.weight.copy_(wt)
            return (model(images).argmax(1) == labels).float().mean().item()

        started = time.perf_counter()
        for _ in range(3):
            whole(weight)
        per_eval = (time.perf_counter() - started) / 3
        if per_eval * steps <= budget:
            started = time.perf_counter()
            plain = flain_search_reference(scores, w0, weight, 0.001, 0.02, whole)
            plain_s, how = time.perf_counter() - started, "measured"
            same = plain.flipped == info["flipped"] and plain.threshold == info["threshold"]
        else:
            plain_s, how, same = per_eval * steps, "per-evaluation time x steps", None
        model.fc1.weight.data.copy_(weight)
        print(f"  {name:8s} ({source}, {size} aux, {weight.shape[1]} inputs): Flain.apply {fast_s:6.2f}s "
              f"(the aux pass through the body {body_s:.2f}s) "
              f"({info['evaluations']} evaluations, {info['exact_fallbacks']} exact fallbacks, "
              f"{info['flipped']} flipped) | plain loop {plain_s:8.1f}s ({steps} steps, {how}) | "
              f"{plain_s / fast_s:6.0f}x" + ("" if same is None else f" | same stop: {same}"), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="default: the configuration's num-rounds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--skip-run", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--plain-budget", type=float, default=60.0, help="seconds the plain loop may take per data set")
    args = p.parse_args()
    cfg = ExperimentConfig.from_run_config(default_run_config() | parse_overrides(args.set))
    cores = len(os.sched_getaffinity(0))
    rounds = args.rounds or num_rounds(cfg)
    print(f"speed benchmark: {cores} cores, torch {torch.__version__}, {cfg.num_clients} clients of {cfg.dataset}")

    if not args.skip_run:
        from experiment.hardware import training_precision
        from models import build_model

        # the run reads the same cached choice (or measures it the same way)
        precision, _ = training_precision(cfg, torch.device("cpu"), build_model)
        # the floor before and after the run: a busy neighbour shows as a gap between the two
        print(f"(a) the floor, {precision}, before the run ...", flush=True)
        before, layout = floor(cfg, precision, cores)
        with tempfile.TemporaryDirectory() as tmp:
            print(f"(b) flain run, {rounds} rounds ...", flush=True)
            run = flain_run(args.set, rounds, Path(tmp))
        if run["precision"] != precision:
            print(f"  note: the run trained in {run['precision']}, the floor in {precision}")
        print("(a) the floor again, after the run ...", flush=True)
        after, _ = floor(cfg, precision, cores, only=layout)
        seconds = (before + after) / 2
        rounds_s, evaluation = run["rounds"], run["evaluation"]
        training = [r - e for r, e in zip(rounds_s, evaluation)]
        mean = sum(rounds_s) / len(rounds_s)
        later = rounds_s[1:] or rounds_s
        later_training = training[1:] or training
        print(f"startup (command to round 1): {run['startup']:.1f}s")
        last = 0.0
        for label, _ in STARTUP_MARKS:
            if label in run["marks"]:
                print(f"  {run['marks'][label]:6.1f}s  (+{run['marks'][label] - last:5.1f}s)  {label}")
                last = run["marks"][label]
        print(f"rounds: {', '.join(f'{s:.1f}' for s in rounds_s)}s; mean {mean:.1f}s, rounds 2+ "
              f"{sum(later) / len(later):.1f}s; central evaluation {sum(evaluation) / len(evaluation):.1f}s a round")
        print(f"floor ({layout[0]} process(es) x {layout[1]} thread(s)): {before:.1f}s before the run, "
              f"{after:.1f}s after; mean {seconds:.1f}s")
        print(f"ratio mean round / floor: {mean / seconds:.2f}; rounds 2+: {sum(later) / len(later) / seconds:.2f}; "
              f"rounds 2+ without the evaluation: {sum(later_training) / len(later_training) / seconds:.2f}")
        print(f"after the last round (defenses, results, shutdown): {run['after_last_round']:.1f}s; "
              f"total {run['total']:.1f}s")
    if not args.skip_search:
        print("(c) FLAIN's threshold search against the plain loop (rho 0.02, step 0.001) ...", flush=True)
        search_costs(cfg.data_dir, args.plain_budget)


if __name__ == "__main__":
    main()
