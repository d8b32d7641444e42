"""FoolsGold: down-weight clients whose update histories look alike.

Fung, Yoon, Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020.
Sybils that push one backdoor send similar updates round after round, while honest clients'
data differ. The server keeps each client's summed update history (clients are known by their
partition id, so a history survives a missed round) and each round:
1. cs = cosine similarity of the histories of the round's clients (the diagonal left out),
   v_i = max_j cs_ij;
2. pardoning: cs_ij *= v_i / v_j where v_j > v_i (an honest client that merely resembles a
   sybil is not punished for it);
3. alpha_i = 1 - max_j cs_ij clipped to [0, 1], divided by its maximum, 1 -> 0.99, then the
   logit ln(alpha / (1 - alpha)) + 0.5 clipped to [0, 1] (kappa = 1);
4. the global step is the alpha-weighted average of this round's updates.
A round whose weights are all zero keeps the model (recorded).
It is built against sybils, not against a lone attacker: honest clients on IID data send
similar updates and look like sybils to it (tests/test_strategies.py: six agreeing honest
clients get weight 0 and a single outlier all of it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.aggregation.delta import Combined, WholeModelRule
from strategies.aggregation.flame import cosine_distances


def foolsgold_weights(histories: np.ndarray) -> np.ndarray:
    """Per-client weights in [0, 1] from update histories (clients x D)."""
    n = len(histories)
    cs = 1.0 - cosine_distances(histories) - np.eye(n)
    v = cs.max(axis=1)
    for i in range(n):  # pardoning
        for j in range(n):
            if i != j and v[i] < v[j]:
                cs[i, j] *= v[i] / v[j]
    alpha = np.clip(1.0 - cs.max(axis=1), 0.0, 1.0)
    alpha[alpha < 1e-12] = 0.0  # identical histories: the cosine's rounding (1 - 2e-16), not a difference
    if alpha.max() <= 0:
        return np.zeros(n)
    alpha = alpha / alpha.max()
    alpha[alpha == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        logit = np.log(alpha / (1.0 - alpha)) + 0.5
    return np.clip(np.nan_to_num(logit, neginf=0.0, posinf=1.0), 0.0, 1.0)


class FoolsGold(WholeModelRule):
    """FoolsGold over the whole update, histories kept by partition id."""

    RESUMABLE = ("histories",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.histories: dict[int, np.ndarray] = {}

    def judge(self, server_round: int, updates: np.ndarray, weights: np.ndarray,
              partitions: list[int]) -> Combined:
        for p, u in zip(partitions, updates):
            self.histories[p] = self.histories.get(p, 0.0) + u
        alpha = foolsgold_weights(np.stack([self.histories[p] for p in partitions]))
        log = {"weights": {str(p): float(a) for p, a in zip(partitions, alpha)}}
        if alpha.sum() <= 0:
            return Combined({}, weights, log, refusal="FoolsGold gave every client weight 0: the model stays")
        return Combined({"": np.average(updates, axis=0, weights=alpha)}, weights * (alpha > 0), log)

    def settings(self) -> dict[str, str]:
        return {"history": "summed updates per partition id", "weights": "pardoned cosine similarity, logit (kappa 1)"}
