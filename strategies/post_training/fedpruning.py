"""Federated pruning.

Wu, Yang, Zhu, Mitra, "Mitigating Backdoor Attacks in Federated Learning",
arXiv:2011.01767 (2020). After training:
  1. every client ranks the inputs of layer tau by their mean activation on its own local
     data and sends only the ranking (an extra Flower round, `query.activation_ranking`);
  2. the server aggregates the rankings (example-weighted mean rank) and prunes the
     lowest-ranked inputs: `fedpruning-rate` of them, or with rate 0 as many as FLAIN's
     adaptive rule allows on the server's aux set (threshold on the normalized mean rank,
     step `flain-step`, stop when the aux-accuracy drop reaches `flain-rho`);
  3. extreme weights are adjusted: tau's remaining weights outside mean +- k std
     (`fedpruning-extreme` = k, 0 = off) are clipped to that band;
  4. optionally `fedpruning-finetune-rounds` more federated rounds fine-tune the pruned
     model with the training strategy, the pruned inputs held at zero.
Only the paper's abstract was available here: the rank aggregation (mean rank) and the
extreme-weight rule (clip to mean +- k std) are our reading of it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from experiment.config import ExperimentConfig
from strategies.aggregation.reply_guard import ReplyLimits, claimed_partition, reply_problem
from strategies.post_training.base import PostTrainingInput
from strategies.post_training.pruning import prune_columns
from strategies.post_training.tau import TauView
from strategies.post_training.threshold import adaptive_threshold

RANKING_MESSAGE = "query.activation_ranking"
RANKING_METRICS = frozenset({"num-examples", "partition-id"})


def ranking_problem(reply: Message, inputs: int, limits: ReplyLimits) -> str | None:
    """Why a ranking reply must not count (None if it may): checked as a training reply is
    (reply_guard), with one int64 array `ranks` that is a permutation of 0..inputs-1 and the
    metrics `num-examples` (within its partition's size) and `partition-id`."""
    problem = reply_problem({"ranks": ((inputs,), np.dtype(np.int64))}, reply,
                            ReplyLimits(limits.example_caps, RANKING_METRICS), key="ranks")
    if problem is None and not np.array_equal(np.sort(reply.content["ranks"]["ranks"].numpy()), np.arange(inputs)):
        problem = f"ranks is not a ranking of the {inputs} inputs (a permutation of 0..{inputs - 1})"
    return problem


def aggregate_ranks(ranks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """clients x inputs ranks -> example-weighted mean rank per input."""
    return np.tensordot(weights / weights.sum(), ranks.astype(np.float64), axes=1)


def clip_extremes(w: torch.Tensor, pruned: torch.Tensor | np.ndarray, k: float) -> tuple[torch.Tensor, int]:
    """Clip tau's unpruned weights to mean +- k std (of the unpruned weights)."""
    if k <= 0:
        return w, 0
    pruned = torch.as_tensor(pruned, device=w.device)
    kept = w[:, ~pruned]
    if kept.numel() < 2:
        return w, 0
    low, high = kept.mean() - k * kept.std(), kept.mean() + k * kept.std()
    outside = ((w < low) | (w > high)) & ~pruned.unsqueeze(0)
    return torch.where(outside, w.clamp(low.item(), high.item()), w), int(outside.sum())


@dataclass(frozen=True)
class FedPruning:
    """Post-training defense: federated pruning with the clients' rankings (Wu et al. 2020)."""

    display_name: ClassVar[str] = "FedPruning"
    needs_clients: ClassVar[bool] = True  # an extra federated round asks them for rankings

    rate: float = ExperimentConfig.fedpruning_rate
    extreme: float = ExperimentConfig.fedpruning_extreme
    finetune_rounds: int = ExperimentConfig.fedpruning_finetune_rounds
    step: float = ExperimentConfig.flain_step
    rho: float = ExperimentConfig.flain_rho
    layer: str = ExperimentConfig.flain_layer
    timeout: float = 1800.0

    @staticmethod
    def note(result: dict[str, Any]) -> str:
        return f"pruned={result['pruned']}/{result.get('inputs', '?')}"

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> FedPruning:
        return cls(rate=cfg.fedpruning_rate, extreme=cfg.fedpruning_extreme,
                   finetune_rounds=cfg.fedpruning_finetune_rounds,
                   step=cfg.flain_step, rho=cfg.flain_rho, layer=cfg.flain_layer)

    def apply(self, inp: PostTrainingInput) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if inp.grid is None:
            raise RuntimeError("fedpruning asks the clients for rankings: it needs the Flower grid")
        started = time.perf_counter()
        tau = TauView.of(inp.model, self.layer, inp.aux_images, inp.aux_labels)
        z = tau.weight.shape[1]
        ranks, weights = self._collect_rankings(inp, tau.name, z)
        mean_rank = aggregate_ranks(ranks, weights) / max(z - 1, 1)  # in [0, 1]
        acc0 = tau.evaluate(tau.weight)
        if self.rate > 0:
            mask = np.zeros(z, dtype=bool)
            mask[np.argsort(mean_rank, kind="stable")[: math.ceil(self.rate * z)]] = True
        else:
            mask = adaptive_threshold(
                mean_rank, self.step, self.rho, acc0,
                lambda m: tau.evaluate(prune_columns(tau.weight, m)),
            ).mask
        pruned = torch.from_numpy(mask).to(tau.weight.device)
        weight, clipped = clip_extremes(prune_columns(tau.weight, pruned), pruned, self.extreme)
        state, aux_acc = tau.state_with(weight)
        if self.finetune_rounds:
            state = self._finetune(inp, state, tau.name, pruned.cpu())
        return state, {
            "layer": tau.name,
            "clients": int(len(weights)),
            "pruned": int(mask.sum()),
            "inputs": int(z),
            "clipped": clipped,
            "finetune_rounds": self.finetune_rounds,
            "aux_acc_before": acc0,
            "aux_acc_after_pruning": aux_acc,
            "search_seconds": time.perf_counter() - started,
        }

    def _collect_rankings(self, inp: PostTrainingInput, layer: str, inputs: int) -> tuple[np.ndarray, np.ndarray]:
        """Every client's ranking of tau's inputs and its example count; a malformed reply is
        refused and recorded in the strategy's failures, as a training reply is."""
        state = {k: v.detach().cpu().contiguous() for k, v in inp.model.state_dict().items()}
        content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"layer": layer})})
        messages = [Message(content=content, message_type=RANKING_MESSAGE, dst_node_id=node)
                    for node in inp.grid.get_node_ids()]
        limits = getattr(inp.strategy, "limits", None)
        if limits is None:
            raise RuntimeError("fedpruning needs the training strategy's reply limits to check the rankings")
        replies = []
        for reply in inp.grid.send_and_receive(messages, timeout=self.timeout):
            problem = reply.error.reason if reply.has_error() else ranking_problem(reply, inputs, limits)
            if problem is None:
                replies.append(reply)
            elif hasattr(inp.strategy, "record"):
                inp.strategy.record(inp.last_round, reply.metadata.src_node_id,
                                    "error" if reply.has_error() else "rejected", f"ranking query: {problem}",
                                    claimed=None if reply.has_error() else claimed_partition(reply, len(limits.example_caps)))
        if not replies:
            raise RuntimeError("fedpruning: no client answered the ranking query with a valid ranking")
        ranks = np.stack([r.content["ranks"]["ranks"].numpy() for r in replies])
        weights = np.array([float(r.content["metrics"]["num-examples"]) for r in replies])
        return ranks, weights

    def _finetune(self, inp: PostTrainingInput, state: dict[str, torch.Tensor], layer: str,
                  pruned: torch.Tensor) -> dict[str, torch.Tensor]:
        if inp.strategy is None:
            raise RuntimeError("fedpruning fine-tuning needs the training strategy")
        arrays = ArrayRecord(state)
        for r in range(1, self.finetune_rounds + 1):
            server_round = inp.last_round + r
            messages = inp.strategy.configure_train(server_round, arrays, ConfigRecord(), inp.grid)
            replies = inp.grid.send_and_receive(messages, timeout=self.timeout)
            new, _ = inp.strategy.aggregate_train(server_round, replies)
            state = (new or arrays).to_torch_state_dict()
            weight = state[f"{layer}.weight"]
            weight[:, pruned.to(weight.device)] = 0.0  # pruned inputs stay pruned
            arrays = ArrayRecord(state)
        return state
