"""Clean accuracy along a flipping order, at the cost of one forward pass.

Flipping input i of tau (column i: W0 + dW -> W0 - dW) changes tau's pre-activations by
-2 x_i dW_i: a rank-1 update. `flip_path_accuracy` walks an order of inputs, applies the
updates in blocks and scores the rest of the head at each requested count, with W* rescaled
to the Frobenius norm of W as Algorithm 1 returns it, so every score is that of the model
that would be returned. The whole walk over all z inputs costs about one N x z x out
matrix product, instead of one full head evaluation per step.
"""

from __future__ import annotations

from collections.abc import Iterator

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
