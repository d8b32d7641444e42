"""Defenses, in two registries chosen by one flag each and composed by the ServerApp:
`aggregation=` (mid-training rule, `strategies.aggregation`) x `post-defenses=`
(post-training, side by side on the final model, `strategies.post_training`), joined by
`FlainDefense` (`strategies.flain_defense`: the post-training defenses added to any Flower
strategy)."""

from strategies.aggregation import AGGREGATIONS
from strategies.flain_defense import FlainDefense
from strategies.post_training import POST_DEFENSES

__all__ = ["AGGREGATIONS", "POST_DEFENSES", "FlainDefense"]
