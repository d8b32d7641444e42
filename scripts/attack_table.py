"""The adaptive-attack table (docs/adaptive-attacks.md) from the run directories.

  .venv/bin/python scripts/attack_table.py [--dataset fmnist] [--runs runs] [--json docs/adaptive-attacks.json] [--readme docs/adaptive-attacks.md]

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
import sys
import json
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fmnist", choices=sorted(NAMES))
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--json", type=Path)
    p.add_argument("--readme", type=Path, help="replace the table between the attack-table markers there")
    args = p.parse_args()
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
        readme = args.readme.read_text()
        tag = "attack-table" if args.dataset == "fmnist" else f"attack-table-{args.dataset}"
        start = readme.index("-->\n", readme.index(f"<!-- {tag}:")) + 4
        end = readme.index(f"<!-- /{tag} -->")
        args.readme.write_text(readme[:start] + text + "\n" + readme[end:])
    if args.json:
        args.json.write_text(json.dumps({"cells": table, "attack_metrics": metrics}, indent=1) + "\n")


if __name__ == "__main__":
    main()
