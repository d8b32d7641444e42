"""Post-training defenses, applied by the ServerApp to the final model after the last
round (registry: `post-defenses=` names -> builder(cfg)); each in its own module."""

from experiment.config import ExperimentConfig, choice
from strategies.post_training.base import PostTrainingDefense, PostTrainingInput
from strategies.post_training.fedpruning import FedPruning
from strategies.post_training.flain import Flain
from strategies.post_training.flain_cv import ACCURACIES, SCORES, SELECTS, FlainCV
from strategies.post_training.flain_subspace import AUGMENTS, FlainSubspace
from strategies.post_training.pruning import Pruning

# name -> the defense's class: `.from_config(cfg)` builds it; it also says its display name,
# whether it needs the clients, and how its result reads in one line (base.PostTrainingDefense)
POST_DEFENSES: dict[str, type[PostTrainingDefense]] = {
    "flain": Flain,
    "flain-cv": FlainCV,
    "flain-subspace": FlainSubspace,
    "pruning": Pruning,
    "fedpruning": FedPruning,
}


def check(cfg: ExperimentConfig) -> None:
    """Every name in `post-defenses` is a known defense (raises ConfigError)."""
    for name in cfg.post_defense_names:
        choice("post-defenses", name, POST_DEFENSES)
    choice("flain-cv-scores", cfg.flain_cv_scores, SCORES)
    choice("flain-cv-select", cfg.flain_cv_select, SELECTS)
    choice("flain-cv-accuracy", cfg.flain_cv_accuracy, ACCURACIES)
    choice("flain-subspace-augment", cfg.flain_subspace_augment, AUGMENTS)


__all__ = ["POST_DEFENSES", "PostTrainingDefense", "PostTrainingInput", "check"]
