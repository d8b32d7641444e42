"""Layer tau of the post-training defenses: its inputs on the aux set, evaluated fast.

The defenses change only tau's weight, so the body up to tau runs once over the aux set
(`tau_inputs`) and every candidate weight is scored by running only the head from tau on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models import inference_batches, resolve_tau, split_at

# accuracy on the aux set of the model whose tau weight is the given matrix
Evaluate = Callable[[torch.Tensor], float]


def tau_inputs(body: nn.Module, images: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Inputs of tau (post-ReLU features) for every aux image, N x z (`inference_batches`: on
    CIFAR-10's 600 aux images 2.5-3 s at batch 512, 1.3 s at the CPU's 64)."""
    return torch.cat(list(inference_batches(body, images, batch)))


def head_accuracy(head: nn.Sequential, tau_name: str, features: torch.Tensor, labels: torch.Tensor) -> Evaluate:
    """Evaluate(W) = accuracy of `head` (tau and after) on cached features with tau.weight = W."""
    tau: nn.Linear = head._modules[tau_name]  # type: ignore[assignment]

    @torch.no_grad()
    def evaluate(weight: torch.Tensor) -> float:
        tau.weight.copy_(weight)
        return (head(features).argmax(1) == labels).float().mean().item()

    return evaluate


@dataclass
class TauView:
    """A private copy of the trained model, seen from layer tau."""

    model: nn.Sequential
    name: str  # tau's name in the model
    weight: torch.Tensor  # trained W (out x in)
    activations: np.ndarray  # mean input of each of tau's inputs over the aux set (float64)
    evaluate: Evaluate
    features: torch.Tensor  # tau's inputs for every aux image (N x in)
    labels: torch.Tensor  # the aux labels, on the model's device
    head: nn.Sequential  # tau and every layer after it

    @classmethod
    def of(cls, model: nn.Sequential, layer: str, aux_images: torch.Tensor, aux_labels: torch.Tensor) -> TauView:
        model = copy.deepcopy(model).eval()
        name = resolve_tau(model, layer)
        body, head = split_at(model, name)
        device = next(model.parameters()).device
        features = tau_inputs(body, aux_images.to(device))
        labels = aux_labels.to(device)
        return cls(
            model=model,
            name=name,
            weight=model._modules[name].weight.detach().clone(),
            activations=features.mean(0).double().cpu().numpy(),
            evaluate=head_accuracy(head, name, features, labels),
            features=features,
            labels=labels,
            head=head,
        )

    def state_with(self, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """(state_dict with tau.weight = weight, its aux accuracy)."""
        acc = self.evaluate(weight)  # also leaves `weight` in the model
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}, acc
