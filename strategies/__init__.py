"""Defenses. Two registries chosen by one flag each, composed by the ServerApp:
`aggregation=` (mid-training rule) x `post-defenses=` (post-training, side by side)."""

from collections.abc import Callable
from typing import Any

from strategies.aggregation import AGGREGATIONS
from strategies.fedpruning import FedPruning
from strategies.flain import Flain
from strategies.post_training import PostTrainingDefense
from strategies.pruning import Pruning

# name -> builder(cfg) of a defense with .apply(PostTrainingInput) -> (state_dict, info)
POST_DEFENSES: dict[str, Callable[[Any], PostTrainingDefense]] = {
    "flain": Flain.from_config,
    "pruning": Pruning.from_config,
    "fedpruning": FedPruning.from_config,
}

__all__ = ["AGGREGATIONS", "POST_DEFENSES"]
