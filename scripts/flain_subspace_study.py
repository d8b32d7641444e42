"""The settings grid of the flain-subspace study (results in docs/flain-subspace-study.md).

For each finished run directory and each `flain-subspace-augment`: the cross-fitted aux drop
curve once (it does not depend on the tolerance), then for every tolerance of the grid the
model `flain-subspace` would return (the same pure functions as the defense) and its test
ACC/ASR. The choice sees only the aux set; the test images only score it.

    .venv/bin/python scripts/flain_subspace_study.py runs/A runs/B ... [--out docs/flain-subspace-study]
    .venv/bin/python scripts/flain_subspace_study.py --oracle runs/A ...   (the reachable points; --round R: a checkpoint)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiment.data import to_float  # noqa: E402
from launch.defend import load_saved_run  # noqa: E402
from models import build_model  # noqa: E402
from strategies.post_training.flain_subspace import (  # noqa: E402
    AUGMENTS, EPSILONS, FlainSubspace, clean_basis, flipped_weight, kept_directions, subspace_flip)
from strategies.post_training.tau import TauView, tau_features  # noqa: E402

TOLS = (0.005, 0.01, 0.015, 0.02, 0.03)  # fixed in the study's plan before D2 and D4 existed


@torch.no_grad()
def _load(run_dir: Path, rnd: int | None = None):
    """(cfg, evaluator on the images `flain defend` scores, the trained model's state, tau, W0
    of tau, the aux images): the trained model is the final one, or the checkpoint of `rnd`."""
    saved = load_saved_run(run_dir, ["flain-subspace"], {}, rnd)
    cfg = saved.config
    model = build_model(cfg.dataset, cfg.network)
    model.load_state_dict(saved.trained)
    model.eval()
    aux_x, aux_y = to_float(saved.images[saved.aux]), saved.labels[saved.aux]
    tau = TauView.of(model, cfg.flain_layer, aux_x, aux_y)
    return cfg, saved.evaluator("cpu"), saved.trained, tau, saved.initial[f"{tau.name}.weight"].to(tau.weight), aux_x


@torch.no_grad()
def study(run_dir: Path, rnd: int | None = None) -> dict:
    cfg, evaluator, final, tau, w0, aux_x = _load(run_dir, rnd)
    result = {"run": run_dir.name, "round": rnd, "dataset": cfg.dataset, "seed": cfg.seed, "no_defense": evaluator(final),
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


@torch.no_grad()
def oracle(run_dir: Path, rnd: int | None = None) -> dict:
    """The test ACC/ASR at every point of the flip path (`shift-mirror`, every eps of the
    scan, directions from all 200 aux images): what any rule on this path could reach at best.
    Test labels score every point, so it chooses nothing; it only says whether the issue's bar
    lies on the path at all."""
    cfg, evaluator, trained, tau, w0, aux_x = _load(run_dir, rnd)
    defense = FlainSubspace(augment="shift-mirror", layer=cfg.flain_layer, seed=cfg.seed)
    basis, energy = clean_basis(defense.features(tau, aux_x))
    nd = evaluator(trained)
    # tau's inputs once; every point of the path then only runs the layers after tau
    module = tau.model.get_submodule(tau.name)
    clean = tau_features(tau.model, module, tau.name, to_float(evaluator.images))
    stamped = tau_features(tau.model, module, tau.name, to_float(evaluator.triggered))
    bias = 0.0 if tau.bias is None else tau.bias.detach()

    def score(weight: torch.Tensor) -> dict[str, float]:
        acc = (tau.rest(clean @ weight.T + bias).argmax(1) == evaluator.labels).float().mean().item()
        asr = (tau.rest(stamped @ weight.T + bias).argmax(1) == cfg.target_label).float().mean().item()
        return {"acc": acc, "asr": asr}

    path = [{"eps": None, "kept": None, **score(tau.weight)}]  # no flip: must equal no-Defense
    for eps in EPSILONS:
        k = kept_directions(energy, float(eps))
        path.append({"eps": float(eps), "kept": k, **score(subspace_flip(w0, tau.weight, basis, k))})
    for p in path:
        p["drop"] = nd["acc"] - p["acc"]
    within = [p["asr"] for p in path if p["drop"] <= 0.01]
    removed = [p["drop"] for p in path if p["asr"] <= 0.02]
    return {"run": run_dir.name, "round": rnd, "no_defense": nd, "directions": int(len(energy)), "path": path,
            "best_asr_at_drop_0.01": min(within, default=nd["asr"]),
            "least_drop_at_asr_0.02": min(removed, default=None)}


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs/flain-subspace-study"))
    p.add_argument("--oracle", action="store_true", help="test ACC/ASR along the whole flip path instead (oracle/)")
    p.add_argument("--round", type=int, default=None, help="the checkpoint of this round instead of the final model")
    args = p.parse_args()
    suffix = "" if args.round is None else f"@{args.round}"
    for run_dir in args.runs:
        if args.oracle:
            result = oracle(run_dir, args.round)
            _write(args.out / "oracle" / f"{run_dir.name}{suffix}.json", result)
            print(f"{run_dir.name}{suffix}: no-Defense ASR {result['no_defense']['asr']:.4f}; best ASR at a test drop "
                  f"<= 0.01: {result['best_asr_at_drop_0.01']:.4f}; least drop at ASR <= 0.02: "
                  f"{result['least_drop_at_asr_0.02']}")
            continue
        result = study(run_dir, args.round)
        _write(args.out / f"{run_dir.name}{suffix}.json", result)
        nd = result["no_defense"]
        print(f"\n{result['run']}: no-Defense ACC {nd['acc']:.4f} ASR {nd['asr']:.4f}")
        print("| setting | kept | est. aux drop | ACC | drop | ASR |\n| --- | --- | --- | --- | --- | --- |")
        for name, r in result["settings"].items():
            print(f"| {name} | {r['kept_directions']}/{r['directions']} | {r['estimated_drop']:.4f} | "
                  f"{r['acc']:.4f} | {nd['acc'] - r['acc']:.4f} | {r['asr']:.4f} |")


if __name__ == "__main__":
    main()
