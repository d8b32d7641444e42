"""Benchmark: FLAIN's threshold search, three ways, on the real FMNIST network.

  plain   Algorithm 1 as written: every step of lambda, the whole model on the aux set
  cached  every step of lambda, only the head (tau on) on cached tau inputs
  fast    only the lambdas where the flipped set changes, head only (what `Flain` runs)

All three must stop at the same lambda with the same weights; the script checks that and
prints the times and the speed-up ratios measured in this one run.

  .venv/bin/python benchmarks/flain_search.py [--model runs/NAME/final.pt] [--step 0.001]

Without --model it trains the network for a few hundred steps on Fashion-MNIST first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.training import train_local  # noqa: E402
from experiment.data import load, split_test, to_float  # noqa: E402
from models import build_model, split_at  # noqa: E402
from strategies.post_training.flain import flain_search, flain_search_reference  # noqa: E402
from strategies.post_training.tau import head_accuracy, tau_inputs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a trained state_dict (e.g. runs/NAME/final.pt)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--step", type=float, default=0.001)
    p.add_argument("--rho", type=float, default=0.02)
    args = p.parse_args()

    torch.manual_seed(0)
    model = build_model("fmnist")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    if args.model:
        model.load_state_dict(torch.load(args.model, weights_only=True))
    else:
        x, y = load("fmnist", args.data_dir, True)
        print("training the network on 12,000 images (no --model given) ...", flush=True)
        train_local(model, x[:12000], y[:12000], 1, 64, 1e-3, generator=torch.Generator().manual_seed(0))
    model = model.eval().to(memory_format=torch.contiguous_format)

    test_x, test_y = load("fmnist", args.data_dir, False)
    aux_idx, _ = split_test(len(test_y), 200, seed=42)
    aux_x, aux_y = to_float(test_x[aux_idx]), test_y[aux_idx]
    body, head = split_at(model, "fc1")
    feats = tau_inputs(body, aux_x)
    x_mean = feats.mean(0).double().numpy()
    w = model.fc1.weight.detach().clone()
    w0 = initial["fc1.weight"]

    @torch.no_grad()
    def full_model(weight: torch.Tensor) -> float:
        model.fc1.weight.copy_(weight)
        return (model(aux_x).argmax(1) == aux_y).float().mean().item()

    cached = head_accuracy(head, "fc1", feats, aux_y)
    runs = {}
    for name, search, evaluate in (
        ("plain", flain_search_reference, full_model),
        ("cached", flain_search_reference, cached),
        ("fast", flain_search, cached),
    ):
        started = time.perf_counter()
        res = search(x_mean, w0, w, args.step, args.rho, evaluate)
        runs[name] = (time.perf_counter() - started, res)
        print(f"{name:>6}: {runs[name][0]:8.3f}s  evaluations={res.evaluations:5d}  "
              f"lambda={res.threshold:.4f}  flipped={res.flipped}  exhausted={res.exhausted}", flush=True)
        model.fc1.weight.data.copy_(w)

    base = runs["plain"][1]
    for name in ("cached", "fast"):
        res = runs[name][1]
        same = res.threshold == base.threshold and res.flipped == base.flipped
        close = torch.allclose(res.weight, base.weight, atol=1e-6)
        print(f"{name} vs plain: same lambda/flipped={same}, same weights={close}, "
              f"speed-up {runs['plain'][0] / runs[name][0]:.1f}x")


if __name__ == "__main__":
    main()
