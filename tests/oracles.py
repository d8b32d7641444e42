"""Independent restatements of the paper's algorithms, for tests to compare the project against.

Written from the paper's text (Ding et al., Algorithm 1), column by column in plain Python,
without importing the project's search, threshold or flip code: a wrong stop, sign or norm in
the project's code makes the two disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Algorithm1:
    weight: torch.Tensor  # W* after the rescale of lines 18-19
    threshold: float
    flipped: int
    acc0: float
    acc1: float  # accuracy of W* before the rescale, where the loop stopped
    exhausted: bool  # every column was flipped before the drop reached rho


def _lambda(x: np.ndarray, step: float, start: float | None, k: int) -> float:
    # lambda_1 = min(x) + step (the paper), or a given first threshold (the authors' script);
    # lambda_k adds k - 1 steps, computed as one product (no accumulated rounding)
    first = float(min(x)) if start is None else start - step
    return first + k * step


def _column_rule(w0: torch.Tensor, w: torch.Tensor, x: np.ndarray, lam: float,
                 rule: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]) -> tuple[torch.Tensor, int]:
    columns, hit = [], 0
    for i in range(w.shape[1]):  # lines 7-13
        low = bool(x[i] <= lam)
        hit += low
        columns.append(rule(w0[:, i], w[:, i], low))
    return torch.stack(columns, dim=1), hit


def algorithm1(x: np.ndarray, w0: torch.Tensor, w: torch.Tensor, step: float, rho: float,
               evaluate: Callable[[torch.Tensor], float], start: float | None = None) -> Algorithm1:
    """Algorithm 1 of the paper; `evaluate(W)` is the aux accuracy with tau's weight W. The loop
    also ends when every column is flipped (the paper's loop would never end there)."""
    n0 = torch.sqrt((w.double() ** 2).sum()).item()  # line 1
    acc0 = evaluate(w)  # line 5
    k = 1
    while True:
        lam = _lambda(x, step, start, k)

        def flip(c0: torch.Tensor, c: torch.Tensor, low: bool) -> torch.Tensor:
            return c0 - (c - c0) if low else c0 + (c - c0)  # lines 9 and 11

        w_star, flipped = _column_rule(w0, w, x, lam, flip)
        acc1 = evaluate(w_star)  # line 16
        if rho <= acc0 - acc1 or flipped == w.shape[1]:
            n1 = torch.sqrt((w_star.double() ** 2).sum()).item()  # lines 18-19
            return Algorithm1((w_star.double() * (n0 / n1)).to(w.dtype), lam, flipped, acc0, acc1,
                              not rho <= acc0 - acc1)
        k += 1


def pruning(x: np.ndarray, w: torch.Tensor, step: float, rho: float,
            evaluate: Callable[[torch.Tensor], float], start: float | None = None) -> tuple[torch.Tensor, int, float]:
    """The paper's Pruning baseline: zero the columns with x <= lambda, same schedule and stop.
    Returns (W, pruned columns, lambda)."""
    acc0, k = evaluate(w), 1
    while True:
        lam = _lambda(x, step, start, k)
        w_pruned, pruned = _column_rule(w, w, x, lam, lambda c0, c, low: torch.zeros_like(c) if low else c)
        if rho <= acc0 - evaluate(w_pruned) or pruned == w.shape[1]:
            return w_pruned, pruned, lam
        k += 1


def foolsgold(histories: np.ndarray) -> list[float]:
    """FoolsGold's weights (Fung et al., RAID 2020, Algorithm 1 with kappa 1), one client pair at
    a time: cosine similarity of the histories, pardoning, 1 - max, rescaled, the logit, clipped."""
    n = len(histories)

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        return float(sum(x * y for x, y in zip(a, b)) / (np.sqrt(sum(x * x for x in a)) * np.sqrt(sum(y * y for y in b))))

    cs = [[0.0 if i == j else cosine(histories[i], histories[j]) for j in range(n)] for i in range(n)]
    v = [max(row) for row in cs]
    for i in range(n):
        for j in range(n):
            if i != j and v[i] < v[j]:
                cs[i][j] = cs[i][j] * v[i] / v[j]
    wv = [min(1.0, max(0.0, 1.0 - max(row))) for row in cs]
    top = max(wv)
    if top == 0:
        return [0.0] * n
    out = []
    for w in wv:
        w = w / top
        if w == 1.0:
            w = 0.99
        if w == 0.0:
            out.append(0.0)  # log(0) = -inf, clipped to 0
            continue
        out.append(min(1.0, max(0.0, float(np.log(w / (1 - w))) + 0.5)))
    return out
