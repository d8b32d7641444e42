"""What a malicious client does beyond poisoning its data: hooks into its local training.

An attack sees the model being trained (it starts as the global model the server sent) and
may add a loss term, mask gradients after each backward pass, project the weights after each
optimizer step, and transform the final model before it is sent. The plain attack
(`attack=none`, the paper's) does none of it. Every client, benign or not, reports the
same metric keys (Flower aggregates only replies whose metrics have the same keys), so the
reply's metrics always hold `UPDATE_METRICS`.

Only trainable parameters are attacked. BatchNorm running statistics (buffers) are sent as
trained: scaling or projecting a statistic would corrupt it, not hide an update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# keys in every train reply: the sent update's L2 norm (trainable parameters), the norm
# before a scaling or projection (the largest one seen, for pgd), the share of coordinates
# (or of tau's input columns) an attack froze, and how many of tau's columns it froze
UPDATE_METRICS = ("update-norm", "update-norm-unconstrained", "masked-share", "masked-columns", "attack-direction")


@dataclass
class AttackContext:
    """What an attacking client knows when its local training starts."""

    model: nn.Module  # being trained; starts as the global model
    global_state: dict[str, torch.Tensor]  # the global model the server sent (on the model's device)
    clean_images: torch.Tensor  # the client's own clean images, as floats in [0, 1] (a sample)
    clean_labels: torch.Tensor
    tau: str  # the Linear layer FLAIN works on
    features: Callable[[torch.Tensor], torch.Tensor]  # images -> tau's inputs, on the live model
    memory: dict[str, torch.Tensor] = field(default_factory=dict)  # kept across rounds on this node


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def distance(model: nn.Module, global_state: dict[str, torch.Tensor]) -> float:
    """L2 norm of (model - global) over the trainable parameters."""
    total = torch.zeros((), dtype=torch.float64)
    for name, p in trainable(model).items():
        total += (p.detach() - global_state[name]).double().pow(2).sum().cpu()
    return float(total.sqrt())


class ModelAttack:
    """The plain attack: train on the poisoned data, send the result unchanged."""

    name = "none"

    def __init__(self) -> None:
        self.unconstrained: float | None = None  # None: nothing was scaled or projected
        self.masked_share = 0.0
        self.masked_columns = 0
        self.direction = 0.0  # neurotoxin: 1 = the last global change, 0 = its own clean gradient

    def prepare(self, ctx: AttackContext) -> None:
        """Before the first step."""

    def extra_loss(self, ctx: AttackContext, images: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor | None:
        """A term added to the batch's loss (`poisoned`: which images carry the trigger)."""
        return None

    def after_backward(self, ctx: AttackContext) -> None:
        """Between backward() and the optimizer step (gradient masks)."""

    def after_step(self, ctx: AttackContext) -> None:
        """After each optimizer step (projections)."""

    def finish(self, ctx: AttackContext) -> None:
        """After the last step, before the model is sent (scaling)."""

    def metrics(self, ctx: AttackContext) -> dict[str, float]:
        sent = distance(ctx.model, ctx.global_state)
        return {"update-norm": sent,
                "update-norm-unconstrained": sent if self.unconstrained is None else self.unconstrained,
                "masked-share": self.masked_share, "masked-columns": float(self.masked_columns),
                "attack-direction": self.direction}
