"""Central evaluation on the server: clean accuracy (ACC) and attack success rate (ASR)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attacks.triggers import PixelTrigger
from models import inference_batches


def predict(model: nn.Module, images: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Predicted labels (on CPU) for uint8 or float images, in eval mode and full fp32
    (`inference_batches`; the scratch model's weights are made channels-last too)."""
    model.eval().to(memory_format=torch.channels_last)
    return torch.cat([out.argmax(1).cpu() for out in inference_batches(model, images, batch)])


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
