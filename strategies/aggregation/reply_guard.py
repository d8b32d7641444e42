"""Keep bad client replies out of every aggregation rule.

A client's reply is untrusted input. It is admitted only if it has exactly one ArrayRecord
whose arrays decode to exactly the global model's keys, shapes and dtypes with finite values,
and exactly one MetricRecord with exactly the keys our clients send, every value a finite
number, a `partition-id` the node keeps from round to round, and `num-examples` (the FedAvg
weight) in 1..the most that partition holds (the server computes partition sizes from the
same split the clients use; `max-examples` caps them in a deployment whose clients hold
their own data). Anything else is refused, logged, and never aggregated; replies that carry
an error (the client crashed, or its node died) are logged too, and so are rounds a rule
refuses and aggregates that are not finite or put an integer buffer out of its range (the
global model then stays as it was). All end up in summary.json's `client_failures` with the
node and its partition. What malicious clients report about their attack (update norms,
masked shares; see attacks/base.py) is kept per reply for `attack_log`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from attacks.base import UPDATE_METRICS

# what every training reply of our ClientApp says about itself (client/app.py sends them)
TRAIN_METRICS = frozenset({"num-examples", "train-loss", "malicious", "poisoned", "partition-id", *UPDATE_METRICS})


@dataclass(frozen=True)
class ReplyLimits:
    """What a reply may claim: its metric keys, and per partition id the most examples it holds."""

    example_caps: tuple[int, ...]
    metrics: frozenset[str] = field(default=TRAIN_METRICS)

    @classmethod
    def uniform(cls, partitions: int, cap: int, metrics: frozenset[str] = TRAIN_METRICS) -> ReplyLimits:
        return cls(tuple([cap] * partitions), metrics)


Specs = dict[str, tuple[tuple[int, ...], np.dtype]]  # array name -> (shape, dtype)


def array_specs(record: ArrayRecord) -> Specs:
    """The keys, shapes and dtypes of a record the server made itself (its declared ones are true)."""
    return {name: (tuple(array.shape), np.dtype(array.dtype)) for name, array in record.items()}


def arrays_problem(specs: Specs, got: ArrayRecord) -> str | None:
    """Why `got` is not an array record of exactly `specs`' keys, shapes and dtypes with
    finite values (None if it is). Shapes and dtypes are those of the DECODED arrays: an
    Array's declared shape is the sender's word."""
    if set(got) != set(specs):
        missing, extra = sorted(set(specs) - set(got)), sorted(set(got) - set(specs))
        return f"arrays differ from the model's: missing {missing}, unexpected {extra}"
    for name, array in got.items():
        shape, dtype = specs[name]
        try:
            values = array.numpy()
        except Exception as exc:  # noqa: BLE001 - whatever the bytes are, they are not our array
            return f"{name} cannot be decoded: {type(exc).__name__}: {exc}"
        if values.dtype != dtype:
            return f"{name} has dtype {values.dtype}, expected {dtype}"
        if tuple(values.shape) != tuple(shape):
            return f"{name} has shape {tuple(values.shape)}, expected {tuple(shape)}"
        if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
            return f"{name} holds NaN or Inf"
    return None


def metrics_problem(metrics: MetricRecord, limits: ReplyLimits) -> str | None:
    """Why `metrics` is not exactly what a client may report (None if it is)."""
    if set(metrics) != limits.metrics:
        missing, extra = sorted(limits.metrics - set(metrics)), sorted(set(metrics) - limits.metrics)
        return f"metrics differ from the expected keys: missing {missing}, unexpected {extra}"
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"metric {key}={value!r} is not a finite number"
    partition = metrics.get("partition-id")
    if partition is not None and (partition != int(partition) or not 0 <= partition < len(limits.example_caps)):
        return f"partition-id={partition!r} is not a partition (0..{len(limits.example_caps) - 1})"
    examples = metrics["num-examples"]
    cap = limits.example_caps[int(partition)] if partition is not None else max(limits.example_caps)
    if not 1 <= examples <= cap:
        return f"num-examples={examples!r} is not allowed: must be 1..{cap}, the most its partition holds"
    return None


def reply_problem(sent: Specs, reply: Message, limits: ReplyLimits, key: str = "arrays") -> str | None:
    """Why `reply` must not be aggregated (None if it may)."""
    content = reply.content
    if list(content.array_records) != [key]:
        return f"expected one ArrayRecord '{key}', got {sorted(content.array_records)}"
    if list(content.metric_records) != ["metrics"]:
        return f"expected one MetricRecord 'metrics', got {sorted(content.metric_records)}"
    if content.config_records:
        return f"unexpected ConfigRecords {sorted(content.config_records)}"
    return arrays_problem(sent, content.array_records[key]) or metrics_problem(content.metric_records["metrics"], limits)


def cast_to(values: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray | None, str | None]:
    """`values` (an aggregate's array) in `dtype`, integers rounded to the nearest; or None and
    why not: not finite, not real numbers, or out of an integer dtype's range (a plain cast
    would wrap them round to a finite, wrong count). A float overflow becomes Inf, for the
    caller's finiteness check."""
    if np.issubdtype(values.dtype, np.inexact) and not np.isfinite(values).all():
        return None, "holds NaN or Inf"
    if values.dtype == dtype:
        return values, None
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        return None, f"has dtype {values.dtype}, expected {dtype}"
    if not np.issubdtype(dtype, np.integer):
        with np.errstate(over="ignore"):
            return values.astype(dtype), None
    if np.issubdtype(values.dtype, np.floating):
        values = np.rint(values)
    info = np.iinfo(dtype)
    # compared as Python integers: exact at both ends (float64 holds 2**63 - 1 as 2**63), in any dtype
    if values.size and not (info.min <= int(values.min()) and int(values.max()) <= info.max):
        return None, f"is outside the range of {dtype}"
    return values.astype(dtype), None


def conform(arrays: ArrayRecord, sent: Specs) -> tuple[ArrayRecord | None, str | None]:
    """The aggregate cast to the model's own dtypes (some of Flower's rules return float64,
    e.g. Bulyan for integer counters; `cast_to`), or None and why it must not replace the
    global model: what `cast_to` refuses, or what `arrays_problem` refuses in a reply (other
    keys or shapes, values that are not finite in the model's dtype)."""
    out = {}
    for name, array in arrays.items():
        values = array.numpy()
        if name in sent:  # (another name: refused below)
            values, problem = cast_to(values, sent[name][1])
            if problem is not None:
                return None, f"the aggregate's {name} {problem}"
        out[name] = Array(np.array(values, order="C"))  # (ascontiguousarray would make a 0-d array 1-d)
    record = ArrayRecord(out)
    problem = arrays_problem(sent, record)
    return (None, f"the aggregate's {problem}") if problem else (record, None)


def claimed_partition(reply: Message, partitions: int) -> int | None:
    """The partition id a reply names in its metrics, if it is one of 0..partitions-1."""
    record = reply.content.metric_records.get("metrics")
    value = record.get("partition-id") if record is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < partitions else None


class FailureLog:
    """Mixin: the failures of a run, {round, node, partition, kind, reason} (node 0: the
    server). `partition` is the one the node served in an admitted reply, else the one its
    refused reply named (when that is a partition id at all), else None."""

    RESUMABLE = ("failures",)  # strategies/resume.py: kept in a checkpoint

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: list[dict[str, Any]] = []
        self.partitions: dict[int, int] = {}  # Flower node id -> the partition id it serves

    def record(self, server_round: int, node: int, kind: str, reason: str, claimed: int | None = None) -> None:
        partition = self.partitions.get(int(node), claimed)
        self.failures.append({"round": server_round, "node": int(node), "partition": partition,
                              "kind": kind, "reason": str(reason)})


class ReplyGuard(FailureLog):
    """Mixin before a Flower strategy: drops malformed replies before it aggregates, and
    keeps the global model when the aggregate is not finite."""

    RESUMABLE = ("attack_log",)

    def __init__(self, *args: Any, limits: ReplyLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._sent_for_check: Specs | None = None
        self.attack_log: list[dict[str, Any]] = []  # {round, node, metrics...} of malicious replies

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent_for_check = array_specs(arrays)
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def admit(self, reply: Message) -> str | None:
        """Why `reply` is refused (None: admitted, and its node's partition remembered)."""
        if self._sent_for_check is None:
            return "no model was sent this round"
        problem = reply_problem(self._sent_for_check, reply, self.limits)
        if problem is not None:
            return problem
        node = int(reply.metadata.src_node_id)
        partition = int(reply.content.metric_records["metrics"]["partition-id"])
        known = self.partitions.setdefault(node, partition)
        if known != partition:
            return f"partition-id={partition} but this node served partition {known} before"
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.record(server_round, node, "error", reply.error.reason)
                kept.append(reply)  # the base rule skips and logs errors itself
                continue
            problem = self.admit(reply)
            if problem is None:
                kept.append(reply)
                metrics = reply.content.metric_records["metrics"]
                if metrics["malicious"]:
                    self.attack_log.append({"round": server_round, "node": int(node),
                                            **{k: v for k, v in metrics.items() if k != "malicious"}})
            else:
                log(WARNING, "round %d: rejected reply from node %d: %s", server_round, node, problem)
                self.record(server_round, node, "rejected", problem,
                            claimed=claimed_partition(reply, len(self.limits.example_caps)))
        # Flower's FedAvg sums the replies in float32 in the order given: in arrival order the same
        # seed gave different models. Partition order is the run's own.
        kept.sort(key=lambda r: (r.has_error(), 0 if r.has_error() else self.partitions[int(r.metadata.src_node_id)]))
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        if arrays is None or self._sent_for_check is None:
            return arrays, metrics
        arrays, problem = conform(arrays, self._sent_for_check)
        if problem is not None:
            problem += "; the global model stays as it was"
            log(WARNING, "round %d: %s", server_round, problem)
            self.record(server_round, 0, "refused", problem)
            return None, None
        return arrays, metrics


@cache
def guarded(base: type[Strategy]) -> type[Strategy]:
    """Flower strategy `base` with the reply guard in front (GuardedFedAvg, ...)."""
    return type(f"Guarded{base.__name__}", (ReplyGuard, base), {})
