"""Invariant aggregator.

Wang et al., "Invariant Aggregator for Defending against Federated Backdoor Attacks"
(summary in shared/papers). Per coordinate, the update is kept only where the clients'
signs agree enough, |mean_i sign(dW_i)| >= threshold; kept coordinates are aggregated
with a coordinate-wise (central) trimmed mean, masked ones do not move.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from strategies.aggregation.delta import DeltaStrategy


def sign_agreement_mask(updates: np.ndarray, threshold: float) -> np.ndarray:
    """True where |mean sign| over the clients reaches `threshold`."""
    return np.abs(np.sign(updates).mean(axis=0)) >= threshold


def invariant_step(updates: np.ndarray, threshold: float, beta: float) -> np.ndarray:
    """Masked, trimmed-mean global step (beta: share cut from each end, Flower's trim_mean)."""
    return np.where(sign_agreement_mask(updates, threshold), trim_mean(updates, beta), 0.0).astype(updates.dtype)


class InvariantAggregator(DeltaStrategy):
    """FedAvg whose parameter step is the sign-agreement-masked trimmed mean of the updates."""

    def __init__(self, *args: Any, threshold: float, beta: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threshold, self.beta = threshold, beta

    def step(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return invariant_step(updates, self.threshold, self.beta)

    def settings(self) -> dict[str, str]:
        return {"sign-agreement threshold": str(self.threshold), "trimmed-mean beta": str(self.beta)}
