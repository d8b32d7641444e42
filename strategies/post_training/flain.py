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
reaches rho, the search stops there (`exhausted`) instead of looping forever. The
threshold search itself is `threshold.adaptive_threshold`, shared with the baselines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from strategies.post_training.base import PostTrainingInput, TauSettings
from strategies.post_training.flip_path import IncrementalFlips
from strategies.post_training.tau import Evaluate, TauView
from strategies.post_training.threshold import MaskAccuracy, Stop, adaptive_threshold, adaptive_threshold_reference


# ---- pure pieces -------------------------------------------------------------------
def flip_updates(w0: torch.Tensor, w: torch.Tensor, flip: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Eq. (7): column i is w0 - dw where flip[i], w0 + dw elsewhere.

    The signs are built on the weight's device (CPU or GPU), whatever the mask's."""
    dw = w - w0
    flip = torch.as_tensor(flip, device=dw.device)
    sign = torch.where(flip, -1.0, 1.0).to(dw.dtype)
    return w0 + dw * sign.unsqueeze(0)


def frobenius(w: torch.Tensor) -> float:
    """||w||_F summed in float64: in float32 the sum over a 256 x 9216 layer was 3.4e-5 off."""
    return torch.linalg.matrix_norm(w.double()).item()


def rescale(w_star: torch.Tensor, norm: float) -> torch.Tensor:
    """Algorithm 1, lines 18-19: scale W* to Frobenius norm `norm` (from `frobenius`)."""
    n1 = frobenius(w_star)
    return w_star * (norm / n1) if n1 > 0 else w_star


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


Search = Callable[..., Stop]


def _flain(search: Search, x: np.ndarray, w0: torch.Tensor, w: torch.Tensor, step: float, rho: float,
           evaluate: Evaluate, mask_accuracy: MaskAccuracy | None = None, start: float | None = None) -> FlainResult:
    acc0 = evaluate(w)
    stop = search(x, step, rho, acc0, mask_accuracy or (lambda mask: evaluate(flip_updates(w0, w, mask))), start)
    w_star = flip_updates(w0, w, stop.mask)
    return FlainResult(
        weight=rescale(w_star, frobenius(w)),
        threshold=float(stop.threshold),
        steps=stop.steps,
        flipped=int(stop.mask.sum()),
        aux_acc_before=acc0,
        aux_acc_at_stop=stop.acc,
        exhausted=stop.exhausted,
        evaluations=stop.evaluations,
    )


def flain_search_reference(
    x: np.ndarray, w0: torch.Tensor, w: torch.Tensor, step: float, rho: float, evaluate: Evaluate,
    start: float | None = None,
) -> FlainResult:
    """Algorithm 1 as written: one evaluation per step of lambda (the slow reference)."""
    return _flain(adaptive_threshold_reference, x, w0, w, step, rho, evaluate, start=start)


def flain_search(
    x: np.ndarray, w0: torch.Tensor, w: torch.Tensor, step: float, rho: float, evaluate: Evaluate,
    mask_accuracy: MaskAccuracy | None = None, start: float | None = None,
) -> FlainResult:
    """Algorithm 1, evaluating only at the lambdas where the flipped set changes.

    Same stop, same lambda, same weights as `flain_search_reference`. `mask_accuracy`, if
    given, scores a flip mask without building W* (`flip_path.IncrementalFlips`); it must
    return what evaluate(flip_updates(w0, w, mask)) returns."""
    return _flain(adaptive_threshold, x, w0, w, step, rho, evaluate, mask_accuracy, start)


@dataclass(frozen=True)
class Flain(TauSettings):
    """Post-training defense: FLAIN (Algorithm 1)."""

    display_name: ClassVar[str] = "FLAIN"
    needs_clients: ClassVar[bool] = False

    @staticmethod
    def note(result: dict[str, Any]) -> str:
        note = f"lambda={result['threshold']:.4f} flipped={result['flipped']}/{result.get('inputs', '?')}"
        return note + (" (all flipped)" if result.get("exhausted") else "")

    def apply(self, inp: PostTrainingInput) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Defend `model` (trained weights loaded; left untouched).

        Returns the defended state_dict and what the search found."""
        started = time.perf_counter()
        tau = TauView.of(inp.model, self.layer, inp.aux_images, inp.aux_labels)
        w0 = inp.initial_state[f"{tau.name}.weight"].to(tau.weight)
        plain = lambda mask: tau.evaluate(flip_updates(w0, tau.weight, mask))  # noqa: E731
        fast = None if tau.rest is None else IncrementalFlips(  # no split: the whole model scores each step
            tau.features, tau.labels, w0, tau.weight, tau.bias, tau.rest, plain)
        score = plain if fast is None else fast
        curve: tuple[list[int], list[float]] = ([], [])  # the search's path: (flipped, aux accuracy)

        def scored(mask: np.ndarray) -> float:
            acc = score(mask)
            curve[0].append(int(np.count_nonzero(mask)))
            curve[1].append(acc)
            return acc

        result = flain_search(tau.activations, w0, tau.weight, self.step, self.rho, tau.evaluate, scored, self.start)
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
            "exact_fallbacks": fast.fallbacks if fast is not None else None,  # near-ties scored the plain way
            "split": tau.rest is not None,  # False: every step evaluated the whole model
            "search_curve": {"flipped": curve[0], "aux_acc": curve[1]},
            "search_seconds": time.perf_counter() - started,
        }
        return state, info
