"""What a post-training defense receives and returns.

The ServerApp holds the initial global weights (W0) and the final ones when
`strategy.start()` returns; it builds one `PostTrainingInput` and applies every defense
named in `post-defenses` to the same trained model, side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from experiment.config import ExperimentConfig


@dataclass
class PostTrainingInput:
    """What a post-training defense may use."""

    model: nn.Sequential  # the trained global model (left untouched by defenses)
    initial_state: dict[str, torch.Tensor]  # global weights before round 1 (W0)
    aux_images: torch.Tensor  # the server's clean auxiliary set, float in [0, 1]
    aux_labels: torch.Tensor
    grid: Grid | None = None  # for defenses that talk to the clients (fedpruning)
    strategy: Strategy | None = None  # the training strategy (to fine-tune with)
    last_round: int = 0


class PostTrainingDefense(Protocol):
    """A registry entry owns what is known about it: its display name (the paper's row name),
    whether it needs the clients (then it cannot run on a saved model), how its result is
    summarised in one line."""

    display_name: ClassVar[str]
    needs_clients: ClassVar[bool]

    @staticmethod
    def note(result: dict[str, Any]) -> str:
        """One line on what it did (the results table's notes column)."""

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> PostTrainingDefense:
        """The defense with the run's settings."""

    def apply(self, inp: PostTrainingInput) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(defended state_dict, what it did: threshold, counts, ...)."""


@dataclass(frozen=True)
class TauSettings:
    """Settings of a defense on layer tau with the adaptive threshold. The paper compares
    FLAIN and Pruning on the same layer with the same stop rule, so both (and federated
    pruning's adaptive rate) read `flain-step`, `flain-rho` and `flain-layer`."""

    step: float = ExperimentConfig.flain_step  # the one default: experiment/config.py
    rho: float = ExperimentConfig.flain_rho
    layer: str = ExperimentConfig.flain_layer  # 'auto' = first Linear after the convolutions
    start: float | None = None  # the first threshold; None: min + step (the paper)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> TauSettings:
        return cls(step=cfg.flain_step, rho=cfg.flain_rho, layer=cfg.flain_layer,
                   start=None if cfg.flain_start < 0 else cfg.flain_start)
