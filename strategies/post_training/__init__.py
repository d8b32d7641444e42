"""Post-training defenses, applied by the ServerApp to the final model after the last
round (registry: `post-defenses=` names -> builder(cfg)); each in its own module."""

from collections.abc import Callable

from experiment.config import ExperimentConfig, choice
from strategies.post_training.base import PostTrainingDefense, PostTrainingInput
from strategies.post_training.fedpruning import FedPruning
from strategies.post_training.flain import Flain
from strategies.post_training.flain_cv import ACCURACIES, SCORES, SELECTS, FlainCV
from strategies.post_training.pruning import Pruning

POST_DEFENSES: dict[str, Callable[[ExperimentConfig], PostTrainingDefense]] = {
    "flain": Flain.from_config,
    "flain-cv": FlainCV.from_config,
    "pruning": Pruning.from_config,
    "fedpruning": FedPruning.from_config,
}


def check(cfg: ExperimentConfig) -> None:
    """Every name in `post-defenses` is a known defense (raises ConfigError)."""
    for name in cfg.post_defense_names:
        choice("post-defenses", name, POST_DEFENSES)
    choice("flain-cv-scores", cfg.flain_cv_scores, SCORES)
    choice("flain-cv-select", cfg.flain_cv_select, SELECTS)
    choice("flain-cv-accuracy", cfg.flain_cv_accuracy, ACCURACIES)


__all__ = ["POST_DEFENSES", "PostTrainingDefense", "PostTrainingInput", "check"]
