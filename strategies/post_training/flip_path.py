"""Clean accuracy along a flipping order, at the cost of one forward pass.

Flipping input i of tau (column i: W0 + dW -> W0 - dW) changes tau's pre-activations by
-2 x_i dW_i: a rank-1 update (`RankOneFlips`, kept in float64). Two users:
`flip_path_logits` walks an order of inputs in blocks and scores the head at each requested
count, with W* rescaled to the Frobenius norm of W as Algorithm 1 returns it (FLAIN-CV);
`IncrementalFlips` scores the growing, unrescaled masks of Algorithm 1's search (FLAIN).
Either way a whole walk over all z inputs costs about one N x z x out matrix product,
instead of one full head evaluation per step.
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


class RankOneFlips:
    """tau's pre-activations (N x out, no bias, float64) on cached inputs `features` while
    columns of W are flipped one block at a time: flipping columns `idx` subtracts
    2 x[:, idx] dW[:, idx]^T."""

    def __init__(self, features: torch.Tensor, w0: torch.Tensor, w: torch.Tensor) -> None:
        self.x = features.double()
        self.w, self.dw = w.double(), (w - w0).double()
        self.reset()

    def reset(self) -> None:
        """Nothing flipped: W itself."""
        self.pre = self.x @ self.w.T

    def flip(self, idx: torch.Tensor) -> None:
        """Flip the (not yet flipped) columns `idx`."""
        if len(idx):
            self.pre = self.pre - 2 * self.x[:, idx] @ self.dw[:, idx].T


@torch.no_grad()  # as a decorator: grad mode is switched around each step, never left off between
def flip_path_logits(features: torch.Tensor, w0: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                     rest: nn.Module, order: np.ndarray, counts: np.ndarray) -> Iterator[torch.Tensor]:
    """Logits of the rescaled FLAIN model with the first n inputs of `order` flipped, for each
    n in `counts` (ascending). `rest` is the head after tau's Linear (ReLU, ...).

    (A `with torch.no_grad()` around the yields would leave grad mode off in the caller between
    steps, and several walks finishing in another order than they started would leave it off
    for good: FLAIN-CV walks one per fold in step.)"""
    yield from _walk(features, w0, w, bias, rest, order, counts)


def _walk(features: torch.Tensor, w0: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
          rest: nn.Module, order: np.ndarray, counts: np.ndarray) -> Iterator[torch.Tensor]:
    flips = RankOneFlips(features, w0, w)
    column_sq = (flips.w**2).sum(0)
    flipped_sq = ((flips.w - 2 * flips.dw) ** 2).sum(0)
    norm = torch.linalg.matrix_norm(flips.w)
    sq = norm**2  # ||W*||_F^2, kept up to date column by column for the rescaling
    order_t = torch.as_tensor(np.asarray(order, dtype=np.int64), device=w.device)
    done = 0
    for n in np.asarray(counts, dtype=np.int64):
        if n < done:
            raise ValueError("counts must be ascending")
        if n > done:
            idx = order_t[done:n]
            flips.flip(idx)
            sq = sq + (flipped_sq[idx] - column_sq[idx]).sum()
            done = int(n)
        scale = norm / torch.sqrt(sq) if sq > 0 else torch.ones((), dtype=torch.float64, device=w.device)
        z = scale * flips.pre + (bias.double() if bias is not None else 0.0)
        yield rest(z.to(features.dtype))


class IncrementalFlips:
    """Aux accuracy of the flipped model W* of Eq. (7), unrescaled, for flip masks that
    grow (Algorithm 1's search): only the newly flipped inputs are applied (`RankOneFlips`),
    so a whole search costs about one N x z x out product instead of one head evaluation
    per threshold. A mask that is not a superset of the last one starts over.

    Exactness: the plain evaluation (`exact`: W* written into tau, the head run in the
    model's precision) can round a logit differently. A class can change only where an
    image's two top logits are closer than `margin`; such a mask is scored by `exact` instead
    (counted in `fallbacks`), so every accuracy equals the plain evaluation's."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, w0: torch.Tensor, w: torch.Tensor,
                 bias: torch.Tensor | None, rest: nn.Module, exact: Callable[[np.ndarray], float],
                 margin: float = 1e-4) -> None:
        self.flips = RankOneFlips(features, w0, w)
        self.labels, self.rest, self.exact, self.margin = labels, rest, exact, margin
        self.dtype = features.dtype
        self.bias = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                        device=w.device)
        self.mask = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
        self.fallbacks = 0

    @torch.no_grad()
    def __call__(self, mask: np.ndarray) -> float:
        m = torch.as_tensor(np.asarray(mask, dtype=bool), device=self.mask.device)
        if (self.mask & ~m).any():  # not a superset: start from W again
            self.mask = torch.zeros_like(self.mask)
            self.flips.reset()
        self.flips.flip(torch.nonzero(m & ~self.mask).flatten())
        self.mask = m
        logits = self.rest((self.flips.pre + self.bias).to(self.dtype))
        top = logits.topk(2, dim=1).values if logits.shape[1] > 1 else None
        if top is not None and float((top[:, 0] - top[:, 1]).min()) < self.margin:
            self.fallbacks += 1
            return self.exact(mask)
        return (logits.argmax(1) == self.labels).float().mean().item()
