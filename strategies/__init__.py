"""Defenses, in two registries chosen by one flag each and composed by the ServerApp:
`aggregation=` (mid-training rule, `strategies.aggregation`) x `post-defenses=`
(post-training, side by side on the final model, `strategies.post_training`)."""

from strategies.aggregation import AGGREGATIONS
from strategies.post_training import POST_DEFENSES

__all__ = ["AGGREGATIONS", "POST_DEFENSES"]
