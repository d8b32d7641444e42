"""FLAIN: Flipping Weight Updates of Low-Activation Input Neurons.

Ding, Yang, Ge, Huang, "Mitigating Backdoor Attacks in Federated Learning via Flipping
Weight Updates of Low-Activation Input Neurons" (Algorithm 1).

After training, for the fully connected layer tau with initial weights W0 and trained
weights W (shape out x in, so column i belongs to input neuron i):
  x_i    = mean post-ReLU input i of tau over a clean auxiliary set,
  lambda = min(x) + k * step for k = 1, 2, ...,
  W*     = W0 - dW on the columns with x_i <= lambda, W0 + dW elsewhere (dW = W - W0),
stopping at the first lambda whose aux-accuracy drop acc0 - acc(W*) reaches rho; W* is
then rescaled to the Frobenius norm of W. If every input is flipped before the drop
reaches rho, the search stops there (`exhausted`) instead of looping forever.

`lambda_k = min + k*step` is computed directly, not by repeated addition, so the fast
search and the plain loop compare against bit-identical thresholds.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models import resolve_tau, split_at

# accuracy on the aux set of the model whose tau weight is the given matrix
Evaluate = Callable[[torch.Tensor], float]


# ---- pure pieces -------------------------------------------------------------------
def flip_updates(w0: torch.Tensor, w: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Eq. (7): column i is w0 - dw where flip[i], w0 + dw elsewhere."""
    dw = w - w0
    sign = torch.where(flip, -1.0, 1.0).to(dw.dtype)
    return w0 + dw * sign.unsqueeze(0)


def rescale(w_star: torch.Tensor, norm: float) -> torch.Tensor:
    """Algorithm 1, lines 18-19: scale W* to Frobenius norm `norm`."""
    n1 = torch.linalg.matrix_norm(w_star).item()
    return w_star * (norm / n1) if n1 > 0 else w_star


def thresholds(x: np.ndarray, step: float) -> tuple[float, np.ndarray]:
    """(mu, ks): min(x) and the steps k >= 1 at which the flipped set {x <= mu + k*step}
    changes, ascending. Between two of them the set, hence the model, is the same."""
    mu = float(x.min())
    values = np.unique(x)
    ks = np.maximum(1, np.ceil((values - mu) / step)).astype(np.int64)
    # ceil() on floats can be one off either way: settle each k exactly.
    while np.any(low := mu + ks * step < values):
        ks[low] += 1
    while np.any(high := (ks > 1) & (mu + (ks - 1) * step >= values)):
        ks[high] -= 1
    return mu, np.unique(ks)


@dataclass
class FlainResult:
    weight: torch.Tensor  # rescaled W*
    threshold: float  # lambda at which the search stopped
    steps: int  # k: lambda = min + k * step
    flipped: int  # number of flipped input columns
    aux_acc_before: float  # acc0
    aux_acc_at_stop: float  # acc(W*) before rescaling
    exhausted: bool  # every input flipped before the drop reached rho
    evaluations: int  # aux evaluations made by the search


def _finish(x, w0, w, mu, k, step, acc0, acc1, rho, evaluations) -> FlainResult:
    lam = mu + k * step
    flip = torch.from_numpy(x <= lam)
    return FlainResult(
        weight=rescale(flip_updates(w0, w, flip), torch.linalg.matrix_norm(w).item()),
        threshold=float(lam),
        steps=int(k),
        flipped=int(flip.sum()),
        aux_acc_before=acc0,
        aux_acc_at_stop=acc1,
        exhausted=not (rho <= acc0 - acc1),
        evaluations=evaluations,
    )


def flain_search_reference(
    x: np.ndarray, w0: torch.Tensor, w: torch.Tensor, step: float, rho: float, evaluate: Evaluate
) -> FlainResult:
    """Algorithm 1 as written: one evaluation per step of lambda (the slow reference)."""
    x = np.asarray(x, dtype=np.float64)
    mu, acc0 = float(x.min()), evaluate(w)
    k, evaluations = 1, 0
    while True:
        flip = x <= mu + k * step
        acc1 = evaluate(flip_updates(w0, w, torch.from_numpy(flip)))
        evaluations += 1
        if rho <= acc0 - acc1 or flip.all():
            return _finish(x, w0, w, mu, k, step, acc0, acc1, rho, evaluations)
        k += 1


def flain_search(
    x: np.ndarray, w0: torch.Tensor, w: torch.Tensor, step: float, rho: float, evaluate: Evaluate
) -> FlainResult:
    """Algorithm 1, evaluating only at the lambdas where the flipped set changes.

    Same stop, same lambda, same weights as `flain_search_reference`."""
    x = np.asarray(x, dtype=np.float64)
    mu, ks = thresholds(x, step)
    acc0 = evaluate(w)
    for evaluations, k in enumerate(ks, start=1):
        flip = x <= mu + k * step
        acc1 = evaluate(flip_updates(w0, w, torch.from_numpy(flip)))
        if rho <= acc0 - acc1 or flip.all():
            return _finish(x, w0, w, mu, k, step, acc0, acc1, rho, evaluations)
    raise AssertionError("unreachable: the last threshold flips every input")


# ---- model wiring ------------------------------------------------------------------
@torch.no_grad()
def tau_inputs(body: nn.Module, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Inputs of tau (post-ReLU features) for every aux image, N x z."""
    return torch.cat([body(images[i : i + batch]) for i in range(0, len(images), batch)])


def head_accuracy(head: nn.Sequential, tau_name: str, features: torch.Tensor, labels: torch.Tensor) -> Evaluate:
    """Evaluate(W) = accuracy of `head` (tau and after) on cached features with tau.weight = W."""
    tau: nn.Linear = head._modules[tau_name]  # type: ignore[assignment]

    @torch.no_grad()
    def evaluate(weight: torch.Tensor) -> float:
        tau.weight.copy_(weight)
        return (head(features).argmax(1) == labels).float().mean().item()

    return evaluate


@dataclass(frozen=True)
class Flain:
    """Post-training defense: FLAIN on layer `layer` ('auto' = first Linear after convs)."""

    step: float = 0.001
    rho: float = 0.02
    layer: str = "auto"

    @classmethod
    def from_config(cls, cfg: Any) -> Flain:
        return cls(step=cfg.flain_step, rho=cfg.flain_rho, layer=cfg.flain_layer)

    def apply(
        self,
        model: nn.Sequential,
        initial_state: dict[str, torch.Tensor],
        aux_images: torch.Tensor,
        aux_labels: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Defend `model` (trained weights loaded, on its device; left untouched).

        Returns the defended state_dict and what the search found."""
        started = time.perf_counter()
        model = copy.deepcopy(model).eval()
        name = resolve_tau(model, self.layer)
        body, head = split_at(model, name)
        device = next(model.parameters()).device
        features = tau_inputs(body, aux_images.to(device))
        labels = aux_labels.to(device)
        w = model._modules[name].weight.detach().clone()
        w0 = initial_state[f"{name}.weight"].to(device=device, dtype=w.dtype)
        x = features.mean(0).double().cpu().numpy()

        result = flain_search(x, w0, w, self.step, self.rho, head_accuracy(head, name, features, labels))

        with torch.no_grad():
            model._modules[name].weight.copy_(result.weight)
            aux_acc_after = (head(features).argmax(1) == labels).float().mean().item()
        info = {
            "layer": name,
            "threshold": result.threshold,
            "flipped": result.flipped,
            "inputs": int(w.shape[1]),
            "aux_acc_before": result.aux_acc_before,
            "aux_acc_at_stop": result.aux_acc_at_stop,
            "aux_acc_after": aux_acc_after,
            "exhausted": result.exhausted,
            "evaluations": result.evaluations,
            "search_seconds": time.perf_counter() - started,
        }
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, info
