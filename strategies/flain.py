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

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from strategies.post_training import PostTrainingInput
from strategies.tau import Evaluate, TauView


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
    """(mu, ks): min(x) and the steps k >= 1 at which the set {x <= mu + k*step}
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


# ---- the adaptive threshold (shared with the pruning baseline) ----------------------
@dataclass
class Stop:
    steps: int  # k: lambda = min(x) + k * step
    threshold: float
    mask: np.ndarray  # x <= lambda: the inputs acted on
    acc: float  # aux accuracy at the stop
    exhausted: bool  # every input acted on before the drop reached rho
    evaluations: int


MaskAccuracy = Callable[[np.ndarray], float]


def adaptive_threshold_reference(x: np.ndarray, step: float, rho: float, acc0: float, accuracy: MaskAccuracy) -> Stop:
    """Raise lambda by `step` until acc0 - accuracy(x <= lambda) >= rho (or all are in)."""
    x = np.asarray(x, dtype=np.float64)
    mu, k = float(x.min()), 1
    while True:
        mask = x <= mu + k * step
        acc = accuracy(mask)
        if rho <= acc0 - acc or mask.all():
            return Stop(k, mu + k * step, mask, acc, not rho <= acc0 - acc, k)
        k += 1


def adaptive_threshold(x: np.ndarray, step: float, rho: float, acc0: float, accuracy: MaskAccuracy) -> Stop:
    """Same stop as `adaptive_threshold_reference`, evaluating only where the set changes."""
    x = np.asarray(x, dtype=np.float64)
    mu, ks = thresholds(x, step)
    for evaluations, k in enumerate(ks, start=1):
        mask = x <= mu + k * step
        acc = accuracy(mask)
        if rho <= acc0 - acc or mask.all():
            return Stop(int(k), mu + k * step, mask, acc, not rho <= acc0 - acc, evaluations)
    raise AssertionError("unreachable: the last threshold takes every input")


# ---- FLAIN ---------------------------------------------------------------------------
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


def _flain(search, x, w0, w, step, rho, evaluate: Evaluate) -> FlainResult:
    acc0 = evaluate(w)
    stop = search(x, step, rho, acc0, lambda mask: evaluate(flip_updates(w0, w, torch.from_numpy(mask))))
    w_star = flip_updates(w0, w, torch.from_numpy(stop.mask))
    return FlainResult(
        weight=rescale(w_star, torch.linalg.matrix_norm(w).item()),
        threshold=float(stop.threshold),
        steps=stop.steps,
        flipped=int(stop.mask.sum()),
        aux_acc_before=acc0,
        aux_acc_at_stop=stop.acc,
        exhausted=stop.exhausted,
        evaluations=stop.evaluations,
    )


def flain_search_reference(
    x: np.ndarray, w0: torch.Tensor, w: torch.Tensor, step: float, rho: float, evaluate: Evaluate
) -> FlainResult:
    """Algorithm 1 as written: one evaluation per step of lambda (the slow reference)."""
    return _flain(adaptive_threshold_reference, x, w0, w, step, rho, evaluate)


def flain_search(
    x: np.ndarray, w0: torch.Tensor, w: torch.Tensor, step: float, rho: float, evaluate: Evaluate
) -> FlainResult:
    """Algorithm 1, evaluating only at the lambdas where the flipped set changes.

    Same stop, same lambda, same weights as `flain_search_reference`."""
    return _flain(adaptive_threshold, x, w0, w, step, rho, evaluate)


@dataclass(frozen=True)
class AdaptiveTauDefense:
    """Settings of a post-training defense on layer tau with the adaptive threshold.
    The paper compares FLAIN and Pruning on the same layer with the same stop rule, so
    both read `flain-step`, `flain-rho` and `flain-layer`."""

    step: float = 0.001
    rho: float = 0.02
    layer: str = "auto"  # 'auto' = first Linear after the convolutions

    @classmethod
    def from_config(cls, cfg: Any) -> AdaptiveTauDefense:
        return cls(step=cfg.flain_step, rho=cfg.flain_rho, layer=cfg.flain_layer)


@dataclass(frozen=True)
class Flain(AdaptiveTauDefense):
    """Post-training defense: FLAIN (Algorithm 1)."""

    def apply(self, inp: PostTrainingInput) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Defend `model` (trained weights loaded; left untouched).

        Returns the defended state_dict and what the search found."""
        started = time.perf_counter()
        tau = TauView.of(inp.model, self.layer, inp.aux_images, inp.aux_labels)
        w0 = inp.initial_state[f"{tau.name}.weight"].to(tau.weight)
        result = flain_search(tau.activations, w0, tau.weight, self.step, self.rho, tau.evaluate)
        state, aux_acc_after = tau.state_with(result.weight)
        info = {
            "layer": tau.name,
            "threshold": result.threshold,
            "flipped": result.flipped,
            "inputs": int(tau.weight.shape[1]),
            "aux_acc_before": result.aux_acc_before,
            "aux_acc_at_stop": result.aux_acc_at_stop,
            "aux_acc_after": aux_acc_after,
            "exhausted": result.exhausted,
            "evaluations": result.evaluations,
            "search_seconds": time.perf_counter() - started,
        }
        return state, info
