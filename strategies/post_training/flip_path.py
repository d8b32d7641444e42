"""Clean accuracy along a flipping order, at the cost of one forward pass.

Flipping input i of tau (column i: W0 + dW -> W0 - dW) changes tau's pre-activations by
-2 x_i dW_i: a rank-1 update. `flip_path_accuracy` walks an order of inputs, applies the
updates in blocks and scores the rest of the head at each requested count, with W* rescaled
to the Frobenius norm of W as Algorithm 1 returns it, so every score is that of the model
that would be returned. The whole walk over all z inputs costs about one N x z x out
matrix product, instead of one full head evaluation per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn


def accuracy(logits: torch.Tensor, labels: torch.Tensor, balanced: bool = False, soft: bool = False) -> float:
    """Share of correct predictions, or (balanced) the mean of the per-class shares; `soft`:
    the mean probability of the true class instead of the 0/1 hit (same scale, far less noise
    on a few hundred images: every image moves a little instead of a few flipping)."""
    if soft:
        correct = torch.softmax(logits.double(), 1).gather(1, labels.view(-1, 1)).squeeze(1)
    else:
        correct = (logits.argmax(1) == labels).double()
    if not balanced:
        return correct.mean().item()
    classes = labels.unique()
    return torch.stack([correct[labels == c].mean() for c in classes]).mean().item()


def flip_path_logits(features: torch.Tensor, w0: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                     rest: nn.Module, order: np.ndarray, counts: np.ndarray) -> Iterator[torch.Tensor]:
    """Logits of the rescaled FLAIN model with the first n inputs of `order` flipped, for each
    n in `counts` (ascending). `rest` is the head after tau's Linear (ReLU, ...)."""
    with torch.no_grad():
        yield from _walk(features, w0, w, bias, rest, order, counts)


def _walk(features: torch.Tensor, w0: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
          rest: nn.Module, order: np.ndarray, counts: np.ndarray) -> Iterator[torch.Tensor]:
    x = features.double()
    w64, dw = w.double(), (w - w0).double()
    pre = x @ w64.T  # N x out, tau's pre-activations without bias
    column_sq = (w64**2).sum(0)
    flipped_sq = ((w64 - 2 * dw) ** 2).sum(0)
    norm = torch.linalg.matrix_norm(w64)
    sq = norm**2
    order_t = torch.as_tensor(np.asarray(order, dtype=np.int64), device=w.device)
    done = 0
    for n in np.asarray(counts, dtype=np.int64):
        if n < done:
            raise ValueError("counts must be ascending")
        if n > done:
            idx = order_t[done:n]
            pre = pre - 2 * x[:, idx] @ dw[:, idx].T
            sq = sq + (flipped_sq[idx] - column_sq[idx]).sum()
            done = int(n)
        scale = norm / torch.sqrt(sq) if sq > 0 else torch.ones((), dtype=torch.float64, device=w.device)
        z = scale * pre + (bias.double() if bias is not None else 0.0)
        yield rest(z.to(features.dtype))


def flip_path_accuracy(features: torch.Tensor, labels: torch.Tensor, w0: torch.Tensor, w: torch.Tensor,
                       bias: torch.Tensor | None, rest: nn.Module, order: np.ndarray, counts: np.ndarray,
                       balanced: bool = False) -> np.ndarray:
    """Accuracy (or balanced accuracy) for each count of `flip_path_logits`."""
    return np.array([accuracy(z, labels, balanced)
                     for z in flip_path_logits(features, w0, w, bias, rest, order, counts)])


class IncrementalFlips:
    """Aux accuracy of the flipped model W* of Eq. (7), unrescaled, for flip masks that
    grow (Algorithm 1's search): each newly flipped input is a rank-1 update of tau's
    pre-activations, kept in float64, so a whole search costs about one N x z x out product
    instead of one per threshold. A mask that is not a superset of the last one starts over.

    Exactness: the plain evaluation (`exact`: W* written into tau, the head run in the
    model's precision) can round a logit differently. A class can change only where an
    image's two top logits are closer than `margin`; such a mask is scored by `exact` instead
    (counted in `fallbacks`), so every accuracy equals the plain evaluation's."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, w0: torch.Tensor, w: torch.Tensor,
                 bias: torch.Tensor | None, rest: nn.Module, exact: Callable[[np.ndarray], float],
                 margin: float = 1e-4) -> None:
        self.x, self.labels, self.rest, self.exact, self.margin = features.double(), labels, rest, exact, margin
        self.dtype = features.dtype
        self.w, self.dw = w.double(), (w - w0).double()
        self.bias = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                        device=w.device)
        self.mask = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
        self.pre = self.x @ self.w.T
        self.fallbacks = 0

    @torch.no_grad()
    def __call__(self, mask: np.ndarray) -> float:
        m = torch.as_tensor(np.asarray(mask, dtype=bool), device=self.mask.device)
        if (self.mask & ~m).any():  # not a superset: start from W again
            self.mask = torch.zeros_like(self.mask)
            self.pre = self.x @ self.w.T
        idx = torch.nonzero(m & ~self.mask).flatten()
        if len(idx):
            self.pre = self.pre - 2 * self.x[:, idx] @ self.dw[:, idx].T
            self.mask = m
        logits = self.rest((self.pre + self.bias).to(self.dtype))
        top = logits.topk(2, dim=1).values if logits.shape[1] > 1 else None
        if top is not None and float((top[:, 0] - top[:, 1]).min()) < self.margin:
            self.fallbacks += 1
            return self.exact(mask)
        return (logits.argmax(1) == self.labels).float().mean().item()
