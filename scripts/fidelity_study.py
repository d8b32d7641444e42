"""The fidelity study (docs/fidelity.md): what makes our FLAIN leave ASR the authors' code removes.

  python scripts/fidelity_study.py train  [--rounds 20] [--seeds 42,43,44] [--partitions iid-stratified,iid]
                                       [--networks paper] [--tasks 0-5] [--out runs/fidelity]
  python scripts/fidelity_study.py defend [--out runs/fidelity] [--at 10,20]  # checkpoints, both protocols
  python scripts/fidelity_study.py report [--out runs/fidelity] [--md docs/fidelity]

`train` runs the missing trainings one after another (resumable: a finished one is skipped,
an unfinished one is run again), each with a checkpoint every 5 rounds. `defend` applies FLAIN
(Algorithm 1) to every checkpoint with two protocols, ours (the run's random 200 aux images,
threshold min + k * 0.001, rho 0.02) and the authors' (the first 20 test images of each class,
threshold from 0.0005 by 0.0001, rho 0.024), skipping what is done. `report` adds the rows measured
to docs/fidelity/rows.json (the record: run directories are not committed) and writes the table
(mean and spread over seeds) and a plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.results import RunDir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = {  # label -> (defenses, `flain defend --set` overrides)
    "ours": ("flain,flain-cv", {}),
    "authors": ("flain", {"aux-draw": "per-class", "flain-start": 0.0005, "flain-step": 0.0001, "flain-rho": 0.024}),
}
EVERY = 5


def _name(network: str, partition: str, task: str, seed: int) -> str:
    return f"fmnist_{task}_{network}_{partition}_s{seed}"


def _status(run_dir: Path) -> str:
    return RunDir(run_dir).status()


def train(args: argparse.Namespace) -> int:
    plan = [(n, p, t, s) for s in args.seeds for t in args.tasks for p in args.partitions for n in args.networks]
    started, done = time.monotonic(), 0
    for i, (network, partition, task, seed) in enumerate(plan, 1):
        source, target = task.split("-")
        run_dir = Path(args.out) / _name(network, partition, task, seed)
        if _status(run_dir) in ("completed", "defense-failed"):
            print(f"[{i}/{len(plan)}] {run_dir.name}: finished, kept", flush=True)
            continue
        print(f"[{i}/{len(plan)}] {run_dir.name}: training {args.rounds} rounds", flush=True)
        sets = {"network": network, "partition": partition, "seed": seed, "num-rounds": args.rounds,
                "checkpoint-every": EVERY, "source-label": int(source), "target-label": int(target),
                "post-defenses": "flain", "run-dir": str(run_dir)}
        cmd = [sys.executable, "-m", "launch.cli", "run", "--overwrite"]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        code = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT).returncode
        done += 1
        left = (time.monotonic() - started) / done * (len(plan) - i)
        print(f"[{i}/{len(plan)}] {run_dir.name}: exit {code}, status {_status(run_dir)}; "
              f"about {left / 60:.0f} min left", flush=True)
    return 0


def _label(protocol: str, rnd: int) -> str:
    return f"fidelity-{protocol}@round-{rnd}"


def defend(args: argparse.Namespace) -> int:
    for run_dir in sorted(p for p in Path(args.out).iterdir() if p.is_dir()):
        for rnd in [r for r in RunDir(run_dir).checkpoint_rounds() if not args.at or r in args.at]:
            for protocol, (defenses, overrides) in PROTOCOLS.items():
                if RunDir(run_dir).defended(_label(protocol, rnd)).exists():
                    continue
                cmd = [sys.executable, "-m", "launch.cli", "defend", str(run_dir), "--round", str(rnd),
                       "--post-defenses", defenses, "--name", _label(protocol, rnd), "--overwrite"]
                for key, value in overrides.items():
                    cmd += ["--set", f"{key}={json.dumps(value)}"]
                code = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                print(f"{run_dir.name} round {rnd} {protocol}: exit {code.returncode}", flush=True)
    return 0


def collect(out: Path) -> list[dict]:
    rows: list[dict] = []
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        run = RunDir(run_dir)
        config = run.config()
        for result in run.defended_results():
            summary = result.summary()
            if not result.name.startswith("fidelity-") or summary.get("status") != "completed":
                continue
            protocol, rnd = result.name.removeprefix("fidelity-").split("@round-")
            base = summary["no_defense"]
            for defense, result in summary["post_defenses"].items():
                rows.append({"run": run_dir.name, "task": f"{config['source-label']}-{config['target-label']}",
                         "network": config["network"], "partition": config["partition"],
                             "seed": config["seed"], "round": int(rnd), "protocol": protocol, "defense": defense,
                             "acc": base["acc"], "asr": base["asr"], "flain_acc": result["acc"],
                             "flain_asr": result["asr"], "cost": base["acc"] - result["acc"],
                             "flipped": result["flipped"]})
    return rows


def _ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _key(row: dict) -> tuple:
    return row["run"], row["round"], row["protocol"], row["defense"]


def merge(kept: list[dict], measured: list[dict]) -> list[dict]:
    """The committed rows with the measured ones added (a row measured again replaces the kept
    one), by run name: the run directories are not committed, so rows.json is the study's record
    and a later session adds to it."""
    rows = {_key(r): r for r in kept}
    rows.update((_key(r), r) for r in measured)
    return sorted(rows.values(), key=lambda r: r["run"])


def report(args: argparse.Namespace) -> int:
    md = Path(args.md)
    md.mkdir(parents=True, exist_ok=True)
    kept = json.loads((md / "rows.json").read_text()) if (md / "rows.json").exists() else []
    rows = merge(kept, collect(Path(args.out)))
    tmp = md / "rows.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(md / "rows.json")
    groups: dict[tuple, list[dict]] = {}
    seen = set()  # a second training of the same seed (a longer one) counts once per round: the first
    for r in rows:
        key = (r["task"], r["network"], r["partition"], r["seed"], r["round"], r["protocol"], r["defense"])
        if key in seen:
            continue
        seen.add(key)
        groups.setdefault((r["task"], r["network"], r["partition"], r["protocol"], r["defense"], r["round"]), []).append(r)
    lines = ["| task | network | partition | protocol | defense | round | seeds | no-Defense ACC | no-Defense ASR "
             "| defended ASR | ACC cost | flipped |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(groups):
        g = groups[key]
        lines.append(f"| {' | '.join(map(str, key))} | {','.join(str(r['seed']) for r in g)} | "
                     f"{_ms([r['acc'] for r in g])} | {_ms([r['asr'] for r in g])} | "
                     f"{_ms([r['flain_asr'] for r in g])} | {_ms([r['cost'] for r in g])} | "
                     f"{_ms([float(r['flipped']) for r in g], 0)} |")
    (md / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(groups, md / "fidelity.png")
    return 0


def _plot(groups: dict[tuple, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple, list[tuple[int, float, float]]] = {}
    for (task, network, partition, protocol, defense, rnd), g in groups.items():
        series.setdefault((task, network, partition, protocol, defense), []).append(
            (rnd, statistics.mean(r["flain_asr"] for r in g), statistics.mean(r["cost"] for r in g)))
    for key, points in sorted(series.items()):
        points.sort()
        xs = [p[0] for p in points]
        axes[0].plot(xs, [p[1] for p in points], "-o", ms=3, label=" / ".join(key))
        axes[1].plot(xs, [p[2] for p in points], "-o", ms=3, label=" / ".join(key))
    axes[0].set(xlabel="training rounds", ylabel="ASR after the defense (mean over seeds)", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="training rounds", ylabel="ACC cost (no-Defense - defended)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["train", "defend", "report"])
    p.add_argument("--out", default=str(ROOT / "runs" / "fidelity"))
    p.add_argument("--md", default=str(ROOT / "docs" / "fidelity"))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[42, 43, 44])
    p.add_argument("--partitions", type=lambda s: s.split(","), default=["iid-stratified", "iid"])
    p.add_argument("--networks", type=lambda s: s.split(","), default=["paper"])
    p.add_argument("--tasks", type=lambda s: s.split(","), default=["0-5"], help="source-target pairs, e.g. 0-5,0-6")
    p.add_argument("--at", type=lambda s: [int(x) for x in s.split(",")], default=[],
                   help="defend: only the checkpoints of these rounds (default: every one)")
    args = p.parse_args()
    return {"train": train, "defend": defend, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
