"""`flain reproduce`: run the paper's tables and figures and write a side-by-side report.

The paper's published numbers are data (`paper_results.csv`, one row per cell). A cell's
defense tells which training it needs: no-Defense, Pruning and FLAIN (and our flain-cv)
all come from one FedAvg training (the post-training defenses are applied side by side to
its final model); RLR is its own training. Trainings are ordinary `flain run` directories
under OUT/runs/; a finished one whose configuration equals what would be submitted is
reused, never recomputed, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiment.config import ConfigError, ExperimentConfig, default_run_config
from experiment.data import DATASETS
from server.checks import check_experiment
from server.results import RunDir, RunFileError

PAPER_CSV = Path(__file__).with_name("paper_results.csv")
NAMES = ("table1", "table2", "table3", "table4", "table5", "table6", "fig5", "fig6")
# Rounds: each data set's training length (experiment/data.py, chosen from the measured
# curves in docs/fidelity.md), stated per training and per data set in the report.
DEFAULT_SEED = 42  # --seeds N uses 42, 43, ..., 42 + N - 1
POST_DEFENSES = "flain,flain-cv,pruning"  # every FedAvg training gives these rows
ROW_SOURCE = {"no-Defense": ("fedavg", None), "Pruning": ("fedavg", "pruning"), "FLAIN": ("fedavg", "flain"),
              "RLR": ("rlr", None), "FLAIN-CV (ours)": ("fedavg", "flain-cv")}
TOLERANCE = {"asr": 0.02, "acc": 0.01}  # see within_tolerance


def within_tolerance(defense: str, asr: float, acc: float, paper_asr: float, paper_acc: float) -> bool:
    """A defended cell is within when ASR <= paper + 0.02 and ACC >= paper - 0.01 (doing better
    than published is fine). The no-Defense cell measures the attack itself, so its ASR must be
    within 0.02 either way: a weaker backdoor than the paper's would make every defense look good."""
    asr_ok = (abs(asr - paper_asr) if defense == "no-Defense" else asr - paper_asr) <= TOLERANCE["asr"] + 1e-9
    return asr_ok and acc >= paper_acc - TOLERANCE["acc"] - 1e-9


@dataclass(frozen=True)
class Cell:
    """One published number pair: the setting, the defense, the paper's ASR and ACC (None: drawn only)."""

    table: str
    dataset: str
    source: int
    target: int
    partition: str
    clients: int
    mcr: float
    pdr: float
    trigger: str  # cba, dba, or cba-Npx (N trigger pixels)
    defense: str
    asr: float | None
    acc: float | None

    @property
    def task(self) -> str:
        return f"{self.source}-{self.target}"

    def setting(self) -> dict[str, Any]:
        """The run-config keys this cell's training sets."""
        trigger, _, pixels = self.trigger.partition("-")
        out = {"dataset": self.dataset, "source-label": self.source, "target-label": self.target,
               "partition": self.partition, "num-clients": self.clients, "mcr": self.mcr, "pdr": self.pdr,
               "trigger": trigger}
        if pixels:
            out["trigger-pixels"] = int(pixels.removesuffix("px"))
        return out


def paper_cells(path: Path = PAPER_CSV) -> list[Cell]:
    with path.open() as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [Cell(r["table"], r["dataset"], int(r["source"]), int(r["target"]), r["partition"], int(r["clients"]),
                     float(r["mcr"]), float(r["pdr"]), r["trigger"], r["defense"],
                     float(r["asr"]) if r["asr"] else None, float(r["acc"]) if r["acc"] else None) for r in rows]


@dataclass
class Training:
    """One `flain run` that serves one or more cells."""

    name: str
    overrides: dict[str, Any]  # run-config keys (all but run-dir)
    cells: list[Cell] = field(default_factory=list)


def paper_comparison(cfg: ExperimentConfig, summary: dict[str, Any]) -> list[str]:
    """Lines putting a finished run beside the paper's cells of the same setting (aggregation
    FedAvg: no-Defense, Pruning, FLAIN; RLR: RLR); none when the setting is not in the paper."""
    cells = [c for c in paper_cells() if c.asr is not None and not c.table.startswith("fig")
             and (c.dataset, c.source, c.target, c.partition, c.clients, c.mcr, c.pdr) == (
                 cfg.dataset, cfg.source_label, cfg.target_label, cfg.partition, cfg.num_clients, cfg.mcr, cfg.pdr)
             and c.setting()["trigger"] == cfg.trigger and c.setting().get("trigger-pixels", 0) == cfg.trigger_pixels]
    # each row's result in this run: ROW_SOURCE says which training (rule) and defense gives it
    defended = summary.get("post_defenses", {})
    ours = {name: summary.get("final") if key is None else defended.get(key)
            for name, (rule, key) in ROW_SOURCE.items() if rule == cfg.aggregation}
    cells = [c for c in cells if c.table == cells[0].table] if cells else []  # the first table with it
    lines = []
    for c in cells:
        # FLAIN-CV (ours) has no cell of its own: it is put beside the paper's FLAIN
        for name in (c.defense, "FLAIN-CV (ours)") if c.defense == "FLAIN" else (c.defense,):
            mine = ours.get(name)
            if isinstance(mine, dict) and "acc" in mine:
                within = within_tolerance(c.defense, mine["asr"], mine["acc"], c.asr, c.acc)
                lines.append(f"{name:<16} ours ASR {mine['asr']:.3f} ACC {mine['acc']:.3f}   paper's {c.defense} "
                             f"({c.table}) ASR {c.asr:.3f} ACC {c.acc:.3f}   "
                             f"{'within tolerance' if within else 'NOT within tolerance'}")
    return lines


def select(cells: Iterable[Cell], name: str, datasets: list[str] | None, tasks: list[str] | None) -> list[Cell]:
    """The cells of NAME (one of NAMES, a comma list of them, or all) on the data sets and tasks."""
    names = NAMES if name == "all" else tuple(n.strip() for n in name.split(","))
    return [c for c in cells if c.table in names and (not datasets or c.dataset in datasets)
            and (not tasks or c.task in tasks)]


def plan(cells: list[Cell], seeds: int, extra: dict[str, Any]) -> list[Training]:
    """The trainings the cells need, each once (shared across cells and tables)."""
    trainings: dict[str, Training] = {}
    for cell in cells:
        aggregation = ROW_SOURCE.get(cell.defense, ("fedavg", None))[0]
        for seed in range(DEFAULT_SEED, DEFAULT_SEED + seeds):
            overrides = {**cell.setting(), "num-rounds": DATASETS[cell.dataset].rounds, "aggregation": aggregation,
                         "post-defenses": POST_DEFENSES if aggregation == "fedavg" else "", "seed": seed, **extra}
            named = ("dataset", "source-label", "target-label", "aggregation", "seed", "post-defenses", "data-dir",
                     "num-rounds")
            name = f"{cell.dataset}_{cell.task}_{aggregation}_s{seed}" + "".join(
                f"_{k}={v}" for k, v in sorted(overrides.items()) if k not in named and default_run_config().get(k) != v)
            training = trainings.setdefault(name, Training(name, overrides))
            training.cells.append(cell)
            if cell.defense == "FLAIN":  # our stop rule beside the paper's (not in the paper: no numbers)
                training.cells.append(dataclasses.replace(cell, defense="FLAIN-CV (ours)", asr=None, acc=None))
    return list(trainings.values())


def resolved(training: Training) -> ExperimentConfig:
    cfg = ExperimentConfig.from_run_config(default_run_config() | training.overrides)
    check_experiment(cfg)
    return cfg


_IDENTITY_SKIP = ("run-dir", "data-dir", "post-defenses")


# what a run made before a key existed used: the network before `network` was added
BEFORE_THE_KEY = {"network": "two-dropout"}


def unusable(run_dir: Path, cfg: ExperimentConfig) -> str | None:
    """Why RUN_DIR is not a completed training of exactly this configuration (None: it is).
    Where the data live does not count, nor which post-training defenses ran: missing ones are
    applied to its saved models (`complete_defenses`), a training is never repeated for them."""
    try:
        run = RunDir(run_dir)
        config, summary = run.config(), run.summary()
    except RunFileError as e:
        return f"unreadable: {e}"
    if summary.get("status") not in ("completed", "defense-failed"):
        return (f"not finished (status {summary.get('status')!r}): still running, stopped or failed; "
                "a sweep without --report-only trains it again from the start")
    want = {k: v for k, v in cfg.to_run_config().items()
            if k not in _IDENTITY_SKIP and not k.startswith(("flain-", "fedpruning-"))}  # post-training settings
    # keys newer than the run (absent from its config.json) had the value they had then
    then = default_run_config() | BEFORE_THE_KEY
    differ = [f"{k} {config.get(k, then[k])!r}, not {v!r}" for k, v in want.items() if config.get(k, then[k]) != v]
    if differ:
        return ("another configuration: " + "; ".join(differ)
                + " (a sweep without --report-only trains this report's in its place)")
    return None


def finished(run_dir: Path, cfg: ExperimentConfig) -> bool:
    return unusable(run_dir, cfg) is None


DEFENDED_LABEL = "reproduce"  # RUN_DIR/defended/reproduce: defenses the run itself did not apply


def results(run_dir: Path) -> dict[str, Any]:
    """The run's summary with `flain defend` results (label `reproduce`) merged into post_defenses:
    a defense applied there (missing from the run, or re-applied after a change of its code with
    `flain defend RUN --name reproduce --overwrite`) takes precedence over the run's own entry."""
    summary = RunDir(run_dir).summary()
    extra = RunDir(run_dir).defended(DEFENDED_LABEL)
    if extra.exists():
        own = summary.setdefault("post_defenses", {})
        for name, result in extra.summary().get("post_defenses", {}).items():
            if "acc" in result or "acc" not in own.get(name, {}):
                own[name] = result
    return summary


def complete_defenses(run_dir: Path, cfg: ExperimentConfig) -> list[str]:
    """Apply the post-training defenses a finished run lacks to its saved models; their names."""
    from launch.defend import defend

    have = {k for k, v in results(run_dir).get("post_defenses", {}).items() if "acc" in v}
    missing = [n for n in cfg.post_defense_names if n not in have]
    if missing:
        extra = RunDir(run_dir).defended(DEFENDED_LABEL)
        earlier = list(extra.summary().get("post_defenses", {})) if extra.exists() else []
        names = earlier + [n for n in missing if n not in earlier]  # the directory is rewritten whole
        print(f"flain reproduce: applying {','.join(names)} to {run_dir.name}'s saved models", flush=True)
        defend(run_dir, names, {}, DEFENDED_LABEL, overwrite=True)
    return missing


_RUNNING: set[subprocess.Popen] = set()  # the `flain run` children of this sweep
_STOPPING = threading.Event()


def run_training(training: Training, run_dir: Path, gpu: bool, quiet: bool) -> int:
    """`flain run` for one training in a fresh process; its exit code. Each child has its own
    deadline (launch.superlink.run_deadline); this one is a backstop a few minutes later."""
    from launch.superlink import run_deadline

    if _STOPPING.is_set():
        return 130
    cmd = [sys.executable, "-m", "launch.cli", "run", "--overwrite"]
    for key, value in {**training.overrides, "run-dir": str(run_dir)}.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    if gpu:
        cmd.append("--gpu")
    out = subprocess.DEVNULL if quiet else None
    # its own session: a terminal's Ctrl-C reaches only this process, which stops the children
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if quiet else None, start_new_session=True)
    _RUNNING.add(proc)
    try:
        return proc.wait(timeout=run_deadline(resolved(training)) + 600)
    except subprocess.TimeoutExpired:
        _stop(proc)
        return 124
    finally:
        _RUNNING.discard(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the child stops its SuperLink, Ray and actors), SIGKILL after a minute."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all() -> None:
    """Stop every training this sweep is running and start no more."""
    _STOPPING.set()
    for proc in list(_RUNNING):
        _stop(proc)


def sweep(trainings: list[Training], out: Path, jobs: int, gpu: bool, run: bool = True) -> dict[str, str]:
    """Run what is not finished yet (`run`), then apply missing post-training defenses;
    {training name: 'reused' | 'done' | 'failed (code N)' | 'not run'}."""
    status: dict[str, str] = {}
    todo = []
    for t in trainings:
        if finished(out / "runs" / t.name, resolved(t)):
            status[t.name] = "reused"
        else:
            todo.append(t)
    print(f"flain reproduce: {len(trainings)} trainings, {len(trainings) - len(todo)} reused, "
          f"{len(todo)} {'to run' if run else 'not run (--report-only)'}", flush=True)
    if not run:
        status.update({t.name: "not run" for t in todo})
        todo = []
    started, done = time.monotonic(), 0

    def one(t: Training) -> None:
        nonlocal done
        print(f"flain reproduce: [{done + 1}/{len(todo)}] {t.name}", flush=True)
        code = run_training(t, out / "runs" / t.name, gpu, quiet=jobs > 1)
        status[t.name] = "done" if code in (0, 4) else f"failed (code {code})"
        done += 1
        per = (time.monotonic() - started) / done
        left = math.ceil((len(todo) - done) / jobs) * per
        print(f"flain reproduce: {done}/{len(todo)} trainings finished ({status[t.name]}); "
              f"about {left / 60:.0f} min left", flush=True)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        try:
            list(pool.map(one, todo))
        except KeyboardInterrupt:
            stop_all()  # before the pool's exit waits for the threads that wait for them
            raise
    for t in trainings:
        if status[t.name] in ("reused", "done") and t.overrides["aggregation"] == "fedavg":
            complete_defenses(out / "runs" / t.name, resolved(t))
    return status


# ---- the report ------------------------------------------------------------------------
def _ours(cell: Cell, summary: dict[str, Any]) -> tuple[float, float] | None:
    _, key = ROW_SOURCE.get(cell.defense, ("fedavg", None))
    result = summary.get("final") if key is None else summary.get("post_defenses", {}).get(key)
    if not result or "acc" not in result:
        return None
    return result["asr"], result["acc"]


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def report(trainings: list[Training], out: Path) -> dict[str, Any]:
    """report.json's content: every cell with the paper's numbers and ours."""
    by_cell: dict[Cell, list[tuple[str, dict[str, Any]]]] = {}
    paper_no_defense = {(c.table, c.dataset, c.task, c.partition, c.clients, c.mcr, c.pdr, c.trigger): c.acc
                        for c in paper_cells() if c.defense == "no-Defense"}
    trainings_out, not_counted = [], []
    for t in trainings:
        run_dir = out / "runs" / t.name
        summary = None
        if RunDir(run_dir).exists():  # a run left by another configuration must not pass for this one
            why = unusable(run_dir, resolved(t))
            if why is None:
                summary = results(run_dir)
            else:
                not_counted.append({"run": f"runs/{t.name}", "why": why})
        for cell in t.cells:
            by_cell.setdefault(cell, [])
            if summary is not None:
                by_cell[cell].append((t.name, summary))
        if summary is not None and t.overrides["aggregation"] == "fedavg":
            c = t.cells[0]
            paper_acc = paper_no_defense.get((c.table, c.dataset, c.task, c.partition, c.clients, c.mcr, c.pdr,
                                              c.trigger))
            resolved_settings = RunDir(run_dir).config().get("resolved")
            precision = resolved_settings.get("precision") if isinstance(resolved_settings, dict) else None
            trainings_out.append({"run": f"runs/{t.name}", "rounds": t.overrides["num-rounds"],
                                  "seed": t.overrides["seed"], "precision": precision,
                                  "no_defense_acc": summary["final"]["acc"],
                                  "paper_no_defense_acc": paper_acc,
                                  "gap": None if paper_acc is None else summary["final"]["acc"] - paper_acc})
    cells_out = []
    for cell, runs in by_cell.items():
        values = [v for _, s in runs if (v := _ours(cell, s)) is not None]
        entry: dict[str, Any] = {**{k: getattr(cell, k) for k in Cell.__dataclass_fields__},
                                 "paper": {"asr": cell.asr, "acc": cell.acc}, "runs": [f"runs/{n}" for n, _ in runs]}
        if not values:
            entry["ours"] = None
        else:
            (asr, asr_sd), (acc, acc_sd) = _stats([v[0] for v in values]), _stats([v[1] for v in values])
            entry["ours"] = {"asr": asr, "asr_std": asr_sd, "acc": acc, "acc_std": acc_sd, "seeds": len(values)}
            if cell.asr is not None:
                entry["diff"] = {"asr": asr - cell.asr, "acc": acc - cell.acc}
                entry["within_tolerance"] = within_tolerance(cell.defense, asr, acc, cell.asr, cell.acc)
        cells_out.append(entry)
    used = sorted({c.dataset for c in by_cell})
    return {"tolerance": TOLERANCE, "rounds": {d: DATASETS[d].rounds for d in used}, "cells": cells_out,
            "trainings": trainings_out, "not_counted": not_counted}


def _fmt(x: float | None, sd: float | None = None, n: int | None = None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" + (f" ± {sd:.3f} (n={n})" if sd is not None and n is not None else "")


def _tally(data: dict[str, Any]) -> str:
    """One line: how many published cells are measured, how many within tolerance, how many
    trainings finished."""
    published = [c for c in data["cells"] if c["paper"]["asr"] is not None]
    measured = [c for c in published if c["ours"] is not None]
    within = sum(bool(c.get("within_tolerance")) for c in measured)
    line = f"Measured: {len(measured)} of {len(published)} published cells, {within} of them within tolerance."
    status = data.get("status")
    if status:
        done = sum(s in ("reused", "done") for s in status.values())
        line += f" Trainings finished: {done} of {len(status)}."
    return line


def markdown(data: dict[str, Any]) -> str:
    lines = ["# FLAIN reproduction report", "",
             "Paper: Ding et al., Tables 1-6 (Fig. 5/6 settings only: the paper draws those numbers). Ours: mean ± std "
             f"over seeds. A cell is within tolerance when ASR <= paper + {TOLERANCE['asr']} and ACC >= paper - "
             f"{TOLERANCE['acc']}; a no-Defense cell (the attack itself) needs its ASR within {TOLERANCE['asr']} "
             "either way. Cells with no finished training say \"not run\".", "",
             "Training length (rounds; each data set's default: docs/fidelity.md measured Fashion-MNIST's and MNIST's): "
             + ", ".join(f"{d} {r}" for d, r in data.get("rounds", {}).items()) + ".", "", _tally(data), ""]
    tables = sorted({c["table"] for c in data["cells"]}, key=NAMES.index)
    for table in tables:
        lines += [f"## {table}", "", "| dataset | task | partition | clients | MCR | PDR | trigger | defense | paper ASR "
                  "| paper ACC | our ASR | our ACC | ΔASR | ΔACC | within |", "| " + " | ".join(["---"] * 15) + " |"]
        for c in (c for c in data["cells"] if c["table"] == table):
            ours = c["ours"]
            if ours is None:
                cols = ["not run", "not run", "", "", ""]
            else:
                diff = c.get("diff")
                cols = [_fmt(ours["asr"], ours["asr_std"], ours["seeds"]), _fmt(ours["acc"], ours["acc_std"], ours["seeds"]),
                        f"{diff['asr']:+.3f}" if diff else "", f"{diff['acc']:+.3f}" if diff else "",
                        ("yes" if c["within_tolerance"] else "**no**") if diff else ""]
            lines.append(f"| {c['dataset']} | ({c['source']},{c['target']}) | {c['partition']} | {c['clients']} | "
                         f"{c['mcr']} | {c['pdr']} | {c['trigger']} | {c['defense']} | {_fmt(c['paper']['asr'])} | "
                         f"{_fmt(c['paper']['acc'])} | " + " | ".join(cols) + " |")
        lines.append("")
    lines += ["## Trainings", "", "Every FedAvg training's no-Defense ACC beside the paper's: a negative gap means our "
              "training is shorter or weaker than the paper's, not that a defense cost accuracy. Precision: what "
              "`precision=auto` chose on the machine that trained it (bf16 where it was faster); "
              "`--set precision=fp32` or `bf16` fixes it.", "",
              "| run | rounds | seed | precision | no-Defense ACC | paper | gap |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in data["trainings"]:
        gap = "" if t["gap"] is None else f"{t['gap']:+.3f}"
        lines.append(f"| {t['run']} | {t['rounds']} | {t['seed']} | {t.get('precision') or '?'} | "
                     f"{t['no_defense_acc']:.3f} | "
                     f"{_fmt(t['paper_no_defense_acc'])} | {gap} |")
    if data.get("not_counted"):
        lines += ["", "Not counted (a directory of this report's trainings that holds no finished training of "
                  "the report's configuration):", ""]
        lines += [f"- {n['run']}: {n['why']}" for n in data["not_counted"]]
    return "\n".join(lines) + "\n"


def plots(data: dict[str, Any], out: Path) -> list[Path]:
    """Paper vs ours per table (ASR and ACC per cell); Fig. 5/6 as line plots of ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for table in sorted({c["table"] for c in data["cells"]}, key=NAMES.index):
        cells = [c for c in data["cells"] if c["table"] == table and c["ours"] is not None]
        if not cells:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        if table in ("fig5", "fig6"):
            key = "trigger" if table == "fig5" else "pdr"
            for (dataset, task, defense), group in _groups(cells, ("dataset", "source", "target", "defense")):
                xs = [c[key] for c in group]
                xs = [int(x.split("-")[1].removesuffix("px")) if table == "fig5" else x for x in xs]
                for ax, metric in zip(axes, ("asr", "acc")):
                    ax.plot(xs, [c["ours"][metric] for c in group], "-o", label=f"{dataset} {task} {defense}")
            for ax, metric in zip(axes, ("ASR", "ACC")):
                ax.set(xlabel="trigger pixels" if table == "fig5" else "PDR", ylabel=f"our {metric}")
        else:
            published = [c for c in cells if c["paper"]["acc"] is not None]  # our extra rows have no paper value
            for ax, metric in zip(axes, ("asr", "acc")):
                paper = [c["paper"][metric] for c in published]
                ours = [c["ours"][metric] for c in published]
                for defense in sorted({c["defense"] for c in published}):
                    ax.scatter([p for p, c in zip(paper, published) if c["defense"] == defense],
                               [o for o, c in zip(ours, published) if c["defense"] == defense], label=defense)
                lo = min(paper + ours + [0])
                ax.plot([lo, 1], [lo, 1], "k--", lw=0.8)
                ax.set(xlabel=f"paper {metric.upper()}", ylabel=f"our {metric.upper()}")
        axes[0].legend(fontsize=6)
        fig.suptitle(f"{table}: paper vs ours")
        fig.tight_layout()
        path = out / f"{table}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _groups(cells: list[dict[str, Any]], keys: tuple[str, ...]) -> list[tuple[tuple[Any, str, str], list]]:
    groups: dict[tuple, list] = {}
    for c in cells:
        groups.setdefault(tuple(c[k] for k in keys), []).append(c)
    return [((k[0], f"({k[1]},{k[2]})", k[3]), v) for k, v in groups.items()]


def listing() -> str:
    cells = paper_cells()
    lines = []
    for name in (*NAMES, "all"):
        chosen = select(cells, name, None, None)
        lengths = ", ".join(f"{d} {DATASETS[d].rounds}" for d in sorted({c.dataset for c in chosen}))
        lines.append(f"{name:<8} {len(chosen):4d} cells  {len(plan(chosen, 1, {})):4d} trainings per seed "
                     f"(rounds: {lengths})")
    return "\n".join(lines)


def check_selection(name: str, datasets: list[str] | None, tasks: list[str] | None) -> list[Cell]:
    """The cells, or a ConfigError naming the bad value and the allowed ones."""
    for one in name.split(","):
        if one.strip() not in (*NAMES, "all") or ("," in name and one.strip() == "all"):
            raise ConfigError(f"NAME={one.strip()!r} is not allowed: choose one of {[*NAMES, 'all']} "
                              "(or a comma list of tables and figures)")
    cells = paper_cells()
    inside = select(cells, name, None, None)
    for value, allowed, key in ((datasets, {c.dataset for c in inside}, "--datasets"),
                                (tasks, {c.task for c in inside}, "--tasks")):
        for v in value or []:
            if v not in allowed:
                raise ConfigError(f"{key} {v!r} is not in {name}: choose from {sorted(allowed)}")
    return select(cells, name, datasets, tasks)
