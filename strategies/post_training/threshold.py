"""The adaptive threshold of Algorithm 1 (Ding et al., FLAIN), shared by the defenses.

Raise lambda = base + k * step (k = 1, 2, ...) over per-input scores x and act on the
inputs with x <= lambda, until the aux-accuracy drop acc0 - acc reaches rho, or every
input is in (`exhausted`). base is min(x), as the paper writes it, or `start - step` when a
first threshold `start` is given (the authors' code starts at 0.0005 whatever min(x) is).
`lambda_k = base + k*step` is computed directly, not by repeated addition, so the fast
search and the plain loop compare against bit-identical thresholds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# aux accuracy of the model with the inputs in the boolean mask acted on
MaskAccuracy = Callable[[np.ndarray], float]


@dataclass
class Stop:
    steps: int  # k: lambda = min(x) + k * step
    threshold: float
    mask: np.ndarray  # x <= lambda: the inputs acted on
    acc: float  # aux accuracy at the stop
    exhausted: bool  # every input acted on before the drop reached rho
    evaluations: int


def base(x: np.ndarray, step: float, start: float | None = None) -> float:
    """The threshold's base: lambda_k = base + k * step, so lambda_1 is min(x) + step or `start`."""
    return float(x.min()) if start is None else float(start) - step


def thresholds(x: np.ndarray, step: float, start: float | None = None) -> tuple[float, np.ndarray]:
    """(mu, ks): the base and the steps k >= 1 at which the set {x <= mu + k*step}
    changes, ascending. Between two of them the set, hence the model, is the same."""
    mu = base(x, step, start)
    values = np.unique(x)
    ks = np.maximum(1, np.ceil((values - mu) / step)).astype(np.int64)
    # ceil() on floats can be one off either way: settle each k exactly.
    while np.any(low := mu + ks * step < values):
        ks[low] += 1
    while np.any(high := (ks > 1) & (mu + (ks - 1) * step >= values)):
        ks[high] -= 1
    return mu, np.unique(ks)


def adaptive_threshold_reference(x: np.ndarray, step: float, rho: float, acc0: float, accuracy: MaskAccuracy,
                                 start: float | None = None) -> Stop:
    """Raise lambda by `step` until acc0 - accuracy(x <= lambda) >= rho (or all are in)."""
    x = np.asarray(x, dtype=np.float64)
    mu, k = base(x, step, start), 1
    while True:
        mask = x <= mu + k * step
        acc = accuracy(mask)
        if rho <= acc0 - acc or mask.all():
            return Stop(k, mu + k * step, mask, acc, not rho <= acc0 - acc, k)
        k += 1


def adaptive_threshold(x: np.ndarray, step: float, rho: float, acc0: float, accuracy: MaskAccuracy,
                       start: float | None = None) -> Stop:
    """Same stop as `adaptive_threshold_reference`, evaluating only where the set changes."""
    x = np.asarray(x, dtype=np.float64)
    mu, ks = thresholds(x, step, start)
    for evaluations, k in enumerate(ks, start=1):
        mask = x <= mu + k * step
        acc = accuracy(mask)
        if rho <= acc0 - acc or mask.all():
            return Stop(int(k), mu + k * step, mask, acc, not rho <= acc0 - acc, evaluations)
    raise AssertionError("unreachable: the last threshold takes every input")
