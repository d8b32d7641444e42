"""Mid-training aggregation rules (registry: `aggregation=` name -> builder)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.post_training import PostTrainingHook, with_post_training


def fedavg(cfg: Any, post_training: PostTrainingHook | None) -> Strategy:
    """FedAvg (McMahan et al. 2017), weighted by examples; every client every round
    (client sampling rate 1, server learning rate 1), no client-side evaluation."""
    return with_post_training(FedAvg)(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.num_clients,
        min_available_nodes=cfg.num_clients,
        post_training=post_training,
    )


AGGREGATIONS: dict[str, Callable[[Any, PostTrainingHook | None], Strategy]] = {
    "fedavg": fedavg,
}
