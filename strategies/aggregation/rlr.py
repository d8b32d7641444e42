"""RLR: robust learning rate.

Ozdayi, Kantarcioglu, Gel, "Defending against Backdoors in Federated Learning with Robust
Learning Rate", AAAI 2021. Per coordinate, s = |sum_i sign(dW_i)| over the clients of the
round; the server learning rate is +eta where s >= theta and -eta elsewhere, and
new = old + lr * (weighted mean of the updates).

theta follows the round: by default a strict majority of the replies that arrived, so a
round with fewer replies than clients (a dead node, `min-clients`) is judged by its own
replies. A fixed theta larger than a round's replies could be reached by no coordinate
and would walk every weight against the mean update: such a round is refused instead
(the global model stays, the summary records why).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.aggregation.delta import DeltaStrategy


def robust_learning_rate(updates: np.ndarray, theta: float, eta: float) -> np.ndarray:
    """updates: clients x coordinates... -> per-coordinate server learning rate (+-eta)."""
    agreement = np.abs(np.sign(updates).sum(axis=0))
    return np.where(agreement >= theta, eta, -eta).astype(updates.dtype)


def rlr_step(updates: np.ndarray, weights: np.ndarray, theta: float, eta: float) -> np.ndarray:
    """The global step: robust learning rate times the weighted mean update."""
    mean = np.tensordot(weights / weights.sum(), updates, axes=1)
    return robust_learning_rate(updates, theta, eta) * mean


def default_theta(replies: int) -> int:
    """RLR's threshold for a round with `replies` client updates: a strict majority,
    floor(m/2) + 1.

    RLR only blocks a backdoor when theta exceeds the number of attackers in the round
    (their signs alone must not reach it); the server does not know that number, and a
    majority covers any attacker minority. Measured: theta = 4 of 10 (0.4 m) let the
    default experiment's 4 attackers through (ASR 0.85 after 8 rounds)."""
    return replies // 2 + 1


class RobustLR(DeltaStrategy):
    """FedAvg with the robust learning rate on the parameters' updates."""

    def __init__(self, *args: Any, theta: int | None, eta: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.theta, self.eta = theta, eta  # theta None: a majority of each round's replies

    def refusal(self, replies: int) -> str | None:
        if self.theta is not None and self.theta > replies:
            return (f"rlr-theta={self.theta} but only {replies} replies: no coordinate could reach it "
                    "and every weight would move against the mean update")
        return None

    def step(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        theta = self.theta if self.theta is not None else default_theta(len(updates))
        return rlr_step(updates, weights, theta, self.eta)

    def settings(self) -> dict[str, str]:
        theta = str(self.theta) if self.theta is not None else "auto (a strict majority of each round's replies)"
        return {"theta": theta, "eta": str(self.eta)}
