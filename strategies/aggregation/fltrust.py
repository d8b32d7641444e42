"""FLTrust: trust each client as far as its update agrees with the server's own.

Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021. The server keeps a small clean root set (here `fltrust-root-size` test images,
disjoint from the aux set and left out of ACC/ASR; experiment.data.root_split). Each round it
trains the current global model on the root set with the clients' own optimizer and settings
(models.training.train_local), giving the server update g0, then
  TS_i = ReLU(cos(g_i, g0)),  g_i' = g_i x ||g0|| / ||g_i||,  step = sum TS_i g_i' / sum TS_i:
an update pointing away from the server's gets no weight, and no client can weigh in by its
norm. A round whose scores are all zero keeps the model (recorded, as RLR's refused rounds).
Cosines and norms span every parameter; BatchNorm statistics are averaged over the trusted
clients, never rescaled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from experiment import seeds
from experiment.config import ExperimentConfig
from experiment.data import aux_split, load, root_split
from experiment.hardware import pick_device
from models import build_model
from models.training import train_local
from strategies.aggregation.delta import Combined, WholeModelRule

# the server's update on its root set: (round, the global arrays as numpy) -> trained arrays
ServerUpdate = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


def trust_scores(updates: np.ndarray, server: np.ndarray) -> np.ndarray:
    """ReLU(cosine(update_i, server update)) per client; 0 for a zero update."""
    norms = np.linalg.norm(updates, axis=1) * np.linalg.norm(server)
    cos = np.divide(updates @ server, norms, out=np.zeros(len(updates)), where=norms > 0)
    return np.maximum(cos, 0.0)


def fltrust_step(updates: np.ndarray, server: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(global step, trust scores); the step is None when every score is 0."""
    scores = trust_scores(updates, server)
    if scores.sum() <= 0:
        return None, scores
    norms = np.linalg.norm(updates, axis=1)
    scale = np.divide(np.linalg.norm(server), norms, out=np.zeros(len(updates)), where=norms > 0)
    return np.tensordot(scores / scores.sum(), updates * scale[:, None], axes=1), scores


class FLTrust(WholeModelRule):
    """FLTrust with the server update computed by `server_update` each round."""

    def __init__(self, *args: Any, server_update: ServerUpdate, root_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server_update, self.root_size = server_update, root_size

    def judge(self, server_round: int, updates: np.ndarray, weights: np.ndarray,
              partitions: list[int]) -> Combined:
        current = {k: v.numpy() for k, v in self._sent.items()}
        trained = self.server_update(server_round, current)
        server = np.concatenate([(trained[k].astype(np.float64) - current[k].astype(np.float64)).ravel()
                                 for k in current if k not in self.buffer_keys])
        step, scores = fltrust_step(updates, server)
        log = {"trust": {str(p): float(s) for p, s in zip(partitions, scores)},
               "server_update_norm": float(np.linalg.norm(server))}
        if step is None:
            return Combined({}, weights, log, refusal="FLTrust: every client's update points away from the "
                                                      "server's (trust 0): the model stays")
        return Combined({"": step}, weights * (scores > 0), log)

    def settings(self) -> dict[str, str]:
        return {"root set": f"{self.root_size} clean images on the server", "weights": "ReLU(cosine) with the server update"}


def root_training(cfg: ExperimentConfig) -> ServerUpdate:
    """The server's update on its root set: the clients' local training (optimizer, epochs,
    batch size, learning rate) from the global model, batch order from the run's seed."""
    images, labels = load(cfg.dataset, cfg.data_dir, train=False)
    aux, _ = aux_split(cfg, labels.numpy())
    root, _ = root_split(cfg, labels.numpy(), aux)
    x, y = images[root], labels[root]
    device = pick_device()

    def update(server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model = build_model(cfg.dataset, cfg.network).to(device)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
        with torch.random.fork_rng(devices=[]):  # dropout draws from the run's seed, not the server's state
            torch.manual_seed(seeds.int_seed(cfg.seed, "fltrust-batches", server_round))
            batches = torch.Generator().manual_seed(seeds.int_seed(cfg.seed, "fltrust-batches", server_round, 1))
            train_local(model, x, y, cfg.local_epochs, cfg.batch_size, cfg.lr, batches)
        return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}

    return update
