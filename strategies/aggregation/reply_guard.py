"""Keep bad client replies out of every aggregation rule.

A reply whose arrays do not match what the server sent (missing or extra keys, other
shapes) or hold NaN/Inf is rejected and logged, never aggregated; replies that carry an
error (the client crashed, or its node died) are logged too, and so are rounds a rule
refuses (`FailureLog.record`). All end up in summary.json's `client_failures`, so a run
shows which rounds and nodes failed. What malicious clients report about their attack
(update norms, masked shares; see attacks/base.py) is kept per reply for `attack_log`.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


def reply_problem(sent: ArrayRecord, reply: Message, key: str = "arrays") -> str | None:
    """Why `reply` must not be aggregated (None if it may)."""
    if key not in reply.content.array_records:
        return f"no '{key}' ArrayRecord in the reply"
    got = reply.content.array_records[key]
    if set(got) != set(sent):
        missing, extra = sorted(set(sent) - set(got)), sorted(set(got) - set(sent))
        return f"arrays differ from the model's: missing {missing}, unexpected {extra}"
    for name, array in got.items():
        if tuple(array.shape) != tuple(sent[name].shape):
            return f"{name} has shape {tuple(array.shape)}, expected {tuple(sent[name].shape)}"
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"{name} holds NaN or Inf"
    return None


class FailureLog:
    """Mixin: the failures of a run, {round, node, kind, reason} (node 0: the server)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: list[dict[str, Any]] = []

    def record(self, server_round: int, node: int, kind: str, reason: str) -> None:
        self.failures.append({"round": server_round, "node": int(node), "kind": kind, "reason": str(reason)})


class ReplyGuard(FailureLog):
    """Mixin before a Flower strategy: drops malformed replies before it aggregates."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sent_for_check: ArrayRecord | None = None
        self.attack_log: list[dict[str, Any]] = []  # {round, node, metrics...} of malicious replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent_for_check = arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.record(server_round, node, "error", reply.error.reason)
                kept.append(reply)  # the base rule skips and logs errors itself
                continue
            problem = reply_problem(self._sent_for_check, reply) if self._sent_for_check else None
            if problem is None:
                kept.append(reply)
                metrics = reply.content.metric_records.get("metrics", {})
                if metrics.get("malicious"):
                    self.attack_log.append({"round": server_round, "node": int(node),
                                            **{k: v for k, v in metrics.items() if k != "malicious"}})
            else:
                log(WARNING, "round %d: rejected reply from node %d: %s", server_round, node, problem)
                self.record(server_round, node, "rejected", problem)
        return super().aggregate_train(server_round, kept)  # type: ignore[misc]


@cache
def guarded(base: type[Strategy]) -> type[Strategy]:
    """Flower strategy `base` with the reply guard in front (GuardedFedAvg, ...)."""
    return type(f"Guarded{base.__name__}", (ReplyGuard, base), {})
