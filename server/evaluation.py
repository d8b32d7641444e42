"""Central evaluation on the server: clean accuracy (ACC) and attack success rate (ASR)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attacks.triggers import PixelTrigger
from experiment.data import to_float
from experiment.hardware import inference_batch


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Predicted labels (on CPU) for uint8 or float images, in eval mode and full fp32
    (channels-last: same math, faster convolutions), `batch` images at a time (default:
    the device's `inference_batch`)."""
    model.eval().to(memory_format=torch.channels_last)
    device = next(model.parameters()).device
    batch = batch or inference_batch(device)
    out = [
        model(to_float(images[i : i + batch]).to(device, memory_format=torch.channels_last)).argmax(1).cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out)


@dataclass
class Evaluator:
    """ACC on the clean eval images; ASR on the eval images of the source label,
    stamped with the trigger: the share classified as the target label."""

    model: nn.Module  # scratch model, on the evaluation device
    images: torch.Tensor  # uint8 eval images (the aux images excluded)
    labels: torch.Tensor
    trigger: PixelTrigger
    source: int
    target: int

    def __post_init__(self) -> None:
        triggered = self.images[self.labels == self.source]
        self.triggered = self.trigger.stamp(triggered)

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.load_state_dict(state)
        acc = (predict(self.model, self.images) == self.labels).float().mean().item()
        asr = (predict(self.model, self.triggered) == self.target).float().mean().item()
        return {"acc": acc, "asr": asr}
