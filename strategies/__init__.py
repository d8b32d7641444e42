"""Defenses. Two registries chosen by one flag each, composed by the ServerApp:
`aggregation=` (mid-training rule) x `post-defenses=` (post-training, side by side)."""

from collections.abc import Callable
from typing import Any

from strategies.aggregation import AGGREGATIONS
from strategies.flain import Flain

# name -> builder(cfg) of an object with .apply(model, initial_state, aux_x, aux_y)
POST_DEFENSES: dict[str, Callable[[Any], Any]] = {
    "flain": Flain.from_config,
}

__all__ = ["AGGREGATIONS", "POST_DEFENSES"]
