"""FLAIN's flip in the eigenbasis of the clean features (`post-defenses=flain-subspace`).

FLAIN (Ding et al., Algorithm 1) flips the update dW = W - W0 of layer tau on the input
columns whose mean activation on clean data is low: a backdoor must be read through what the
clean data leaves quiet. An attacker who knows it (attacks/flain_aware.py) leaves those columns
untouched and reads the trigger through inputs that are active on clean data, and FLAIN then
flips only benign updates (ASR stays at 0.85, docs/adaptive-attacks.md). The trigger still moves
tau's input in a *direction* that clean data does not take, even where every coordinate it uses
is active: quiet is a property of directions, not only of coordinates. So this defense applies
FLAIN's flip in the basis of the clean features' principal directions instead of the input
coordinates (the reasoning and the measurements: docs/flain-subspace-study.md). The basis of a
layer's input space from the SVD of its inputs, cut where the left-out energy passes a
threshold, is Gradient Projection Memory's (Saha, Garg and Roy, ICLR 2021), which keeps new
updates out of the directions old tasks use; here the update is kept *in* the directions the
clean task uses and flipped elsewhere. That the backdoor lives in capacity the clean data do
not use is Fine-Pruning's premise (Liu, Dolan-Gavitt and Garg, RAID 2018) and FLAIN's:

  1. Features: tau's input for every aux image and, because 200 images span at most 200 of
     tau's directions, for copies of them shifted by up to `shift` pixels and mirrored
     (`flain-subspace-augment`); the right singular vectors V of that matrix, by decreasing
     singular value, are the clean directions, their squared singular values their energy.
  2. Keep the update along the k most energetic directions, flip it along all the others
     (the rest of the clean span and everything the clean data never reaches):
         W* = W0 + dW P_k - dW (I - P_k),   P_k = V_k^T V_k.
  3. k by cross-fitting, as FLAIN-CV chooses its count: the aux set in label-stratified
     folds; for each, the directions from the other folds (augmented) and the soft accuracy
     (mean true-class probability) of the flipped model on the held-out images. Scanning from
     no flip towards more flipping (the residual clean energy eps left out of P_k grows), the
     last eps whose cross-fitted drop stays within `flain-subspace-tol`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from experiment import seeds
from experiment.config import ExperimentConfig
from strategies.post_training.base import PostTrainingInput
from strategies.post_training.flain_cv import select_count, stratified_folds
from strategies.post_training.flip_path import accuracy
from strategies.post_training.tau import TauNotUsable, TauView, tau_features

AUGMENTS = ("shift-mirror", "none")
# residual clean energy left out of the kept directions, the scan after "no flip" and eps = 0
EPSILONS = np.concatenate([[0.0], np.geomspace(1e-6, 0.5, 40)])


# ---- pure pieces -------------------------------------------------------------------
def augment(images: torch.Tensor, shift: int) -> torch.Tensor:
    """The images, their copies rolled by (dy, dx) for dx in +-1..shift, dy in {-shift, 0,
    shift}, and their mirror images (N x C x H x W in, (2 + 6 shift) N out; shift 0, or inputs
    that are not images: those alone)."""
    if shift <= 0 or images.dim() < 3:
        return images
    copies = [images]
    for dx in [d for d in range(-shift, shift + 1) if d != 0]:
        for dy in (-shift, 0, shift):
            copies.append(torch.roll(images, shifts=(dy, dx), dims=(-2, -1)))
    copies.append(torch.flip(images, dims=(-1,)))
    return torch.cat(copies)


def spectrum(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, energy) of a Gram matrix F F^T: its eigenvectors as columns and eigenvalues, by
    decreasing eigenvalue; those whose square root is below 1e-6 of the largest's are dropped
    (numerical noise). The right singular vectors of F are then U^T F / sqrt(energy)."""
    energy, u = torch.linalg.eigh(gram.double())
    order = torch.argsort(energy, descending=True)
    energy, u = energy[order].clamp_min(0), u[:, order]
    keep = energy.sqrt() > 1e-6 * energy[0].sqrt()
    return u[:, keep], energy[keep]


def clean_basis(features: torch.Tensor, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, energy): the right singular vectors of `features` (N x z) as rows, by decreasing
    singular value, and their energies (squared singular values); `gram`: features features^T
    if already computed (N x N: cheaper than z x z when N < z, the same non-zero spectrum)."""
    phi = features.double()
    u, energy = spectrum(phi @ phi.T if gram is None else gram)
    return (u.T @ phi) / energy.sqrt().unsqueeze(1), energy


def kept_directions(energy: torch.Tensor, eps: float) -> int:
    """The fewest leading directions whose energy leaves at most the share `eps` of the total
    out (all of them for eps = 0)."""
    left_out = 1.0 - torch.cumsum(energy, 0) / energy.sum()  # after keeping 1, 2, ... directions
    return min(int((left_out > eps).sum().item()) + 1, len(energy)) if eps > 0 else len(energy)


def subspace_flip(w0: torch.Tensor, w: torch.Tensor, basis: torch.Tensor, k: int) -> torch.Tensor:
    """W0 + dW P_k - dW (I - P_k), P_k the projector on the first k rows of `basis`."""
    dw = (w - w0).double()
    vk = basis[:k].to(dw)
    kept = (dw @ vk.T) @ vk
    return (w0.double() - dw + 2 * kept).to(w.dtype)


def select_eps(drops: np.ndarray, tol: float) -> int:
    """Index into [no flip, *EPSILONS]: FLAIN-CV's last-within rule on this scan (0: nothing
    is flipped)."""
    return select_count(np.arange(len(drops)), drops, tol, "last-within")


def flipped_weight(w0: torch.Tensor, w: torch.Tensor, drops: np.ndarray, tol: float, basis: torch.Tensor,
                   energy: torch.Tensor) -> tuple[torch.Tensor, int | None, int]:
    """(weight, kept directions or None, index into [no flip, *EPSILONS]): the model the
    last-within rule picks on the cross-fitted `drops`."""
    i = select_eps(drops, tol)
    if i == 0:
        return w.clone(), None, 0
    k = kept_directions(energy, float(EPSILONS[i - 1]))
    return subspace_flip(w0, w, basis, k), k, i


@dataclass(frozen=True)
class FlainSubspace:
    """Post-training defense: FLAIN's flip along the clean features' low-energy directions,
    the amount chosen by cross-fitting on the aux set."""

    display_name: ClassVar[str] = "FLAIN-Subspace"
    needs_clients: ClassVar[bool] = False
    needs_split: ClassVar[bool] = True  # it scores aux subsets after tau: the model must split there

    tol: float = ExperimentConfig.flain_subspace_tol
    folds: int = ExperimentConfig.flain_subspace_folds
    augment: str = ExperimentConfig.flain_subspace_augment
    layer: str = ExperimentConfig.flain_layer
    seed: int = 0
    shift: ClassVar[int] = 2  # pixels, for augment=shift-mirror

    @staticmethod
    def note(result: dict[str, Any]) -> str:
        if result["kept_directions"] is None:
            return "nothing flipped (every flip costs more than the tolerance)"
        return (f"kept {result['kept_directions']}/{result['directions']} clean directions "
                f"(eps={result['eps']:.2g}, cross-fitted aux drop {result['estimated_drop']:.4f})")

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> FlainSubspace:
        return cls(tol=cfg.flain_subspace_tol, folds=cfg.flain_subspace_folds, augment=cfg.flain_subspace_augment,
                   layer=cfg.flain_layer, seed=cfg.seed)

    @torch.no_grad()
    def features(self, tau: TauView, images: torch.Tensor) -> torch.Tensor:
        shift = self.shift if self.augment == "shift-mirror" else 0
        return tau_features(tau.model, tau.model.get_submodule(tau.name), tau.name, augment(images, shift))

    def drop_curve(self, tau: TauView, w0: torch.Tensor, augmented: torch.Tensor,
                   gram: torch.Tensor | None = None) -> tuple[float, np.ndarray]:
        """(acc0, cross-fitted soft-accuracy drop of [no flip, *EPSILONS]); `augmented`: tau's
        inputs for the augmented aux set, copy after copy of the N aux images (row j is a copy
        of image j mod N), so each fold's directions come from the other folds' copies; `gram`:
        augmented augmented^T (float64) if already computed."""
        if tau.rest is None:
            raise TauNotUsable(f"flain-subspace scores subsets of the aux set after layer {tau.name!r}, which needs a "
                               "model whose output is a function of tau's output (torch.fx-traceable, no skip around "
                               "tau)")
        labels = tau.labels
        fold = stratified_folds(labels.cpu().numpy(), self.folds, seeds.rng(self.seed, "aux-folds"))
        source_fold = torch.as_tensor(np.tile(fold, len(augmented) // len(fold)), device=augmented.device)
        dw = (tau.weight - w0).double()
        bias = tau.bias.detach().double().unsqueeze(1) if tau.bias is not None else 0.0
        # each fold's directions V = U^T F / sqrt(energy) enter only through dW V^T and V phi^T:
        # both follow from the whole Gram matrix and dW F^T, so F is multiplied once, not per fold
        feats = augmented.double()
        gram, projected = feats @ feats.T if gram is None else gram, dw @ feats.T
        totals = np.zeros(len(EPSILONS) + 1)
        for f in range(self.folds):
            held = torch.as_tensor(np.flatnonzero(fold == f), device=labels.device)
            rows = source_fold != f
            u, energy = spectrum(gram[rows][:, rows])
            phi = tau.features[held.to(tau.features.device)].double()
            scale = energy.sqrt()
            a = (projected[:, rows] @ u) / scale  # dW V^T: out x r
            b = (u.T @ (feats[rows] @ phi.T)) / scale.unsqueeze(1)  # V phi^T: r x m
            flipped = (w0.double() - dw) @ phi.T  # every direction flipped
            for i, k in enumerate([None] + [kept_directions(energy, e) for e in EPSILONS]):
                pre = tau.weight.double() @ phi.T if k is None else flipped + 2 * a[:, :k] @ b[:k]
                with torch.no_grad():
                    logits = tau.rest((pre + bias).T.float())
                totals[i] += accuracy(logits, labels[held], False, True) * len(held)
        acc = totals / len(labels)
        return float(acc[0]), acc[0] - acc

    def apply(self, inp: PostTrainingInput) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        started = time.perf_counter()
        tau = TauView.of(inp.model, self.layer, inp.aux_images, inp.aux_labels)
        images = inp.aux_images.to(tau.features.device)
        w0 = inp.initial_state[f"{tau.name}.weight"].to(tau.weight)
        acc_before = tau.evaluate(tau.weight)
        augmented = self.features(tau, images)
        gram = augmented.double() @ augmented.double().T
        _, drops = self.drop_curve(tau, w0, augmented, gram)
        basis, energy = clean_basis(augmented, gram)
        weight, k, i = flipped_weight(w0, tau.weight, drops, self.tol, basis, energy)
        state, aux_acc_after = tau.state_with(weight)
        return state, {
            "layer": tau.name,
            "kept_directions": k,
            "directions": int(len(energy)),
            "inputs": int(tau.weight.shape[1]),
            "eps": None if k is None else float(EPSILONS[i - 1]),
            "estimated_drop": float(drops[i]),
            "drop_curve": {"eps": [None, *map(float, EPSILONS)], "drop": [float(d) for d in drops]},
            "aux_acc_before": acc_before,
            "aux_acc_after": aux_acc_after,
            "rule": {"tol": self.tol, "folds": self.folds, "augment": self.augment},
            "search_seconds": time.perf_counter() - started,
        }
