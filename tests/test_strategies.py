"""Every aggregation rule, built from the registry, aggregating real Flower replies.

(The whole loop over a real simulation is in test_simulation.py.)"""


import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from experiment.config import ExperimentConfig
from strategies import AGGREGATIONS
from tests.grids import LIMITS, LocalGrid, build_rule, train_metrics

N = 7  # enough clients for Bulyan with krum-f=1 (n >= 4f + 3)


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _state(w: np.ndarray, mean: float, count: int) -> ArrayRecord:
    return ArrayRecord({
        "fc.weight": Array(w.astype(np.float32)),
        "bn.running_mean": Array(np.full(2, mean, dtype=np.float32)),
        "bn.num_batches_tracked": Array(np.array(count, dtype=np.int64)),
    })


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_rule_aggregates_replies(name):
    cfg = ExperimentConfig.defaults(num_clients=N, aggregation=name, krum_f=1, multikrum_m=3, invariant_beta=0.2)
    buffers = frozenset({"bn.running_mean", "bn.num_batches_tracked"})
    strategy = build_rule(name, cfg, buffers)
    start = np.zeros((2, 3))
    sent = list(strategy.configure_train(1, _state(start, 0.0, 0), ConfigRecord(), LocalGrid(N)))
    assert len(sent) == N  # every client, every round
    rng = np.random.default_rng(0)
    replies = []
    for i, msg in enumerate(sent):
        w = 1.0 + 0.1 * rng.standard_normal((2, 3))  # honest clients agree: about +1
        if i == 0:
            w = -50.0 * np.ones((2, 3))  # one outlier
        content = RecordDict({"arrays": _state(w, float(i), 10 + i), "metrics": train_metrics(100, msg.metadata.dst_node_id - 1)})
        replies.append(Message(content=content, reply_to=msg))
    arrays, metrics = strategy.aggregate_train(1, replies)
    w = arrays["fc.weight"].numpy()
    assert w.shape == (2, 3) and np.all(np.isfinite(w))
    if name == "fedavg":
        assert np.all(w < 0)  # the outlier drags the plain mean below zero
    elif name == "foolsgold":
        # built against sybils, not a lone outlier: honest clients that agree look like
        # sybils to it (weight 0), and the one unlike everyone gets all the weight
        assert np.array_equal(w, np.full((2, 3), -50.0, np.float32))
    elif name == "rlr":
        # 6 of 7 signs agree (|sum sign| = 5 >= theta 3): +mean step, still dragged by the outlier
        assert np.allclose(w, np.mean([r.content["arrays"]["fc.weight"].numpy() for r in replies], axis=0))
    else:
        assert np.all(w > 0.5), name  # robust rules resist the single outlier
    if name in ("rlr", "invariant"):  # update-based rules keep BN statistics out of the rule
        assert np.allclose(arrays["bn.running_mean"].numpy(), np.mean(range(N)))
        assert arrays["bn.num_batches_tracked"].numpy() == 10 + N - 1
    assert set(arrays) == {"fc.weight", "bn.running_mean", "bn.num_batches_tracked"}


@pytest.mark.parametrize("bad,reason", [
    ({"fc.weight": np.full((2, 3), np.nan)}, "NaN or Inf"),
    ({"fc.weight": np.full((2, 3), np.inf)}, "NaN or Inf"),
    ({"fc.weight": np.ones((3, 2))}, "shape (3, 2)"),
    ({"other": np.ones((2, 3))}, "missing ['fc.weight']"),
])
@pytest.mark.parametrize("name", ["fedavg", "rlr", "median"])
def test_malformed_replies_are_rejected_not_aggregated(name, bad, reason):
    cfg = ExperimentConfig.defaults(num_clients=N, aggregation=name)
    strategy = AGGREGATIONS[name](cfg, frozenset(), LIMITS)
    sent = list(strategy.configure_train(1, ArrayRecord({"fc.weight": Array(np.zeros((2, 3), np.float32))}),
                                         ConfigRecord(), LocalGrid(N)))
    replies = []
    for i, msg in enumerate(sent):
        arrays = {k: v.astype(np.float32) for k, v in bad.items()} if i == 0 else {"fc.weight": np.ones((2, 3), np.float32)}
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "metrics": train_metrics(10, msg.metadata.dst_node_id - 1)})
        replies.append(Message(content=content, reply_to=msg))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["fc.weight"].numpy(), 1.0)  # only the good replies count
    assert len(strategy.failures) == 1
    failure = strategy.failures[0]
    assert failure["round"] == 1 and failure["kind"] == "rejected" and reason in failure["reason"]
    assert failure["node"] == sent[0].metadata.dst_node_id


def _replies(strategy, n_sent: int, n_replies: int, value: float = 1.0):
    sent = list(strategy.configure_train(1, ArrayRecord({"fc.weight": Array(np.zeros((2, 3), np.float32))}),
                                         ConfigRecord(), LocalGrid(n_sent)))
    replies = []
    for i, msg in enumerate(sent[:n_replies]):
        content = RecordDict({"arrays": ArrayRecord({"fc.weight": Array(np.full((2, 3), value, np.float32))}),
                              "metrics": train_metrics(10, msg.metadata.dst_node_id - 1)})
        replies.append(Message(content=content, reply_to=msg))
    return replies


def test_rlr_theta_follows_the_replies_of_the_round():
    """10 clients, 5 replies that all agree: auto theta is a majority of the 5 (3), so the
    model moves WITH the mean update (theta 6 from num-clients would reverse it)."""
    cfg = ExperimentConfig.defaults(num_clients=10, aggregation="rlr")
    strategy = AGGREGATIONS["rlr"](cfg, frozenset(), LIMITS)
    arrays, _ = strategy.aggregate_train(1, _replies(strategy, 10, 5))
    assert np.allclose(arrays["fc.weight"].numpy(), 1.0)
    assert strategy.failures == []


def test_rlr_fixed_theta_above_the_replies_refuses_the_round():
    cfg = ExperimentConfig.defaults(num_clients=N, aggregation="rlr", rlr_theta=6)
    strategy = AGGREGATIONS["rlr"](cfg, frozenset(), LIMITS)
    arrays, metrics = strategy.aggregate_train(1, _replies(strategy, N, 5))
    assert arrays is None and metrics is None  # Flower keeps the global model as it was
    (failure,) = strategy.failures
    assert failure["kind"] == "refused" and "rlr-theta=6 but only 5 replies" in failure["reason"]
    arrays, _ = strategy.aggregate_train(2, _replies(strategy, N, 6))  # 6 replies: theta reachable
    assert np.allclose(arrays["fc.weight"].numpy(), 1.0) and len(strategy.failures) == 1


def test_a_fixed_rlr_theta_is_logged_as_given(caplog):
    caplog.set_level("INFO", logger="flwr")
    cfg = ExperimentConfig.defaults(num_clients=N, aggregation="rlr", rlr_theta=5, rlr_eta=0.5)
    AGGREGATIONS["rlr"](cfg, frozenset(), LIMITS).summary()
    assert "theta: 5" in caplog.text and "eta: 0.5" in caplog.text and "auto" not in caplog.text


@pytest.mark.parametrize("name,expected", [("rlr", ["RobustLR settings", "theta: auto", "eta: 1.0"]),
                                           ("invariant", ["InvariantAggregator settings",
                                                          "sign-agreement threshold: 0.6", "trimmed-mean beta: 0.1"])])
def test_own_rules_describe_themselves_in_flowers_startup_log(name, expected, caplog):
    caplog.set_level("INFO", logger="flwr")
    AGGREGATIONS[name](ExperimentConfig.defaults(num_clients=N, aggregation=name), frozenset({"bn.x"}), LIMITS).summary()
    text = caplog.text
    for fragment in expected + ["BatchNorm buffers: 1", "Fraction: train (1.00)"]:
        assert fragment in text, (fragment, text)
    logged = [r.getMessage() for r in caplog.records]
    start = logged.index(f"\t├──> {expected[0]}:")  # the class name without the reply guard's "Guarded"
    assert logged[start + len(expected)] == "\t│\t└── BatchNorm buffers: 1, weighted mean (integer counters: max), never flipped"
    assert all(line.startswith("\t│\t├── ") for line in logged[start + 1:start + len(expected)])


@pytest.mark.parametrize("name", ["rlr", "invariant"])
def test_update_rules_weigh_replies_by_their_examples_exactly(name):
    """Three replies with 10, 10 and 20 examples (weights 1/4, 1/4, 1/2; binary fractions,
    so the expected arrays are exact). RLR with theta 3 (the default would be 2, a majority):
    coordinates whose signs sum to |3| step by the weighted mean update, the others against it; the invariant
    rule (threshold 0.3, no trimming) steps by the plain mean where signs agree. The BN
    statistic is the examples-weighted mean, the counter the maximum."""
    updates = np.array([[[0.5, 0.25, -1.0], [0.0, 2.0, -0.5]],
                        [[0.25, -0.5, -1.0], [1.0, 2.0, 0.5]],
                        [[0.5, 0.25, 1.0], [1.0, -2.0, 0.5]]])
    examples = [10, 10, 20]
    start = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    cfg = ExperimentConfig.defaults(num_clients=3, aggregation=name, rlr_theta=3, invariant_threshold=0.3,
                                    invariant_beta=0.0)
    strategy = AGGREGATIONS[name](cfg, frozenset({"bn.running_mean", "bn.num_batches_tracked"}), LIMITS)
    sent = list(strategy.configure_train(1, _state(start, 0.0, 0), ConfigRecord(), LocalGrid(3)))
    replies = [Message(content=RecordDict({"arrays": _state(start + u, float(i), 5 + i),
                                           "metrics": train_metrics(n, msg.metadata.dst_node_id - 1)}),
                       reply_to=msg) for i, (msg, u, n) in enumerate(zip(sent, updates, examples))]
    arrays, _ = strategy.aggregate_train(1, replies)
    if name == "rlr":
        # weighted means [[.4375, .0625, 0], [.75, 0, .25]]; |sum of signs| [[3, 1, 1], [2, 1, 1]]
        want = start + np.array([[0.4375, -0.0625, 0.0], [-0.75, 0.0, -0.25]])
    else:
        # |mean sign| [[1, 1/3, 1/3], [2/3, 1/3, 1/3]]: every coordinate kept; plain means
        want = start + np.array([[1.25, 0.0, -1.0], [2.0, 2.0, 0.5]]) / 3
    assert np.array_equal(arrays["fc.weight"].numpy(), want.astype(np.float32))
    assert np.array_equal(arrays["bn.running_mean"].numpy(), np.full(2, 0.25 * 0 + 0.25 * 1 + 0.5 * 2, np.float32))
    assert arrays["bn.num_batches_tracked"].numpy() == 7
