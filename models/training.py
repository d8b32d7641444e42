"""Local training: what every client runs each round, and what the server runs where a rule
trains too (FLTrust's root set). Adam, cross-entropy, channels-last, optional bf16 autocast.
A malicious client's model attack (attacks/base.py) hooks in through the `Hooks` methods."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from experiment.data import to_float
from experiment.hardware import autocast


class Hooks(Protocol):
    """What local training calls on a model attack (attacks.base.ModelAttack has them)."""

    def extra_loss(self, ctx: Any, x: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor | None: ...

    def after_backward(self, ctx: Any) -> None: ...

    def after_step(self, ctx: Any) -> None: ...


def train_local(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    precision: str = "fp32",
    attack: Hooks | None = None,
    ctx: Any = None,
    poisoned: torch.Tensor | None = None,
) -> float:
    """Adam (betas 0.9/0.999), cross-entropy; returns the mean loss of the last epoch.

    Batch order comes from `generator`; runs channels-last (same math, faster
    convolutions) under `precision` autocast. A malicious client's `attack` hooks in: an
    extra loss term (`poisoned` says which images carry the trigger), gradient masks after
    backward, projections after each step."""
    if attack is not None and (ctx is None or poisoned is None):
        raise ValueError("an attack needs its AttackContext and the poisoned mask")
    device = next(model.parameters()).device
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    mean_loss = float("nan")
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x = to_float(images[batch]).to(device, memory_format=torch.channels_last)
            y = labels[batch].to(device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = loss_fn(model(x), y)
                extra = attack.extra_loss(ctx, x, poisoned[batch].to(device)) if attack else None
            (loss if extra is None else loss + extra).backward()
            if attack:
                attack.after_backward(ctx)
            optimizer.step()
            if attack:
                attack.after_step(ctx)
            total += loss.item() * len(batch)
            seen += len(batch)
        mean_loss = total / max(seen, 1)
    return mean_loss
