"""The post-training stage, shared by the ServerApp and `flain defend` (not a Flower app: importing
it builds nothing): the evaluator on the images outside the aux set, the defenses' input, and
every configured defense applied side by side to the same trained model."""

from __future__ import annotations

import time
import traceback
from logging import ERROR, INFO
from typing import Any, Protocol

import torch
from flwr.common import log

from attacks import trigger_scheme
from experiment.config import ExperimentConfig
from experiment.data import to_float
from models import build_model
from server.evaluation import Evaluator
from strategies import POST_DEFENSES
from strategies.post_training import PostTrainingInput


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


class DefenseSink(Protocol):
    """Where defended models and their results go (a run directory, or `flain defend`'s)."""

    def save_model(self, name: str, state: dict[str, torch.Tensor]) -> object: ...

    def post_defense(self, name: str, result: dict[str, Any]) -> None: ...


def apply_post_defenses(cfg: ExperimentConfig, inp: PostTrainingInput, evaluator: Evaluator,
                        sink: DefenseSink) -> list[str]:
    """Every configured defense on the same trained model, side by side; the names of
    those that failed (a broken defense must not cost the others their results)."""
    failed = []
    for name in cfg.post_defense_names:
        started = time.perf_counter()
        try:
            state, info = POST_DEFENSES[name].from_config(cfg).apply(inp)
        except Exception as exc:
            log(ERROR, "[flain] post-defense %s FAILED:\n%s", name, traceback.format_exc())
            sink.post_defense(name, {"error": f"{type(exc).__name__}: {exc}"})
            failed.append(name)
            continue
        seconds = time.perf_counter() - started
        m = evaluator(state)
        sink.save_model(name, state)
        sink.post_defense(name, {**m, "seconds": seconds, **info})
        log(INFO, "[flain] post-defense %s: acc=%.4f asr=%.4f (%.1fs) %s", name, m["acc"], m["asr"], seconds, info)
    return failed

