"""The settings grid of the flain-subspace study (issue 27; results in docs/flain-subspace-study.md).

For each finished run directory and each `flain-subspace-augment`: the cross-fitted aux drop
curve once (it does not depend on the tolerance), then for every tolerance of the grid the
model `flain-subspace` would return (the same pure functions as the defense) and its test
ACC/ASR. The choice sees only the aux set; the test images only score it.

    .venv/bin/python scripts/flain_subspace_study.py runs/A runs/B ... [--out docs/flain-subspace-study]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiment.data import load, root_split, to_float  # noqa: E402
from launch.defend import aux_indices, defend_config  # noqa: E402
from launch.tables import read_run  # noqa: E402
from models import build_model  # noqa: E402
from server.post_training import make_evaluator  # noqa: E402
from server.results import RunDir  # noqa: E402
from strategies.post_training.flain_subspace import (  # noqa: E402
    AUGMENTS, FlainSubspace, clean_basis, flipped_weight)
from strategies.post_training.tau import TauView  # noqa: E402

TOLS = (0.005, 0.01, 0.015, 0.02, 0.03)  # fixed in the study's plan before D2 and D4 existed


@torch.no_grad()
def study(run_dir: Path) -> dict:
    run_config, _ = read_run(run_dir)
    cfg = defend_config(run_config, ["flain-subspace"], {})
    images, labels = load(cfg.dataset, cfg.data_dir, train=False)
    run = RunDir(run_dir)
    aux_idx, _ = aux_indices(run, run_config, cfg, labels.numpy(), {})
    eval_mask = np.zeros(len(labels), dtype=bool)
    eval_mask[root_split(cfg, labels.numpy(), aux_idx)[1]] = True  # as `flain defend` scores
    evaluator = make_evaluator(cfg, images[eval_mask], labels[eval_mask], "cpu")
    model = build_model(cfg.dataset, cfg.network)
    final = run.load_model("final", model.state_dict())
    initial = run.load_model("initial", model.state_dict())
    model.load_state_dict(final)
    model.eval()
    aux_x, aux_y = to_float(images[aux_idx]), labels[aux_idx]
    tau = TauView.of(model, cfg.flain_layer, aux_x, aux_y)
    w0 = initial[f"{tau.name}.weight"].to(tau.weight)
    result = {"run": run_dir.name, "dataset": cfg.dataset, "seed": cfg.seed, "no_defense": evaluator(final),
              "settings": {}}
    for aug in AUGMENTS:
        started = time.perf_counter()
        defense = FlainSubspace(augment=aug, folds=cfg.flain_subspace_folds, layer=cfg.flain_layer, seed=cfg.seed)
        augmented = defense.features(tau, aux_x)
        gram = augmented.double() @ augmented.double().T
        _, drops = defense.drop_curve(tau, w0, augmented, gram)
        basis, energy = clean_basis(augmented, gram)
        curve_seconds = time.perf_counter() - started
        for tol in TOLS:
            weight, k, i = flipped_weight(w0, tau.weight, drops, tol, basis, energy)
            state = dict(final) | {f"{tau.name}.weight": weight.cpu()}
            result["settings"][f"{aug} / {tol}"] = evaluator(state) | {
                "kept_directions": k, "directions": int(len(energy)), "estimated_drop": float(drops[i]),
                "curve_seconds": curve_seconds}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/flain-subspace-study"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for run_dir in args.runs:
        result = study(run_dir)
        path = args.out / f"{run_dir.name}.json"
        path.with_suffix(".tmp").write_text(json.dumps(result, indent=1) + "\n")
        path.with_suffix(".tmp").replace(path)
        nd = result["no_defense"]
        print(f"\n{result['run']}: no-Defense ACC {nd['acc']:.4f} ASR {nd['asr']:.4f}")
        print("| setting | kept | est. aux drop | ACC | drop | ASR |\n| --- | --- | --- | --- | --- | --- |")
        for name, r in result["settings"].items():
            print(f"| {name} | {r['kept_directions']}/{r['directions']} | {r['estimated_drop']:.4f} | "
                  f"{r['acc']:.4f} | {nd['acc'] - r['acc']:.4f} | {r['asr']:.4f} |")


if __name__ == "__main__":
    main()
