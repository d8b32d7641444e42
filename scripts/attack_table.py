"""The adaptive-attack table (docs/adaptive-attacks.md) and the robust-rule comparison
(docs/defenses.md) from the run directories.

  .venv/bin/python scripts/attack_table.py [--dataset fmnist] [--runs runs] [--json docs/adaptive-attacks.json] [--readme docs/adaptive-attacks.md]
  .venv/bin/python scripts/attack_table.py --rules [--train] [--runs docs/rules] [--json F] [--readme docs/defenses.md]

`--rules`: each mid-training rule of RULES alone and with FLAIN / FLAIN-CV on its final model,
in the SETTINGS (Fashion-MNIST default, Dirichlet non-IID, the scaling and the flain-aware
attacks), one seed, 10 rounds, from `RUNS/rules-<setting>-<rule>/`; `--train` first runs the
missing trainings one after another (resumable: a finished run is kept).

For each attack, `RUNS/attack-<attack>-<rule>/summary.json` (other data sets than fmnist:
`RUNS/attack-<dataset>-<attack>-<rule>/`) with rule fedavg (no-Defense and every post-training
defense on its final model), rlr and multikrum; a missing run is shown as "not run"
(`attack-none-rlr` is a link to the reproduction's Table 1 (0,5) RLR training: the same
configuration). The page's table sits between `<!-- attack-table` markers (fmnist) or
`<!-- attack-table-<dataset>` markers. Also what the malicious clients reported (attack_log): the mean L2 norm of the
update they sent and of the one they trained, and the share of coordinates they froze.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.results import RunDir  # noqa: E402

ATTACKS = ("none", "neurotoxin", "scaling", "pgd", "flain-aware")
DEFENSES = (("no-Defense", "fedavg", None), ("FLAIN", "fedavg", "flain"), ("FLAIN-CV", "fedavg", "flain-cv"),
            ("Pruning", "fedavg", "pruning"), ("FedPruning", "fedavg", "fedpruning"), ("RLR", "rlr", None),
            ("Multi-Krum", "multikrum", None))


NAMES = {"fmnist": "Fashion-MNIST", "mnist": "MNIST", "emnist": "EMNIST", "cifar10": "CIFAR-10"}


def run_name(dataset: str, attack: str, rule: str) -> str:
    return f"attack-{attack}-{rule}" if dataset == "fmnist" else f"attack-{dataset}-{attack}-{rule}"


def cell(runs: Path, dataset: str, attack: str, rule: str, defense: str | None) -> dict | None:
    run = RunDir(runs / run_name(dataset, attack, rule))
    if not run.finished():
        return None
    summary = run.summary()
    result = summary["final"] if defense is None else summary.get("post_defenses", {}).get(defense, {})
    return {"asr": result["asr"], "acc": result["acc"], "run": str(run.path)} if "acc" in result else None


def attack_metrics(runs: Path, dataset: str, attack: str) -> dict | None:
    run = RunDir(runs / run_name(dataset, attack, "fedavg"))
    if not run.exists():
        return None
    log = run.summary().get("attack_log", [])
    if not log:
        return None
    mean = lambda key: sum(e[key] for e in log) / len(log)  # noqa: E731
    return {"replies": len(log), "norm_sent": mean("update-norm"), "norm_trained": mean("update-norm-unconstrained"),
            "masked_share": mean("masked-share"), "masked_columns": mean("masked-columns")}


RULES = ("fedavg", "flame", "fltrust", "foolsgold", "norm-clipping", "weak-dp")
SETTINGS = {"default": {}, "dirichlet": {"partition": "dirichlet"}, "scaling": {"attack": "scaling"},
            "flain-aware": {"attack": "flain-aware"}}
RULE_COLUMNS = (("alone", None), ("+ FLAIN", "flain"), ("+ FLAIN-CV", "flain-cv"))


def train_rules(runs: Path) -> None:
    """The missing `rules-<setting>-<rule>` trainings, one after another, with progress."""
    plan = [(setting, rule) for setting in SETTINGS for rule in RULES]
    started, done = time.monotonic(), 0
    for i, (setting, rule) in enumerate(plan, 1):
        run_dir = runs / f"rules-{setting}-{rule}"
        if RunDir(run_dir).status() in ("completed", "defense-failed"):
            print(f"[{i}/{len(plan)}] {run_dir.name}: finished, kept", flush=True)
            continue
        sets = {"aggregation": rule, "num-rounds": 10, "post-defenses": "flain,flain-cv", "run-dir": str(run_dir),
                **SETTINGS[setting]}
        cmd = [sys.executable, "-m", "launch.cli", "run", "--overwrite"]
        for key, value in sets.items():
            cmd += ["--set", f"{key}={json.dumps(value)}"]
        print(f"[{i}/{len(plan)}] {run_dir.name}: training", flush=True)
        code = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT).returncode
        done += 1
        left = (time.monotonic() - started) / done * (len(plan) - i)
        print(f"[{i}/{len(plan)}] {run_dir.name}: exit {code}; about {left / 60:.0f} min left", flush=True)


def rules_table(runs: Path) -> tuple[str, dict]:
    cells = {}
    for setting in SETTINGS:
        for rule in RULES:
            run = RunDir(runs / f"rules-{setting}-{rule}")
            summary = run.summary() if run.finished() else None
            for column, defense in RULE_COLUMNS:
                result = None if summary is None else (
                    summary["final"] if defense is None else summary.get("post_defenses", {}).get(defense))
                cells[f"{setting}/{rule}/{column}"] = (
                    {"asr": result["asr"], "acc": result["acc"], "run": str(run.path)} if result and "acc" in result
                    else None)
    lines = ["ASR / ACC on the evaluation images (Fashion-MNIST, the default experiment with the setting's "
             "change, seed 42, 10 rounds):", "",
             "| setting | rule | " + " | ".join(c for c, _ in RULE_COLUMNS) + " |",
             "| --- " * (len(RULE_COLUMNS) + 2) + "|"]
    for setting in SETTINGS:
        for rule in RULES:
            row = [cells[f"{setting}/{rule}/{c}"] for c, _ in RULE_COLUMNS]
            lines.append(f"| {setting} | `{rule}` | " + " | ".join(
                f"{c['asr']:.3f} / {c['acc']:.3f}" if c else "not run" for c in row) + " |")
    return "\n".join(lines), cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fmnist", choices=sorted(NAMES))
    p.add_argument("--runs", type=Path, default=None,
                   help="default: runs (attacks), docs/rules (--rules: the committed runs; git keeps their config, "
                        "rounds and summary, and --train adds the missing ones there)")
    p.add_argument("--json", type=Path)
    p.add_argument("--readme", type=Path, help="replace the table between the attack-table (or rules-table) markers")
    p.add_argument("--rules", action="store_true", help="the robust-rule comparison instead of the attack table")
    p.add_argument("--train", action="store_true", help="with --rules: first train the missing runs")
    args = p.parse_args()
    if args.rules:
        runs = args.runs or Path("docs/rules")
        if args.train:
            train_rules(runs)
        text, cells = rules_table(runs)
        print(text)
        if args.readme:
            _replace(args.readme, "rules-table", text)
        if args.json:
            args.json.write_text(json.dumps({"cells": cells}, indent=1) + "\n")
        return
    args.runs = args.runs or Path("runs")
    table = {a: {name: cell(args.runs, args.dataset, a, rule, d) for name, rule, d in DEFENSES} for a in ATTACKS}
    metrics = {a: attack_metrics(args.runs, args.dataset, a) for a in ATTACKS}
    setting = "the default experiment" if args.dataset == "fmnist" else f"the default experiment with dataset={args.dataset}"
    lines = [f"ASR / ACC on the 9,800 evaluation images ({NAMES[args.dataset]}, {setting}, seed 42, "
             "10 rounds):", "",
             "| attack | " + " | ".join(name for name, _, _ in DEFENSES) + " |",
             "| --- " * (len(DEFENSES) + 1) + "|"]
    for a in ATTACKS:
        cells = [f"{c['asr']:.3f} / {c['acc']:.3f}" if c else "not run" for c in table[a].values()]
        lines.append(f"| `{a}` | " + " | ".join(cells) + " |")
    lines += ["", "What the malicious clients reported (means over their replies in the FedAvg run):", "",
              "| attack | malicious replies | update norm sent | norm trained | coordinates frozen | tau columns frozen |",
              "| --- | --- | --- | --- | --- | --- |"]
    for a, m in metrics.items():
        if m:
            lines.append(f"| `{a}` | {m['replies']} | {m['norm_sent']:.2f} | {m['norm_trained']:.2f} | "
                         f"{m['masked_share']:.3f} | {m['masked_columns']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.readme:
        _replace(args.readme, "attack-table" if args.dataset == "fmnist" else f"attack-table-{args.dataset}", text)
    if args.json:
        args.json.write_text(json.dumps({"cells": table, "attack_metrics": metrics}, indent=1) + "\n")


def _replace(page: Path, tag: str, text: str) -> None:
    """The text between `<!-- tag: ... -->` and `<!-- /tag -->` in `page`."""
    readme = page.read_text()
    start = readme.index("-->\n", readme.index(f"<!-- {tag}:")) + 4
    end = readme.index(f"<!-- /{tag} -->")
    page.write_text(readme[:start] + text + "\n" + readme[end:])


if __name__ == "__main__":
    main()
