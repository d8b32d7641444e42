"""FLAME: cluster, clip, noise.

Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022.
Each round:
1. cluster the clients' local models by pairwise cosine distance with HDBSCAN
   (min_cluster_size = n/2 + 1, min_samples = 1, a single cluster allowed) and admit the
   largest cluster: a colluding minority that trains towards one backdoor lands outside it;
2. S_t = the median of all n updates' L2 norms; clip each admitted update to S_t
   (an attacker cannot scale its way in);
3. average the clipped updates (plainly, as the paper) and add Gaussian noise with std
   lambda * S_t to every parameter (lambda 0.001, the paper's value for image tasks).
Norms and cosines span every parameter; BatchNorm buffers are statistics, averaged over the
admitted clients, never clipped or noised. The clustering is scikit-learn's HDBSCAN on the
precomputed cosine-distance matrix. If HDBSCAN finds no cluster at all (every model noise),
every client is admitted and the round's log says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.cluster import HDBSCAN

from experiment import seeds
from strategies.aggregation.delta import Combined, WholeModelRule


def cosine_distances(vectors: np.ndarray) -> np.ndarray:
    """n x n cosine distances (1 - cosine similarity) in float64, exactly 0 on the diagonal."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1)
    unit = v / np.where(norms > 0, norms, 1.0)[:, None]
    distances = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(distances, 0.0)
    return distances


def largest_cluster(distances: np.ndarray) -> np.ndarray:
    """Admitted clients (bool, n): HDBSCAN's largest cluster; everyone if it finds none."""
    n = len(distances)
    if n < 3:  # HDBSCAN needs a cluster of n/2 + 1 >= 2 among at least 3 points to say anything
        return np.ones(n, dtype=bool)
    labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, allow_single_cluster=True,
                     metric="precomputed", copy=True).fit(distances).labels_
    clustered = labels[labels >= 0]
    if not len(clustered):
        return np.ones(n, dtype=bool)
    biggest = np.bincount(clustered).argmax()
    return labels == biggest


def clip_to(updates: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """(each update scaled to at most `bound` in L2 norm, the factors used: min(1, bound / norm))."""
    norms = np.linalg.norm(updates, axis=1)
    factors = np.where(norms > bound, bound / np.where(norms > 0, norms, 1.0), 1.0)
    return updates * factors[:, None], factors


def flame_step(models: np.ndarray, updates: np.ndarray, lam: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(global step, admitted clients, S_t, clip factors of the admitted) for local models and
    their updates (clients x D)."""
    admitted = largest_cluster(cosine_distances(models))
    bound = float(np.median(np.linalg.norm(updates, axis=1)))
    clipped, factors = clip_to(updates[admitted], bound)
    step = clipped.mean(axis=0)
    if lam > 0:
        step = step + rng.normal(0.0, lam * bound, size=step.shape)
    return step, admitted, bound, factors


class Flame(WholeModelRule):
    """FLAME on the whole update of every client of the round."""

    def __init__(self, *args: Any, noise: float, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise, self.seed = noise, seed

    def judge(self, server_round: int, updates: np.ndarray, weights: np.ndarray,
              partitions: list[int]) -> Combined:
        current = np.concatenate([self._sent[k].numpy().astype(np.float64).ravel()
                                  for k in self._sent.keys() if k not in self.buffer_keys])
        step, admitted, bound, factors = flame_step(current[None, :] + updates, updates, self.noise,
                                                    seeds.rng(self.seed, "flame-noise", server_round))
        return Combined({"": step}, weights * admitted, {
            "admitted": [p for p, a in zip(partitions, admitted) if a],
            "excluded": [p for p, a in zip(partitions, admitted) if not a],
            "clip_bound": bound,
            "clip_factors": {str(p): float(f) for p, f in zip(np.array(partitions)[admitted], factors)},
            "noise_std": self.noise * bound,
        })

    def settings(self) -> dict[str, str]:
        return {"clustering": "HDBSCAN on cosine distances, min_cluster_size n/2+1, min_samples 1",
                "clip": "median update norm", "noise": f"lambda={self.noise} x the clip bound"}
