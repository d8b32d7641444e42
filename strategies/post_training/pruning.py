"""Pruning baseline of the FLAIN paper's comparisons.

Low-activation pruning after Liu, Dolan-Gavitt, Garg, "Fine-Pruning" (RAID 2018), applied
as in Ding et al. (FLAIN) to the same layer tau: rank tau's inputs by mean activation on
the server's clean aux set and zero the weight columns of the lowest ones, raising the
threshold with FLAIN's adaptive stop rule (stop when the aux-accuracy drop reaches rho).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from strategies.post_training.base import PostTrainingInput, TauSettings
from strategies.post_training.tau import TauView
from strategies.post_training.threshold import adaptive_threshold


def prune_columns(w: torch.Tensor, mask: torch.Tensor | np.ndarray) -> torch.Tensor:
    """W with the columns (inputs) in `mask` set to zero (mask moved to W's device)."""
    return w.masked_fill(torch.as_tensor(mask, device=w.device).unsqueeze(0), 0.0)


@dataclass(frozen=True)
class Pruning(TauSettings):
    """Post-training defense: low-activation pruning of tau's inputs."""

    display_name: ClassVar[str] = "Pruning"
    needs_clients: ClassVar[bool] = False

    @staticmethod
    def note(result: dict[str, Any]) -> str:
        return f"pruned={result['pruned']}/{result.get('inputs', '?')}"

    def apply(self, inp: PostTrainingInput) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        started = time.perf_counter()
        tau = TauView.of(inp.model, self.layer, inp.aux_images, inp.aux_labels)
        acc0 = tau.evaluate(tau.weight)
        stop = adaptive_threshold(
            tau.activations, self.step, self.rho, acc0,
            lambda mask: tau.evaluate(prune_columns(tau.weight, mask)), self.start,
        )
        state, acc_after = tau.state_with(prune_columns(tau.weight, stop.mask))
        return state, {
            "layer": tau.name,
            "threshold": float(stop.threshold),
            "pruned": int(stop.mask.sum()),
            "inputs": int(tau.weight.shape[1]),
            "aux_acc_before": acc0,
            "aux_acc_after": acc_after,
            "exhausted": stop.exhausted,
            "evaluations": stop.evaluations,
            "search_seconds": time.perf_counter() - started,
        }
