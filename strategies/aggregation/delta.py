"""Base for aggregation rules that act on client updates (client - global), per tensor.

Flower's `aggregate_train` is not given the arrays the round started from, so
`configure_train` keeps them. BatchNorm buffers (running mean/var, num_batches_tracked)
are statistics, not learned by gradient: they are never sign-flipped or masked; float
buffers get the example-weighted mean (as FedAvg), integer counters the maximum.
"""

from __future__ import annotations

from collections.abc import Iterable
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


class DeltaStrategy(FailureLog, FedAvg):
    """FedAvg whose parameter aggregation is `global + step(updates, weights)`."""

    def __init__(self, *args: Any, buffer_keys: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buffer_keys = frozenset(buffer_keys)
        self._sent: ArrayRecord | None = None

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
        weights = np.array(
            [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        )
        records = [next(iter(c.array_records.values())) for c in contents]
        out: dict[str, Array] = {}
        for key, sent in self._sent.items():
            base = sent.numpy()
            clients = np.stack([r[key].numpy() for r in records])
            if key in self.buffer_keys:
                out[key] = Array(np.asarray(aggregate_buffer(clients, weights)))
                continue
            # in float64: finite float32 replies near the type's limit must not overflow in the
            # step; a result beyond float32 becomes Inf, which the reply guard refuses
            wide = base.astype(np.float64)
            with np.errstate(over="ignore"):
                new = (wide + self.step(clients.astype(np.float64) - wide, weights)).astype(base.dtype)
            out[key] = Array(np.asarray(new))
        return ArrayRecord(out), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

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
