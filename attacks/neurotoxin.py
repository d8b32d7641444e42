"""Neurotoxin (Zhang et al., "Neurotoxin: Durable Backdoors in Federated Learning", ICML
2022): the attacker estimates which coordinates benign clients write to, from the last
change of the global model (or, in its first round, the gradient of its own clean data),
and trains its backdoor only outside them: in each parameter tensor the top-k share of
coordinates by that estimate's magnitude is frozen (the gradient masked to zero before every
step, so Adam never moves them). The backdoor then lives where benign updates rarely land
and is not overwritten."""

from __future__ import annotations

import torch
from torch import nn

from attacks.base import AttackContext, ModelAttack, trainable

PREVIOUS = "neurotoxin-previous-global."  # memory keys: the global model of the last round


def top_share_mask(direction: torch.Tensor, share: float) -> torch.Tensor:
    """True where a coordinate may change: everywhere but the `share` largest |direction|."""
    k = int(round(share * direction.numel()))
    keep = torch.ones_like(direction, dtype=torch.bool)
    if k:
        keep.view(-1)[torch.topk(direction.abs().flatten(), k).indices] = False
    return keep


class Neurotoxin(ModelAttack):
    name = "neurotoxin"

    def __init__(self, topk: float) -> None:
        super().__init__()
        if not 0 < topk < 1:
            raise ValueError(f"neurotoxin top-k share {topk} must be in (0, 1)")
        self.topk = topk
        self.masks: dict[str, torch.Tensor] = {}

    def prepare(self, ctx: AttackContext) -> None:
        params = trainable(ctx.model)
        if all(PREVIOUS + n in ctx.memory for n in params):
            direction = {n: ctx.global_state[n] - ctx.memory[PREVIOUS + n].to(ctx.global_state[n].device)
                         for n in params}
            self.direction = 1.0
        else:
            direction = self._clean_gradient(ctx)
        self.masks = {n: top_share_mask(d, self.topk) for n, d in direction.items()}
        frozen = sum(int((~m).sum()) for m in self.masks.values())
        self.masked_share = frozen / sum(m.numel() for m in self.masks.values())
        for n in params:  # next round's estimate
            ctx.memory[PREVIOUS + n] = ctx.global_state[n].detach().cpu().clone()

    @staticmethod
    def _clean_gradient(ctx: AttackContext) -> dict[str, torch.Tensor]:
        model = ctx.model
        model.zero_grad(set_to_none=True)
        device = next(model.parameters()).device
        loss = nn.functional.cross_entropy(model(ctx.clean_images.to(device)), ctx.clean_labels.to(device))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
        model.zero_grad(set_to_none=True)
        return grads

    def after_backward(self, ctx: AttackContext) -> None:
        for name, p in trainable(ctx.model).items():
            if p.grad is not None:
                p.grad.mul_(self.masks[name])
