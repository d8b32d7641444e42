"""A client's local data (its partition, poisoned if it is malicious) and local training."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from attacks import malicious_clients, poison, trigger_scheme
from experiment import seeds
from experiment.config import ExperimentConfig
from experiment.data import load, partition_indices, subsample, to_float
from models import inference_batches, split_at


@dataclass(frozen=True)
class ClientData:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor
    malicious: bool
    poisoned_mask: torch.Tensor  # bool, N: which images carry the trigger

    @property
    def poisoned(self) -> int:
        """Number of stamped-and-relabelled images."""
        return int(self.poisoned_mask.sum())


@lru_cache(maxsize=2)
def _partitions(dataset: str, data_dir: str, num: int, partition: str, alpha: float, seed: int) -> list[np.ndarray]:
    _, labels = load(dataset, data_dir, train=True)
    return partition_indices(labels.numpy(), num, partition, alpha, seed)


@lru_cache(maxsize=32)  # a Ray actor serves several clients each round (~5 MB each)
def client_data(cfg: ExperimentConfig, partition_id: int) -> ClientData:
    """This client's training set; the same in every round (cached per process)."""
    if not 0 <= partition_id < cfg.num_clients:
        raise ValueError(f"partition-id={partition_id} not in 0..{cfg.num_clients - 1}")
    images, labels = load(cfg.dataset, cfg.data_dir, train=True)
    parts = _partitions(cfg.dataset, cfg.data_dir, cfg.num_clients, cfg.partition, cfg.dirichlet_alpha, cfg.seed)
    idx = torch.from_numpy(subsample(parts[partition_id], cfg.train_fraction,
                                     seeds.rng(cfg.seed, "subsample", partition_id)))
    x, y = images[idx], labels[idx]
    attackers = sorted(malicious_clients(cfg.num_clients, cfg.num_malicious, cfg.seed))
    malicious = partition_id in attackers
    mask = torch.zeros(len(y), dtype=torch.bool)
    if malicious:  # DBA: the k-th attacker stamps part k of the pattern
        trigger = trigger_scheme(cfg).for_client(attackers.index(partition_id))
        x, y, stamped = poison(x, y, trigger, cfg.source_label, cfg.target_label, cfg.pdr,
                               seeds.rng(cfg.seed, "poison", partition_id))
        mask[stamped] = True
    return ClientData(x, y, malicious, mask)


def clean_sample(data: ClientData, size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `size` images without the trigger (the partition is already in random
    order), as floats: what an attack measures the clean behaviour on."""
    idx = torch.nonzero(~data.poisoned_mask).flatten()[:size]
    return to_float(data.images[idx]), data.labels[idx]


def input_ranks(model: nn.Sequential, layer: str, images: torch.Tensor) -> np.ndarray:
    """Rank (0 = least active) of each input of Linear `layer` by its mean activation."""
    body, _ = split_at(model.eval(), layer)
    total = sum(out.sum(0) for out in inference_batches(body, images))  # streamed: N x z never held
    order = torch.argsort(total.cpu(), stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order))
    return ranks.numpy().astype(np.int64)
