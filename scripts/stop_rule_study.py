"""The stop-rule study behind `flain-cv` (results in docs/stop-rule-study.md).

For each finished run directory: the test ACC/ASR of FLAIN's flipped model along the whole
flipping order (inputs of tau by ascending clean aux activation, each model rescaled as
Algorithm 1 returns it), and where each candidate stop rule lands on that curve. The rules
see only the clean aux set; the test images (clean and triggered) only score them.

    .venv/bin/python scripts/stop_rule_study.py runs/A runs/B ... [--out docs/stop-rule-study]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attacks import trigger_scheme  # noqa: E402
from experiment.data import to_float  # noqa: E402
from launch.defend import load_saved_run  # noqa: E402
from models import build_model, split_at  # noqa: E402
from strategies.post_training import PostTrainingInput  # noqa: E402
from strategies.post_training.flain import Flain  # noqa: E402
from strategies.post_training.flain_cv import FlainCV, candidate_counts, select_count  # noqa: E402
from strategies.post_training.flip_path import flip_path_logits  # noqa: E402
from strategies.post_training.tau import TauView, tau_inputs  # noqa: E402

# name -> FlainCV settings (tol, scores, select, balanced); "flain" is Algorithm 1 itself
CANDIDATES: dict[str, dict] = {
    "A1 flain rho=0.02 (Algorithm 1)": {},
    "same / first-beyond / 0.01": dict(tol=0.01, scores="same", select="first-beyond", soft=False),
    "same / last-within / 0.01": dict(tol=0.01, scores="same", select="last-within", soft=False),
    "split / last-within / 0.01": dict(tol=0.01, scores="split", select="last-within", soft=False),
    "crossfit5 / first-beyond / 0.01": dict(tol=0.01, scores="crossfit", select="first-beyond", soft=False),
    "crossfit5 / last-within / 0.005": dict(tol=0.005, scores="crossfit", select="last-within", soft=False),
    "crossfit5 / last-within / 0.01": dict(tol=0.01, scores="crossfit", select="last-within", soft=False),
    "crossfit5 / last-within / 0.02": dict(tol=0.02, scores="crossfit", select="last-within", soft=False),
    "crossfit5 balanced / last-within / 0.01": dict(tol=0.01, scores="crossfit", select="last-within", balanced=True,
                                                    soft=False),
    # round 2: the soft accuracy (mean true-class probability)
    "soft crossfit5 / last-within / 0.01": dict(tol=0.01, scores="crossfit", select="last-within", soft=True),
    "soft crossfit5 / last-within / 0.015": dict(tol=0.015, scores="crossfit", select="last-within", soft=True),
    "soft crossfit5 / last-within / 0.02": dict(tol=0.02, scores="crossfit", select="last-within", soft=True),
    "soft same / last-within / 0.015": dict(tol=0.015, scores="same", select="last-within", soft=True),
}


def test_curve(model, initial, layer, images, labels, triggered, target, counts, order):
    """(ACC, ASR) on the test images at every count of the flipping order."""
    body, head = split_at(model, layer)
    feats = tau_inputs(body, to_float(images))
    trig = tau_inputs(body, to_float(triggered))
    w, w0 = head[0].weight.detach(), initial[f"{layer}.weight"]
    acc = [(z.argmax(1) == labels).double().mean().item()
           for z in flip_path_logits(feats, w0, w, head[0].bias.detach(), head[1:], order, counts)]
    asr = [(z.argmax(1) == target).double().mean().item()
           for z in flip_path_logits(trig, w0, w, head[0].bias.detach(), head[1:], order, counts)]
    return np.array(acc), np.array(asr)


@torch.no_grad()
def study(run_dir: Path) -> dict:
    saved = load_saved_run(run_dir, ["flain"], {})
    cfg, initial = saved.config, saved.initial
    model = build_model(cfg.dataset, cfg.network)
    model.load_state_dict(saved.trained)
    model.eval()
    aux_x, aux_y = to_float(saved.images[saved.aux]), saved.labels[saved.aux]
    tau = TauView.of(model, cfg.flain_layer, aux_x, aux_y)
    counts = candidate_counts(tau.activations, cfg.flain_step)
    order = np.argsort(tau.activations, kind="stable")
    ev_x, ev_y = saved.images[saved.scored], saved.labels[saved.scored]  # as `flain defend` scores
    triggered = trigger_scheme(cfg).full.stamp(ev_x[ev_y == cfg.source_label])
    w0 = initial[f"{tau.name}.weight"]
    chosen = {}
    for name, settings in CANDIDATES.items():
        if not settings:
            chosen[name] = Flain(step=cfg.flain_step, rho=0.02, layer=cfg.flain_layer).apply(
                PostTrainingInput(model, initial, aux_x, aux_y))[1]["flipped"]
        else:
            rule = FlainCV(step=cfg.flain_step, layer=cfg.flain_layer, seed=cfg.seed, **settings)
            _, drops = rule.drop_curve(tau, w0, counts)
            chosen[name] = select_count(counts[: len(drops)], drops, rule.tol, rule.select)
    # the test curve on ~400 counts (every image of the evaluation set at each) plus the chosen ones
    grid = np.unique(np.concatenate([counts[:: max(1, len(counts) // 400)], list(chosen.values()), [0, counts[-1]]]))
    acc, asr = test_curve(model, initial, tau.name, ev_x, ev_y, triggered, cfg.target_label, grid, order)
    rows = {}
    for name, n in chosen.items():
        i = int(np.searchsorted(grid, n))
        rows[name] = {"flipped": int(n), "acc": float(acc[i]), "asr": float(asr[i]), "drop": float(acc[0] - acc[i])}
    counts = grid
    ok = np.flatnonzero(asr <= 0.02)
    best = int(ok[np.argmax(acc[ok])]) if len(ok) else None  # for reading only: uses the test labels
    return {
        "run": run_dir.name, "dataset": cfg.dataset, "seed": cfg.seed, "inputs": int(len(order)),
        "no_defense": {"acc": float(acc[0]), "asr": float(asr[0])}, "rules": rows,
        "oracle": None if best is None else {"flipped": int(counts[best]), "acc": float(acc[best]),
                                            "asr": float(asr[best]), "drop": float(acc[0] - acc[best])},
        "curve": {"counts": counts.tolist(), "acc": acc.tolist(), "asr": asr.tolist()},
    }


def plot(result: dict, rules: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["curve"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(c["counts"], c["acc"], color="tab:blue", label="test ACC")
    ax.plot(c["counts"], c["asr"], color="tab:red", label="test ASR")
    for name, marker in zip(rules, "ov^sD*"):
        r = result["rules"][name]
        ax.plot([r["flipped"]], [r["acc"]], marker, color="k", ms=7, label=name)
    ax.set(xlabel="inputs of tau flipped (ascending clean activation)", ylabel="rate", ylim=(-0.02, 1.02),
           title=f"{result['run']}: FLAIN's flip, test ACC/ASR by count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/stop-rule-study"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for run_dir in args.runs:
        result = study(run_dir)
        (args.out / f"{run_dir.name}.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, ["A1 flain rho=0.02 (Algorithm 1)", "crossfit5 / last-within / 0.01",
                      "soft crossfit5 / last-within / 0.02"], args.out / f"{run_dir.name}.png")
        nd = result["no_defense"]
        print(f"\n{result['run']} ({result['dataset']}, seed {result['seed']}): no-Defense ACC {nd['acc']:.4f} "
              f"ASR {nd['asr']:.4f}; oracle (test labels, ASR<=0.02): {result['oracle']}")
        print("| rule | flipped | ACC | drop | ASR |\n| --- | --- | --- | --- | --- |")
        for name, r in result["rules"].items():
            print(f"| {name} | {r['flipped']} | {r['acc']:.4f} | {r['drop']:.4f} | {r['asr']:.4f} |")


if __name__ == "__main__":
    main()
