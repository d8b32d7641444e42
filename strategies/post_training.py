"""Wrap any Flower strategy: snapshot the initial global weights, and after the last
round hand (initial, final) to a post-training hook (FLAIN, pruning, ...)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

# hook(grid, initial global arrays, final global arrays), run after the last round
PostTrainingHook = Callable[[Grid, ArrayRecord, ArrayRecord], None]


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
    def apply(self, inp: PostTrainingInput) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(defended state_dict, what it did: threshold, counts, ...)."""


class TrainingProducedNoModel(RuntimeError):
    """No round aggregated a single client reply."""


def with_post_training(base: type[Strategy]) -> type[Strategy]:
    """A subclass of Flower strategy `base` whose `start` runs a post-training hook."""

    class PostTraining(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, post_training: PostTrainingHook | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.post_training = post_training
            self.initial_arrays: ArrayRecord | None = None

        def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any) -> Result:
            # FLAIN needs W0, the weights before round 1: keep our own copy.
            self.initial_arrays = copy.deepcopy(initial_arrays)
            result = super().start(grid, initial_arrays, *args, **kwargs)
            if not result.arrays:
                raise TrainingProducedNoModel("no round produced an aggregated model: every client failed")
            if self.post_training is not None:
                self.post_training(grid, self.initial_arrays, result.arrays)
            return result

    PostTraining.__name__ = PostTraining.__qualname__ = f"PostTraining{base.__name__}"
    return PostTraining
