"""The post-training stage, shared by the ServerApp and `flain defend` (not a Flower app: importing
it builds nothing): the evaluator on the images outside the aux set, the defenses' input, and
every configured defense applied side by side to the same trained model."""

from __future__ import annotations

from typing import Any

import torch

from attacks import trigger_scheme
from experiment.config import ExperimentConfig
from experiment.data import to_float
from models import build_model
from server.evaluation import Evaluator
from strategies import POST_DEFENSES
from strategies.flain_defense import DefenseSink, apply_defenses
from strategies.post_training import PostTrainingDefense, PostTrainingInput


def make_evaluator(cfg: ExperimentConfig, images: torch.Tensor, labels: torch.Tensor,
                   device: torch.device | str) -> Evaluator:
    """ACC and ASR on these images (the test split minus the aux set); ASR always with the
    whole pattern (DBA: all parts together)."""
    return Evaluator(build_model(cfg.dataset, cfg.network).to(device), images, labels, trigger_scheme(cfg).full,
                     cfg.source_label, cfg.target_label)


def post_training_input(cfg: ExperimentConfig, trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                        aux_images: torch.Tensor, aux_labels: torch.Tensor, device: torch.device | str,
                        **federation: Any) -> PostTrainingInput:
    """The defenses' input: the trained model, W0 and the aux set (`federation`: grid, strategy
    and last_round, for the defenses that ask the clients; absent for a saved model)."""
    model = build_model(cfg.dataset, cfg.network).to(device)
    model.load_state_dict(trained)
    return PostTrainingInput(model=model, initial_state=initial, aux_images=to_float(aux_images),
                             aux_labels=aux_labels, **federation)


def post_defenses(cfg: ExperimentConfig) -> dict[str, PostTrainingDefense]:
    """The run's `post-defenses`, each with the run's settings."""
    return {name: POST_DEFENSES[name].from_config(cfg) for name in cfg.post_defense_names}


def apply_post_defenses(cfg: ExperimentConfig, inp: PostTrainingInput, evaluator: Evaluator,
                        sink: DefenseSink) -> list[str]:
    """Every configured defense on a saved model, as the ServerApp's FlainDefense applies them
    after training; the names of those that failed."""
    _, reports = apply_defenses(inp, post_defenses(cfg), evaluator, sink)
    return [name for name, report in reports.items() if "error" in report]
