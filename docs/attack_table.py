"""The adaptive-attack table (README, "Adaptive attacks") from the run directories.

  .venv/bin/python docs/attack_table.py [--runs runs] [--json docs/adaptive-attacks.json] [--readme README.md]

For each attack, `RUNS/attack-<attack>-<rule>/summary.json` with rule fedavg (no-Defense and
every post-training defense on its final model), rlr and multikrum; a missing run is shown as
"not run" (`attack-none-rlr` is a link to the reproduction's RLR training: the same
configuration). Also what the malicious clients reported (attack_log): the mean L2 norm of the
update they sent and of the one they trained, and the share of coordinates they froze.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ATTACKS = ("none", "neurotoxin", "scaling", "pgd", "flain-aware")
DEFENSES = (("no-Defense", "fedavg", None), ("FLAIN", "fedavg", "flain"), ("FLAIN-CV", "fedavg", "flain-cv"),
            ("Pruning", "fedavg", "pruning"), ("FedPruning", "fedavg", "fedpruning"), ("RLR", "rlr", None),
            ("Multi-Krum", "multikrum", None))


def cell(runs: Path, attack: str, rule: str, defense: str | None) -> dict | None:
    path = runs / f"attack-{attack}-{rule}" / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("status") not in ("completed", "defense-failed"):
        return None
    result = summary["final"] if defense is None else summary.get("post_defenses", {}).get(defense, {})
    return {"asr": result["asr"], "acc": result["acc"], "run": str(path.parent)} if "acc" in result else None


def attack_metrics(runs: Path, attack: str) -> dict | None:
    path = runs / f"attack-{attack}-fedavg" / "summary.json"
    if not path.is_file():
        return None
    log = json.loads(path.read_text()).get("attack_log", [])
    if not log:
        return None
    mean = lambda key: sum(e[key] for e in log) / len(log)  # noqa: E731
    return {"replies": len(log), "norm_sent": mean("update-norm"), "norm_trained": mean("update-norm-unconstrained"),
            "masked_share": mean("masked-share"), "masked_columns": mean("masked-columns")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs"))
    p.add_argument("--json", type=Path)
    p.add_argument("--readme", type=Path, help="replace the table between the attack-table markers there")
    args = p.parse_args()
    table = {a: {name: cell(args.runs, a, rule, d) for name, rule, d in DEFENSES} for a in ATTACKS}
    metrics = {a: attack_metrics(args.runs, a) for a in ATTACKS}
    lines = ["ASR / ACC on the 9,800 evaluation images (Fashion-MNIST, the default experiment, seed 42, "
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
        start, end = readme.index("-->\n", readme.index("<!-- attack-table")) + 4, readme.index("<!-- /attack-table -->")
        args.readme.write_text(readme[:start] + text + "\n" + readme[end:])
    if args.json:
        args.json.write_text(json.dumps({"cells": table, "attack_metrics": metrics}, indent=1) + "\n")


if __name__ == "__main__":
    main()
