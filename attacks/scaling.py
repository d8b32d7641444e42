"""Model replacement / constrain-and-scale (Bagdasaryan et al., "How To Backdoor Federated
Learning", AISTATS 2020): the malicious update is multiplied by a factor gamma before it is
sent, X = G + gamma (L - G). With gamma = n / eta (n clients, global rate eta = 1 here) one
attacker replaces the global model; with m attackers each needs n / m, the default
(`scaling-factor=0`)."""

from __future__ import annotations

import torch

from attacks.base import AttackContext, ModelAttack, distance, trainable


class Scaling(ModelAttack):
    name = "scaling"

    def __init__(self, factor: float) -> None:
        super().__init__()
        if not factor > 0:
            raise ValueError(f"scaling factor {factor} must be > 0")
        self.factor = factor

    @torch.no_grad()
    def finish(self, ctx: AttackContext) -> None:
        self.unconstrained = distance(ctx.model, ctx.global_state)
        for name, p in trainable(ctx.model).items():
            g = ctx.global_state[name]
            p.copy_(g + self.factor * (p - g))
