"""A client that lies in its reply: each lie is fed to every aggregation rule beside honest
replies. Oracle: the rule's aggregate with the liar equals the same rule's aggregate over the
honest replies alone (the lie changed nothing), and the lie is recorded with node, partition
and reason. (A real run with a lying client is in test_simulation.py.)"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from experiment.config import ExperimentConfig
from strategies import AGGREGATIONS
from strategies.aggregation.reply_guard import TRAIN_METRICS, ReplyLimits, conform, metrics_problem
from tests.grids import LIMITS, LocalGrid, build_rule, train_metrics

N = 8  # Bulyan with krum-f=1 needs 7 replies: the honest ones without the liar
SHAPE = (2, 3)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _weights(partition: int) -> np.ndarray:
    return (1.0 + 0.1 * np.arange(6).reshape(SHAPE) * (partition + 1) / N).astype(np.float32)


def _honest(partition: int) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"w": Array(_weights(partition))}),
                       "metrics": train_metrics(10 + partition, partition)})


def _lie(case: str) -> RecordDict:
    """Partition 0's reply, made hostile in one way."""
    honest = _honest(0)
    arrays, metrics = honest["arrays"], honest["metrics"]
    one = Array(np.ones(1, np.float32))
    replace_metrics = {
        "examples-inf": {"num-examples": float("inf")},
        "examples-huge": {"num-examples": 1e300},
        "examples-negative": {"num-examples": -50.0},
        "examples-zero": {"num-examples": 0},
        "examples-nan": {"num-examples": float("nan")},
        "examples-over-partition": {"num-examples": LIMITS.example_caps[0] + 1},
        "partition-out-of-range": {"partition-id": 99},
        "partition-one-past-the-last": {"partition-id": 16},
        "partition-fractional": {"partition-id": 0.5},
        "loss-inf": {"train-loss": float("inf")},
    }
    if case in replace_metrics:
        return RecordDict({"arrays": arrays, "metrics": MetricRecord(dict(metrics) | replace_metrics[case])})
    if case == "extra-metric":
        return RecordDict({"arrays": arrays, "metrics": MetricRecord(dict(metrics) | {"extra": 1.0})})
    if case == "missing-examples":
        return RecordDict({"arrays": arrays, "metrics": MetricRecord(
            {k: v for k, v in metrics.items() if k != "num-examples"})})
    if case == "two-array-records":
        return RecordDict({"arrays": arrays, "more": ArrayRecord({"w": Array(_weights(0))}), "metrics": metrics})
    if case == "no-metric-record":
        return RecordDict({"arrays": arrays})
    if case == "two-metric-records":
        return RecordDict({"arrays": arrays, "metrics": metrics, "more": MetricRecord({"num-examples": 5})})
    if case == "config-record":
        return RecordDict({"arrays": arrays, "metrics": metrics, "cfg": ConfigRecord({"x": 1})})
    if case == "renamed-array-record":
        return RecordDict({"weights": arrays, "metrics": metrics})
    lies = {  # the arrays
        "declared-shape": Array(dtype="float32", shape=SHAPE, stype=one.stype, data=one.data),
        "float64": Array(_weights(0).astype(np.float64)),
        "int64": Array(np.ones(SHAPE, np.int64)),
        "bool": Array(np.ones(SHAPE, bool)),
        "complex-nan": Array(np.full(SHAPE, np.nan + 0j, np.complex64)),
        "nan": Array(np.full(SHAPE, np.nan, np.float32)),
        "inf": Array(np.full(SHAPE, -np.inf, np.float32)),
        "transposed": Array(_weights(0).T.copy()),
        "undecodable": Array(dtype="float32", shape=SHAPE, stype=one.stype, data=b"not an array"),
    }
    if case == "renamed-array":
        return RecordDict({"arrays": ArrayRecord({"v": Array(_weights(0))}), "metrics": metrics})
    return RecordDict({"arrays": ArrayRecord({"w": lies[case]}), "metrics": metrics})


CASES = ["examples-inf", "examples-huge", "examples-negative", "examples-zero", "examples-nan",
         "examples-over-partition", "partition-out-of-range", "partition-one-past-the-last",
         "partition-fractional", "loss-inf", "extra-metric",
         "missing-examples", "two-array-records", "no-metric-record", "two-metric-records", "config-record",
         "renamed-array-record", "declared-shape", "float64", "int64", "bool", "complex-nan", "nan", "inf",
         "transposed", "undecodable", "renamed-array"]

CAP = "is not allowed: must be 1..1000, the most its partition holds"
REASONS = {  # written by hand from each lie (16 partitions of at most 1000 examples: tests/grids.py)
    "examples-inf": "metric num-examples=inf is not a finite number",
    "examples-huge": f"num-examples=1e+300 {CAP}",
    "examples-negative": f"num-examples=-50.0 {CAP}",
    "examples-zero": f"num-examples=0 {CAP}",
    "examples-nan": "metric num-examples=nan is not a finite number",
    "examples-over-partition": f"num-examples=1001 {CAP}",
    "partition-out-of-range": "partition-id=99 is not a partition (0..15)",
    "partition-one-past-the-last": "partition-id=16 is not a partition (0..15)",
    "partition-fractional": "partition-id=0.5 is not a partition (0..15)",
    "loss-inf": "metric train-loss=inf is not a finite number",
    "extra-metric": "metrics differ from the expected keys: missing [], unexpected ['extra']",
    "missing-examples": "metrics differ from the expected keys: missing ['num-examples'], unexpected []",
    "two-array-records": "expected one ArrayRecord 'arrays', got ['arrays', 'more']",
    "no-metric-record": "expected one MetricRecord 'metrics', got []",
    "two-metric-records": "expected one MetricRecord 'metrics', got ['metrics', 'more']",
    "config-record": "unexpected ConfigRecords ['cfg']",
    "renamed-array-record": "expected one ArrayRecord 'arrays', got ['weights']",
    "declared-shape": "w has shape (1,), expected (2, 3)",
    "float64": "w has dtype float64, expected float32",
    "int64": "w has dtype int64, expected float32",
    "bool": "w has dtype bool, expected float32",
    "complex-nan": "w has dtype complex64, expected float32",  # the dtype is checked first
    "nan": "w holds NaN or Inf",
    "inf": "w holds NaN or Inf",
    "transposed": "w has shape (3, 2), expected (2, 3)",
    "undecodable": "w cannot be decoded: ValueError: ",  # then numpy's own words
    "renamed-array": "arrays differ from the model's: missing ['w'], unexpected ['v']",
}


def _strategy(name: str):
    cfg = ExperimentConfig.defaults(num_clients=N, aggregation=name, krum_f=1, multikrum_m=3, invariant_beta=0.2)
    return build_rule(name, cfg)


def _round(strategy, contents: dict[int, RecordDict]):
    """configure_train for N nodes, then the replies of the partitions in `contents`
    (node i + 1 serves partition i)."""
    sent = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))}),
                                         ConfigRecord(), LocalGrid(N)))
    by_node = {msg.metadata.dst_node_id: msg for msg in sent}
    return strategy.aggregate_train(1, [Message(content=c, reply_to=by_node[p + 1]) for p, c in contents.items()])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_a_lie_changes_nothing_and_is_recorded(name, case):
    # the oracle: the rule without the liar (fresh replies each time: Bulyan consumes its replies' arrays)
    expected, _ = _round(_strategy(name), {p: _honest(p) for p in range(1, N)})
    strategy = _strategy(name)
    arrays, _ = _round(strategy, {0: _lie(case), **{p: _honest(p) for p in range(1, N)}})
    assert arrays is not None
    got, want = arrays["w"].numpy(), expected["w"].numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want), (got, want)
    (failure,) = strategy.failures
    assert failure["kind"] == "rejected" and failure["node"] == 1 and failure["round"] == 1
    # never admitted: the partition its reply named, where it named one of this run's
    unnamed = {"no-metric-record", "partition-out-of-range", "partition-one-past-the-last", "partition-fractional"}
    assert failure["partition"] == (None if case in unnamed else 0)
    if case == "undecodable":
        assert failure["reason"].startswith(REASONS[case])
    else:
        assert failure["reason"] == REASONS[case]


@pytest.mark.parametrize("name", ["fedavg", "rlr", "invariant", "median"])
def test_an_honest_reply_at_the_cap_counts_fully(name):
    """The cap is not a filter on honest clients: 1000 examples (the cap) are admitted."""
    strategy = _strategy(name)
    contents = {p: _honest(p) for p in range(N)}
    contents[0] = RecordDict({"arrays": contents[0]["arrays"], "metrics": train_metrics(1000, 0)})
    arrays, _ = _round(strategy, contents)
    assert strategy.failures == [] and np.isfinite(arrays["w"].numpy()).all()


def test_fedavg_weights_by_examples_exactly():
    """Two replies, 10 and 30 examples, all weights 1 and 5: the mean is exactly 4."""
    strategy = AGGREGATIONS["fedavg"](ExperimentConfig.defaults(num_clients=2), frozenset(), LIMITS)
    sent = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))}),
                                         ConfigRecord(), LocalGrid(2)))
    replies = [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(np.full(SHAPE, v, np.float32))}),
                                           "metrics": train_metrics(n, msg.metadata.dst_node_id - 1)}),
                       reply_to=msg) for msg, (v, n) in zip(sent, [(1.0, 10), (5.0, 30)])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.array_equal(arrays["w"].numpy(), np.full(SHAPE, 4.0, np.float32))


def test_a_node_that_changes_its_partition_is_refused_and_named():
    strategy = _strategy("fedavg")
    _round(strategy, {p: _honest(p) for p in range(N)})  # round 1: node 1 serves partition 0
    sent = list(strategy.configure_train(2, ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))}),
                                         ConfigRecord(), LocalGrid(N)))
    node1 = next(m for m in sent if m.metadata.dst_node_id == 1)
    claim = RecordDict({"arrays": ArrayRecord({"w": Array(_weights(0))}),
                        "metrics": train_metrics(1000, 5)})  # the largest cap: partition 5's
    strategy.aggregate_train(2, [Message(content=claim, reply_to=node1)])
    (failure,) = strategy.failures
    assert failure["partition"] == 0 and "served partition 0 before" in failure["reason"]


@pytest.mark.parametrize("name", ["rlr", "invariant", "fedavg"])
def test_an_aggregate_beyond_float32_keeps_the_global_model(name):
    """Finite float32 replies near the type's limit whose aggregate is not finite in float32
    (RLR with eta 10 moves 10 x the mean update): the round is refused, recorded, and the
    model stays; a rule whose aggregate fits is unaffected."""
    cfg = ExperimentConfig.defaults(num_clients=3, aggregation=name, rlr_eta=10.0)
    strategy = build_rule(name, cfg)
    base = np.full(SHAPE, 3.0e38, np.float32)
    sent = list(strategy.configure_train(1, ArrayRecord({"w": Array(base)}), ConfigRecord(), LocalGrid(3)))
    replies = [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(np.full(SHAPE, 3.3e38, np.float32))}),
                                           "metrics": train_metrics(10, m.metadata.dst_node_id - 1)}), reply_to=m)
               for m in sent]
    arrays, metrics = strategy.aggregate_train(1, replies)
    if name == "rlr":
        assert arrays is None and metrics is None
        assert strategy.failures == [{"round": 1, "node": 0, "partition": None, "kind": "refused",
                                      "reason": "the aggregate's w holds NaN or Inf; the global model stays as it was"}]
    else:  # the mean of 3.3e38s is 3.3e38 (invariant: computed in float64, no overflow on the way)
        assert strategy.failures == []
        assert np.allclose(arrays["w"].numpy(), 3.3e38, rtol=1e-6, atol=0)


@pytest.mark.parametrize("metrics, reason", [
    ({"num-examples": 3, "partition-id": 1}, None),
    ({"num-examples": 4, "partition-id": 1}, "must be 1..3"),
    ({"num-examples": 8, "partition-id": 0}, None),
    ({"num-examples": 1, "partition-id": 2}, "not a partition (0..1)"),
    ({"num-examples": [1, 2], "partition-id": 0}, "not a finite number"),
    ({"num-examples": 1, "partition-id": 1}, None),  # the least a reply may train on
    ({"num-examples": 0.5, "partition-id": 1}, "must be 1..3"),
])
def test_caps_are_per_partition(metrics, reason):
    limits = ReplyLimits((8, 3), frozenset({"num-examples", "partition-id"}))
    problem = metrics_problem(MetricRecord(metrics), limits)
    assert problem is None if reason is None else reason in problem


def test_the_client_sends_exactly_the_metrics_the_server_expects():
    import ast
    from pathlib import Path

    from attacks.base import UPDATE_METRICS

    tree = ast.parse(Path("client/app.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    record = next(n for n in ast.walk(train) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "MetricRecord")
    keys = {k.value for k in record.args[0].keys if k is not None}
    assert keys | set(UPDATE_METRICS) == TRAIN_METRICS  # **attack.metrics(ctx) adds UPDATE_METRICS


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_a_scalar_buffer_keeps_its_shape_through_the_guard(name):
    """BatchNorm's num_batches_tracked is a 0-d int64 array: the aggregate the guard hands on
    must still be 0-d int64, or every client is refused next round."""
    cfg = ExperimentConfig.defaults(num_clients=N, aggregation=name, krum_f=1, multikrum_m=3, invariant_beta=0.2)
    strategy = build_rule(name, cfg, frozenset({"n"}))
    start = ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32)), "n": Array(np.array(3, np.int64))})
    sent = list(strategy.configure_train(1, start, ConfigRecord(), LocalGrid(N)))
    replies = [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(_weights(m.metadata.dst_node_id - 1)),
                                                                   "n": Array(np.array(5, np.int64))}),
                                           "metrics": train_metrics(10, m.metadata.dst_node_id - 1)}), reply_to=m)
               for m in sent]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.failures == []
    n = arrays["n"].numpy()
    assert n.shape == () and n.dtype == np.int64 and int(n) == 5


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_the_aggregate_does_not_depend_on_the_order_replies_arrive_in(name):
    """Replies reach the server in arrival order and Flower's FedAvg sums them in float32 in the
    order given: 3e7 + 1 - 3e7 is 0 or 1 depending on it (measured: 1.46875 against 1.5 without
    the guard's partition order). The same seed must give the same model."""
    values = np.array([3e7, 1.0, -3e7, 1.0, 0.5, 0.25, 3.0, 7.0], dtype=np.float32)

    def contents(order):
        return {p: RecordDict({"arrays": ArrayRecord({"w": Array(np.full(SHAPE, values[p], np.float32))}),
                               "metrics": train_metrics(10, p)}) for p in order}

    forward, _ = _round(_strategy(name), contents(range(N)))
    backward, _ = _round(_strategy(name), contents(reversed(range(N))))
    assert np.array_equal(forward["w"].numpy(), backward["w"].numpy())


def test_an_admitted_malicious_reply_is_logged_with_what_it_reports():
    """attack_log: round, node and every metric of a malicious reply but `malicious`;
    honest replies leave no entry."""
    strategy = _strategy("fedavg")
    contents = {p: _honest(p) for p in range(3)}
    contents[2] = RecordDict({"arrays": ArrayRecord({"w": Array(_weights(2))}),
                              "metrics": train_metrics(12, 2, malicious=1.0, poisoned=7.0, **{"update-norm": 0.5})})
    _round(strategy, contents)
    want = {key: 0.0 for key in TRAIN_METRICS if key != "malicious"} | {
        "num-examples": 12, "partition-id": 2, "poisoned": 7.0, "update-norm": 0.5}
    assert strategy.attack_log == [{"round": 1, "node": 3, **want}] and strategy.failures == []


def test_an_error_reply_is_recorded_and_left_to_flower():
    strategy = _strategy("fedavg")
    sent = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(SHAPE, np.float32))}),
                                         ConfigRecord(), LocalGrid(N)))
    by_node = {msg.metadata.dst_node_id: msg for msg in sent}
    replies = [Message(content=_honest(0), reply_to=by_node[1]),
               Message(error=Error(code=0, reason="node died"), reply_to=by_node[2])]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.array_equal(arrays["w"].numpy(), _weights(0))  # the one admitted reply
    assert strategy.failures == [{"round": 1, "node": 2, "partition": None, "kind": "error", "reason": "node died"}]


def test_a_reply_before_any_model_was_sent_is_refused():
    strategy = _strategy("fedavg")
    reply = Message(content=_honest(0), dst_node_id=0, message_type="train")
    assert strategy.admit(reply) == "no model was sent this round"


def test_uniform_limits_keep_the_metrics_they_are_given():
    assert ReplyLimits.uniform(3, 7, frozenset({"num-examples"})) == ReplyLimits((7, 7, 7), frozenset({"num-examples"}))
    assert ReplyLimits.uniform(2, 5) == ReplyLimits((5, 5), TRAIN_METRICS)


@pytest.mark.parametrize("examples, reason", [(1, None), (9, None), (10, "num-examples=10 is not allowed: must be 1..9, "
                                                                        "the most its partition holds")])
def test_without_partition_ids_the_largest_cap_holds(examples, reason):
    """A deployment whose replies name no partition: each is held to the largest partition's cap."""
    limits = ReplyLimits((5, 9, 2), frozenset({"num-examples"}))
    assert metrics_problem(MetricRecord({"num-examples": examples}), limits) == reason


# conform: the aggregate as the global model's own arrays (a float32 weight, an int64 counter)
SPECS = {"w": ((3,), np.dtype(np.float32)), "count": ((3,), np.dtype(np.int64))}


def _aggregate(**arrays) -> ArrayRecord:
    """Lists as float64 (as most of Flower's rules return them), arrays as they are."""
    return ArrayRecord({name: Array(values if isinstance(values, np.ndarray) else np.asarray(values, np.float64))
                        for name, values in arrays.items()})


def test_conform_casts_to_the_models_dtypes_and_rounds_counters_to_the_nearest():
    record, problem = conform(_aggregate(w=[0.5, -1.25, 3.0], count=[2.7, -1.2, 2.5]), SPECS)
    assert problem is None
    w, count = record["w"].numpy(), record["count"].numpy()
    assert w.dtype == np.float32 and np.array_equal(w, np.array([0.5, -1.25, 3.0], np.float32))
    assert count.dtype == np.int64 and count.tolist() == [3, -1, 2]  # 2.7 -> 3 (a cast alone gives 2); 2.5 -> 2 (to even)


@pytest.mark.parametrize("count", [[-2.0**63, 0, 0], [2.0**63 - 1024, 0, 0]])  # int64's ends, as float64 holds them
def test_conform_keeps_counters_at_the_ends_of_their_range(count):
    record, problem = conform(_aggregate(w=[0, 0, 0], count=count), SPECS)
    assert problem is None and record["count"].numpy().tolist() == [int(count[0]), 0, 0]


@pytest.mark.parametrize("arrays, reason", [
    ({"w": [0, 0, 0], "count": [0, 0, 0], "extra": [1, 2, 3]},
     "the aggregate's arrays differ from the model's: missing [], unexpected ['extra']"),
    ({"w": [0, 0, 0], "count": [float("nan"), 1, 2]}, "the aggregate's count holds NaN or Inf"),
    ({"w": [0, float("nan"), 0], "count": [0, 0, 0]}, "the aggregate's w holds NaN or Inf"),
    ({"w": np.array([0, 0, float("-inf")], np.float32), "count": [0, 0, 0]}, "the aggregate's w holds NaN or Inf"),
    ({"w": np.array([0, 1, 0], np.complex128), "count": [0, 0, 0]}, "the aggregate's w has dtype complex128, expected float32"),
    ({"w": [0, 0, 0], "count": np.array([1, float("inf"), 2], np.float32)}, "the aggregate's count holds NaN or Inf"),
    ({"w": [0, 0, 0], "count": np.array([1, 0, 2], np.complex64)},
     "the aggregate's count has dtype complex64, expected int64"),
    ({"w": [0, 0, 0], "count": np.array([2**64 - 1, 0, 0], np.uint64)}, "the aggregate's count is outside the range of int64"),
    ({"w": [0, 0, 0], "count": [2.0**63, 0, 0]}, "the aggregate's count is outside the range of int64"),
    ({"w": [0, 0, 0], "count": [0, -2.0**63 - 2048, 0]}, "the aggregate's count is outside the range of int64"),
    ({"w": [1e300, 0, 0], "count": [0, 0, 0]}, "the aggregate's w holds NaN or Inf"),
    ({"w": [0, 0, 0], "count": [0, 0]}, "the aggregate's count has shape (2,), expected (3,)"),
])
@pytest.mark.filterwarnings("error")
def test_conform_refuses_what_must_not_become_the_global_model(arrays, reason):
    """Each refusal says why, and none warns on the way (a cast that overflows to Inf, or a
    counter wrapped round to a finite wrong value, would)."""
    assert conform(_aggregate(**arrays), SPECS) == (None, reason)


@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int8, np.uint8])
def test_conform_keeps_integer_aggregates_exact_to_the_ends_of_the_range(dtype):
    """An aggregate already of integers (a rule that keeps them, or a median) is compared as
    integers: float64 cannot hold 2**63 - 1 or 2**64 - 1, yet they are the dtype's own values."""
    info = np.iinfo(dtype)
    specs = {"count": ((3,), np.dtype(dtype))}
    counters = np.array([info.min, info.max, 7], dtype)
    record, problem = conform(_aggregate(count=counters), specs)
    assert problem is None and record["count"].numpy().tolist() == [int(info.min), int(info.max), 7]


@pytest.mark.filterwarnings("error")
def test_conform_holds_a_float16_aggregate_to_the_counters_range():
    """60000 is one of float16's values, past int8's range and within int32's (comparing in
    float16 itself would overflow int32's bound to Inf, and warn)."""
    counters = _aggregate(count=np.array([0, 2.5, 60000], np.float16))
    assert conform(counters, {"count": ((3,), np.dtype(np.int8))}) == (
        None, "the aggregate's count is outside the range of int8")
    record, problem = conform(counters, {"count": ((3,), np.dtype(np.int32))})
    assert problem is None and record["count"].numpy().tolist() == [0, 2, 60000]


def test_conform_keeps_an_aggregate_already_of_the_models_dtype():
    specs = {"flag": ((2,), np.dtype(np.bool_)), "w": ((2,), np.dtype(np.float32))}
    arrays = {"flag": np.array([True, False]), "w": np.array([0.25, -3.0], np.float32)}
    record, problem = conform(_aggregate(**arrays), specs)
    assert problem is None
    assert record["flag"].numpy().tolist() == [True, False] and record["flag"].numpy().dtype == np.bool_
    assert np.array_equal(record["w"].numpy(), arrays["w"]) and record["w"].numpy().dtype == np.float32


def test_conform_rounds_and_range_checks_aggregates_of_other_dtypes():
    specs = {"count": ((3,), np.dtype(np.int64))}
    # unsigned, holding int64's largest value: exact as an integer (through float64 it is 2**63, out of range)
    record, problem = conform(_aggregate(count=np.array([2**63 - 1, 0, 5], np.uint64)), specs)
    assert problem is None and record["count"].numpy().tolist() == [2**63 - 1, 0, 5]
    # float32, rounded to the nearest (a cast alone gives 2, 0, 1)
    record, problem = conform(_aggregate(count=np.array([2.7, -0.6, 1.5], np.float32)), specs)
    assert problem is None and record["count"].numpy().tolist() == [3, -1, 2]


def test_conform_passes_an_empty_counter():
    specs = {"count": ((0,), np.dtype(np.int64))}
    record, problem = conform(_aggregate(count=np.zeros(0)), specs)
    assert problem is None and record["count"].numpy().dtype == np.int64 and record["count"].numpy().shape == (0,)


def test_conform_holds_an_int32_counter_to_int32s_range():
    specs = {"count": ((2,), np.dtype(np.int32))}
    record, problem = conform(_aggregate(count=[2.0**31 - 1, -2.0**31]), specs)
    assert problem is None and record["count"].numpy().tolist() == [2**31 - 1, -2**31]
    assert conform(_aggregate(count=[2.0**31, 0]), specs) == (None, "the aggregate's count is outside the range of int32")
