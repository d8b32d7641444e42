"""Base for aggregation rules that act on client updates (client - global), per tensor.

Flower's `aggregate_train` is not given the arrays the round started from, so
`configure_train` keeps them. BatchNorm buffers (running mean/var, num_batches_tracked)
are statistics, not learned by gradient: they are never sign-flipped or masked; float
buffers get the example-weighted mean (as FedAvg), integer counters the maximum.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation.reply_guard import FailureLog


def aggregate_buffer(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """clients x ... -> one buffer: weighted mean for floats, max for integer counters."""
    if np.issubdtype(values.dtype, np.integer):
        return values.max(axis=0)
    return np.tensordot(weights / weights.sum(), values, axes=1).astype(values.dtype)


@dataclass
class Combined:
    """One round's aggregate as a rule decides it."""

    steps: dict[str, np.ndarray]  # parameter name -> global step (float64)
    buffer_weights: np.ndarray  # per client, for the BatchNorm statistics (0: left out)
    log: dict[str, Any] = field(default_factory=dict)  # what the rule did (summary.json: defense_log)
    refusal: str | None = None  # set: the global model stays, and this is recorded


class DeltaStrategy(FailureLog, FedAvg):
    """FedAvg whose parameter aggregation is `global + step(updates, weights)`."""

    RESUMABLE = ("defense_log",)

    def __init__(self, *args: Any, buffer_keys: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer_keys = frozenset(buffer_keys)
        self._sent: ArrayRecord | None = None
        self.defense_log: list[dict[str, Any]] = []  # per round: what the rule did (whole-model rules)

    def step(self, updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """clients x shape updates, client weights -> the global step (shape)."""
        raise NotImplementedError

    def refusal(self, replies: int) -> str | None:
        """Why this rule cannot aggregate a round with `replies` valid replies (None: it can)."""
        return None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self._sent is None:
            return None, None
        if (reason := self.refusal(len(valid))) is not None:
            # The global model stays as it was; the run goes on and the summary says why.
            log(WARNING, "round %d refused by %s: %s", server_round, type(self).__name__, reason)
            self.record(server_round, 0, "refused", reason)
            return None, None
        contents = [msg.content for msg in valid]
        metrics = [next(iter(c.metric_records.values())) for c in contents]
        weights = np.array([float(m[self.weighted_by_key]) for m in metrics])
        records = [next(iter(c.array_records.values())) for c in contents]
        base = {key: sent.numpy() for key, sent in self._sent.items()}
        # in float64: finite float32 replies near the type's limit must not overflow in the
        # step; a result beyond float32 becomes Inf, which the reply guard refuses
        updates = {key: np.stack([r[key].numpy() for r in records]).astype(np.float64) - base[key].astype(np.float64)
                   for key in base if key not in self.buffer_keys}
        partitions = [int(m["partition-id"]) if "partition-id" in m else i for i, m in enumerate(metrics)]
        combined = self.combine(server_round, updates, weights, partitions)
        if combined.refusal is not None:
            log(WARNING, "round %d refused by %s: %s", server_round, type(self).__name__, combined.refusal)
            self.record(server_round, 0, "refused", combined.refusal)
            return None, None
        if combined.log:
            self.defense_log.append({"round": server_round, **combined.log})
        out: dict[str, Array] = {}
        for key, sent in base.items():
            if key in self.buffer_keys:
                clients = np.stack([r[key].numpy() for r in records])
                out[key] = Array(np.asarray(aggregate_buffer(clients, combined.buffer_weights)))
                continue
            with np.errstate(over="ignore"):
                out[key] = Array(np.asarray((sent.astype(np.float64) + combined.steps[key]).astype(sent.dtype)))
        return ArrayRecord(out), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def combine(self, server_round: int, updates: dict[str, np.ndarray], weights: np.ndarray,
                partitions: list[int]) -> Combined:
        """The global step of every parameter (`step`, tensor by tensor; whole-model rules
        override this), the clients' weights for the BatchNorm statistics, what was done."""
        return Combined({key: self.step(u, weights) for key, u in updates.items()}, weights)

    def settings(self) -> dict[str, str]:
        """The rule's own settings, for Flower's start-up log."""
        return {}

    def summary(self) -> None:
        """Log the rule's settings, then FedAvg's, as Flower's own strategies do."""
        items = {**self.settings(),
                 "BatchNorm buffers": f"{len(self.buffer_keys)}, weighted mean (integer counters: max), never flipped"}
        log(INFO, "\t├──> %s settings:", type(self).__name__.removeprefix("Guarded"))
        for i, (name, value) in enumerate(items.items()):
            log(INFO, "\t│\t%s %s: %s", "└──" if i == len(items) - 1 else "├──", name, value)
        super().summary()


class WholeModelRule(DeltaStrategy):
    """Rules that judge each client by its whole update (norms and cosines over every
    parameter, BatchNorm buffers left out): `judge` gets clients x D updates (float64) and
    returns the D-dimensional global step."""

    def judge(self, server_round: int, updates: np.ndarray, weights: np.ndarray,
              partitions: list[int]) -> Combined:
        """`Combined` whose `steps` holds the flat step under the key "" (split back here)."""
        raise NotImplementedError

    def combine(self, server_round: int, updates: dict[str, np.ndarray], weights: np.ndarray,
                partitions: list[int]) -> Combined:
        keys = list(updates)
        flat = np.concatenate([updates[k].reshape(len(weights), -1) for k in keys], axis=1)
        judged = self.judge(server_round, flat, weights, partitions)
        if judged.refusal is not None:
            return judged
        step, steps, start = judged.steps[""], {}, 0
        for key in keys:
            size = int(np.prod(updates[key].shape[1:], dtype=np.int64))
            steps[key] = step[start:start + size].reshape(updates[key].shape[1:])
            start += size
        return Combined(steps, judged.buffer_weights, judged.log)
