"""Norm clipping and weak differential privacy.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019: clip every
client update to L2 norm C (a scaled, model-replacing update loses its scale), average them
(weighted by examples, as FedAvg); weak DP also adds Gaussian noise of std sigma to every
parameter of the aggregate, which blurs what a few attackers wrote. Defaults: C = 3,
sigma = 0.025.

Flower 1.42's `DifferentialPrivacyServerSideFixedClipping` does the same clip and noise
(std = noise_multiplier x C / n, so noise_multiplier = sigma x n / C gives sigma; we compute the
std with Flower's own `compute_stdv`). Its wrapper does not fit this project as it is, measured:
- a reply identical to the global model (a lazy or free-riding client) raises
  ZeroDivisionError in its clip (`clip_inputs_inplace` divides by the update's norm) and ends
  the whole run;
- it clips and noises every array, BatchNorm running statistics and integer counters included;
- its noise comes from the global numpy RNG (`np.random.normal`), not the run's seeded streams;
- it drops the whole round if any reply carries an error, where our rules go on without it.
So the rule runs on our whole-model base: the reply guard first, buffers averaged, noise from
`seeds.rng(seed, "weak-dp-noise", round)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import compute_stdv

from experiment import seeds
from strategies.aggregation.delta import Combined, WholeModelRule
from strategies.aggregation.flame import clip_to


def clipped_mean(updates: np.ndarray, weights: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """(example-weighted mean of the updates clipped to L2 norm `bound`, the clip factors)."""
    clipped, factors = clip_to(updates, bound)
    return np.tensordot(weights / weights.sum(), clipped, axes=1), factors


class NormClipping(WholeModelRule):
    """Clip each update to `clip`, average; `sigma` > 0 adds Gaussian noise (weak DP)."""

    def __init__(self, *args: Any, clip: float, sigma: float = 0.0, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clip, self.sigma, self.seed = clip, sigma, seed

    def judge(self, server_round: int, updates: np.ndarray, weights: np.ndarray,
              partitions: list[int]) -> Combined:
        step, factors = clipped_mean(updates, weights, self.clip)
        n = len(updates)
        std = compute_stdv(self.sigma * n / self.clip, self.clip, n)  # Flower's parametrisation: = sigma
        if std > 0:
            step = step + seeds.rng(self.seed, "weak-dp-noise", server_round).normal(0.0, std, size=step.shape)
        return Combined({"": step}, weights, {
            "update_norms": {str(p): float(v) for p, v in zip(partitions, np.linalg.norm(updates, axis=1))},
            "clip_factors": {str(p): float(f) for p, f in zip(partitions, factors)},
            "noise_std": std,
        })

    def settings(self) -> dict[str, str]:
        return {"clip norm C": str(self.clip), "noise std sigma": str(self.sigma) if self.sigma else "none"}
