"""Norm-bounded projected gradient descent (Sun et al., "Can You Really Backdoor Federated
Learning?", 2019; Wang et al., "Attack of the Tails", NeurIPS 2020): after every optimizer
step the malicious model is projected back into the L2 ball of radius eps around the global
model, so its update never looks larger than a benign one (the default eps 5.0 is below
the 6-10 a benign Fashion-MNIST client's update measured here)."""

from __future__ import annotations

import torch

from attacks.base import AttackContext, ModelAttack, distance, trainable


class PGD(ModelAttack):
    name = "pgd"

    def __init__(self, eps: float) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"pgd eps {eps} must be > 0")
        self.eps = eps
        self.unconstrained = 0.0  # the largest distance seen before a projection

    @torch.no_grad()
    def after_step(self, ctx: AttackContext) -> None:
        d = distance(ctx.model, ctx.global_state)
        self.unconstrained = max(self.unconstrained, d)
        if d > self.eps:
            shrink = self.eps / d
            for name, p in trainable(ctx.model).items():
                g = ctx.global_state[name]
                p.copy_(g + shrink * (p - g))
