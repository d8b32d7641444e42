"""FLAIN-aware backdoor (ours; no public framework has one).

Design, written before it was built. FLAIN (Algorithm 1) flips, in the final model, the
weight updates of the inputs of layer tau whose mean activation on the server's clean aux set
is low: a backdoor implanted through tau's weights that read trigger-only features (inputs
silent on clean data, loud on triggered data) is undone, because exactly those columns are
flipped. An attacker who knows this can keep its backdoor out of those columns:
 1. before training, it measures the mean activation of tau's inputs on its own clean images
    with the global model (its data come from the same distribution as the server's aux set,
    so its ranking approximates FLAIN's), and marks the inputs below the `quantile` (default
    0.5: FLAIN flipped 12-21% of the inputs in our runs, so half leaves a wide margin);
 2. in every step, the gradient of tau's weight columns for the marked inputs is set to zero:
    the attacker's update there is exactly zero, so flipping those columns flips only
    benign updates;
 3. optionally (`lambda` > 0, default 1.0) a loss term keeps the trigger's features out of the
    marked inputs: lambda times the mean activation of the marked inputs on the triggered
    images of the batch, so the trigger is read through inputs that are loud on clean data
    too, which FLAIN does not flip.
What should remain for FLAIN is a backdoor carried by the convolutions and by tau's
high-activation columns, which it leaves alone by design.
"""

from __future__ import annotations

import torch

from attacks.base import AttackContext, ModelAttack


def low_activation_inputs(mean_activation: torch.Tensor, quantile: float) -> torch.Tensor:
    """Indices of the floor(quantile * n) inputs with the lowest mean activation (ties by index)."""
    k = int(quantile * mean_activation.numel())
    return torch.argsort(mean_activation.cpu(), stable=True)[:k].sort().values


class FlainAware(ModelAttack):
    name = "flain-aware"

    def __init__(self, quantile: float, lam: float) -> None:
        super().__init__()
        if not 0 < quantile < 1:
            raise ValueError(f"flain-aware quantile {quantile} must be in (0, 1)")
        self.quantile, self.lam = quantile, lam
        self.columns = torch.empty(0, dtype=torch.long)
        self._mask: torch.Tensor | None = None

    @torch.no_grad()
    def prepare(self, ctx: AttackContext) -> None:
        was_training = ctx.model.training
        ctx.model.eval()  # no dropout: the activations FLAIN's server will see
        device = next(ctx.model.parameters()).device
        mean = ctx.features(ctx.clean_images.to(device)).float().mean(0)
        ctx.model.train(was_training)
        self.columns = low_activation_inputs(mean, self.quantile)
        weight = getattr(ctx.model, ctx.tau).weight
        self._mask = torch.ones(weight.shape[1], device=weight.device, dtype=weight.dtype)
        self._mask[self.columns.to(weight.device)] = 0
        self.masked_columns = len(self.columns)
        self.masked_share = len(self.columns) / weight.shape[1]

    def extra_loss(self, ctx: AttackContext, images: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor | None:
        if self.lam == 0 or not bool(poisoned.any()):
            return None
        feats = ctx.features(images[poisoned])
        return self.lam * feats[:, self.columns.to(feats.device)].float().mean()

    def after_backward(self, ctx: AttackContext) -> None:
        weight = getattr(ctx.model, ctx.tau).weight
        if weight.grad is not None:
            weight.grad.mul_(self._mask)
