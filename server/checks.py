"""Every check of a configuration, run from one place before anything starts.

The configuration checks what it can alone (`ExperimentConfig.validate`); each registry
checks what only it knows: the data set and labels (`experiment.data`), the precision
(`experiment.hardware`), the trigger (`attacks`), the layer tau (`models`), the
aggregation rule and its counts and the post-training defenses (`strategies`). The
`flain` launcher runs `check_experiment` before it starts a process; the ServerApp runs
it again first thing (a run can also be started by `flwr run`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attacks
import models
from experiment import data, hardware
from experiment.config import ExperimentConfig
from server import tracking
from strategies import aggregation, post_training

CHECKS: tuple[Callable[[ExperimentConfig], None], ...] = (
    data.check,  # first: the others look the data set up
    lambda cfg: hardware.check_precision(cfg.precision),
    attacks.check,
    models.check,
    aggregation.check,
    post_training.check,
    tracking.check,
)


def check_experiment(cfg: ExperimentConfig) -> None:
    """Raise ConfigError (key, value, what is allowed) if any setting cannot work."""
    cfg.validate()
    for check in CHECKS:
        check(cfg)


def resolved_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the automatic settings (0 / -1 / auto) become in this run."""
    return {
        "num-rounds": data.num_rounds(cfg),
        "aux-size": data.aux_size(cfg),
        "clients-per-round": cfg.round_clients,
        "attackers-per-round": cfg.round_attackers,
        "min-clients": cfg.min_replies,
        "num-malicious": cfg.num_malicious,
        "scaling-factor": attacks.scaling_factor(cfg),
        "rlr-theta": cfg.rlr_theta or "a strict majority of each round's replies",
        "krum-f": aggregation.krum_f(cfg),
        "flain-layer": models.resolve_tau(models.build_model(cfg.dataset, cfg.network), cfg.flain_layer),
    }
