"""Wrap any Flower strategy: snapshot the initial global weights, and after the last
round hand (initial, final) to a post-training hook (FLAIN, pruning, ...)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

PostTrainingHook = Callable[[ArrayRecord, ArrayRecord], None]


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
                self.post_training(self.initial_arrays, result.arrays)
            return result

    PostTraining.__name__ = PostTraining.__qualname__ = f"PostTraining{base.__name__}"
    return PostTraining
