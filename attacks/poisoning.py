"""Data poisoning of a malicious client: stamp the trigger, relabel to the target."""

from __future__ import annotations

import numpy as np
import torch

from attacks.triggers import PixelTrigger
from experiment import seeds


def malicious_clients(num_clients: int, num_malicious: int, seed: int) -> frozenset[int]:
    """Partition ids of the malicious clients: a fixed random draw from the seed."""
    if not 0 <= num_malicious <= num_clients:
        raise ValueError(f"num_malicious={num_malicious} not in 0..{num_clients}")
    rng = seeds.rng(seed, "attackers")  # own stream: independent of the split
    return frozenset(int(i) for i in rng.choice(num_clients, size=num_malicious, replace=False))


def poison(
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: PixelTrigger,
    source: int,
    target: int,
    pdr: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stamp `trigger` on a share `pdr` of the images of label `source`, relabel them
    `target`. Returns new (images, labels, sorted indices of the poisoned images); the
    inputs are untouched."""
    candidates = np.flatnonzero(labels.numpy() == source)
    count = int(round(pdr * len(candidates)))
    chosen = rng.choice(candidates, size=count, replace=False)
    images, labels = images.clone(), labels.clone()
    idx = torch.from_numpy(np.sort(chosen)).long()
    if count:
        images[idx] = trigger.stamp(images[idx])
        labels[idx] = target
    return images, labels, idx
