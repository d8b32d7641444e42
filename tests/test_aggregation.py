"""Pure aggregation functions on small hand-made arrays with known answers."""

import numpy as np
import pytest

from experiment.config import ConfigError, ExperimentConfig
from server.checks import check_experiment
from strategies import AGGREGATIONS
from strategies.aggregation.delta import aggregate_buffer
from strategies.post_training.fedpruning import aggregate_ranks, clip_extremes
from strategies.aggregation.invariant import invariant_step, sign_agreement_mask
from strategies.post_training.pruning import prune_columns
from strategies.aggregation.rlr import default_theta, rlr_step, robust_learning_rate
from tests.grids import LIMITS, build_rule

# 3 clients x 4 coordinates
U = np.array([
    [0.3, 0.2, -0.1, 0.0],
    [0.1, -0.4, -0.2, 0.5],
    [0.2, 0.1, -0.3, 0.5],
])


def test_rlr_sign_agreement_sets_learning_rate_sign():
    # |sum sign| per coordinate: 3, 1, 3, 2
    assert robust_learning_rate(U, theta=2, eta=1.0).tolist() == [1.0, -1.0, 1.0, 1.0]
    assert robust_learning_rate(U, theta=3, eta=0.5).tolist() == [0.5, -0.5, 0.5, -0.5]


def test_rlr_step_is_lr_times_weighted_mean():
    w = np.array([1.0, 1.0, 2.0])
    mean = (U[0] + U[1] + 2 * U[2]) / 4
    np.testing.assert_allclose(rlr_step(U, w, theta=2, eta=1.0), mean * np.array([1, -1, 1, 1]))
    # theta above every agreement: every coordinate moves against the mean (sign flip)
    np.testing.assert_allclose(rlr_step(U, w, theta=4, eta=1.0), -mean)


def test_rlr_default_theta_scales_with_clients():
    assert default_theta(10) == 6 and default_theta(20) == 11 and default_theta(7) == 4 and default_theta(1) == 1


def test_invariant_mask_and_step():
    updates = np.array([[1.0, 1.0, 2.0], [1.0, -1.0, 3.0], [1.0, 1.0, -1.0], [1.0, -1.0, 4.0], [-1.0, 1.0, 5.0]])
    # mean signs: 0.6, 0.2, 0.6
    assert sign_agreement_mask(updates, 0.6).tolist() == [True, False, True]
    step = invariant_step(updates, threshold=0.6, beta=0.2)  # cut 1 of 5 at each end
    assert step[1] == 0.0  # masked coordinates do not move
    assert step[0] == pytest.approx(1.0)
    assert step[2] == pytest.approx((2 + 3 + 4) / 3)


def test_bn_buffers_averaged_or_maxed_never_flipped():
    floats = np.array([[1.0, 2.0], [3.0, 6.0]], dtype=np.float32)
    mean = aggregate_buffer(floats, np.array([1.0, 3.0]))
    assert mean.dtype == np.float32 and np.array_equal(mean, np.array([2.5, 5.0], dtype=np.float32))
    counts = np.array([5, 7], dtype=np.int64)
    assert aggregate_buffer(counts, np.array([1.0, 1.0])) == 7
    per_coordinate = aggregate_buffer(np.array([[5, 9], [7, 2]], dtype=np.int64), np.array([1.0, 1.0]))
    assert per_coordinate.dtype == np.int64 and per_coordinate.tolist() == [7, 9]  # the max of each counter


def test_pruning_zeros_columns():
    import torch

    w = torch.arange(6.0).reshape(2, 3) + 1
    out = prune_columns(w, torch.tensor([False, True, False]))
    assert out.tolist() == [[1.0, 0.0, 3.0], [4.0, 0.0, 6.0]]


def test_fedpruning_rank_aggregation_and_extremes():
    import torch

    ranks = np.array([[0, 1, 2], [2, 1, 0], [0, 2, 1]])
    np.testing.assert_allclose(aggregate_ranks(ranks, np.array([1.0, 1.0, 2.0])), [0.5, 1.5, 1.0])
    w = torch.zeros(4, 5)
    w[0, 0] = 100.0  # one extreme weight
    pruned = torch.tensor([False, False, False, False, True])
    out, clipped = clip_extremes(w, pruned, k=2.0)
    # the 16 unpruned weights: mean 100/16 = 6.25, std sqrt((93.75^2 + 15 x 6.25^2) / 15) = 25: bounds -43.75, 56.25
    assert clipped == 1 and out[0, 0].item() == 56.25
    assert torch.equal(out[1:], w[1:])
    assert clip_extremes(w, pruned, k=0.0) == (w, 0)  # k 0: no clipping at all

    w = torch.zeros(4, 5)
    w[0, 0], w[1, 1], w[2, 4] = 100.0, -100.0, 500.0  # column 4 is pruned: neither counted nor clipped
    out, clipped = clip_extremes(w, pruned.numpy(), k=2.0)  # a numpy mask as FedPruning may pass
    bound = 2 * (20000 / 15) ** 0.5  # mean 0, std sqrt(2 x 100^2 / 15)
    assert clipped == 2 and out[0, 0].item() == pytest.approx(bound) and out[1, 1].item() == pytest.approx(-bound)
    assert out[2, 4].item() == 500.0

    two = torch.tensor([[0.0, 10.0, 7.0]])  # two unpruned weights: mean 5, std sqrt(50)
    out, clipped = clip_extremes(two, torch.tensor([False, False, True]), k=0.5)
    half = 0.5 * 50 ** 0.5
    assert clipped == 2 and out[0, :2].tolist() == pytest.approx([5 - half, 5 + half]) and out[0, 2].item() == 7.0
    one = torch.tensor([[3.0, 9.0]])  # one unpruned weight: no spread to clip to
    assert clip_extremes(one, torch.tensor([False, True]), k=0.5) == (one, 0)


@pytest.mark.parametrize(
    "changes,fragment",
    [
        ({"aggregation": "rlr", "rlr_theta": 11}, "rlr-theta=11"),
        ({"aggregation": "krum", "krum_f": 8}, "needs clients per round >= krum-f + 3"),
        ({"aggregation": "bulyan"}, "needs clients per round >= 4*krum-f + 3"),
        ({"aggregation": "multikrum", "multikrum_m": 20}, "multikrum-m=20"),
        ({"trim_beta": 0.5}, "trim-beta=0.5"),
        ({"post_defenses": "flain,prune"}, "post-defenses='prune'"),
    ],
)
def test_impossible_rule_settings_fail_before_training(changes, fragment):
    with pytest.raises(ConfigError) as err:
        check_experiment(ExperimentConfig.defaults(**changes))
    assert fragment in str(err.value)


def test_possible_rule_settings_validate():
    for agg in ("fedavg", "rlr", "krum", "multikrum", "trimmed-mean", "median", "invariant"):
        check_experiment(ExperimentConfig.defaults(aggregation=agg))
    check_experiment(ExperimentConfig.defaults(aggregation="bulyan", krum_f=1))


@pytest.mark.parametrize("name", ["krum", "multikrum", "bulyan"])
def test_krum_family_assumes_krum_f_attackers(name):
    """krum-f set: that many; -1 (the default): the run's true count (10 clients, MCR 0.4: 4)."""
    from strategies import AGGREGATIONS
    from strategies.aggregation.reply_guard import ReplyLimits

    limits = ReplyLimits.uniform(20, 1000)
    given = AGGREGATIONS[name](ExperimentConfig.defaults(num_clients=20, aggregation=name, krum_f=2), frozenset(), limits)
    default = AGGREGATIONS[name](ExperimentConfig.defaults(num_clients=10, aggregation=name), frozenset(), limits)
    assert (given.num_malicious_nodes, default.num_malicious_nodes) == (2, 4)
    none = AGGREGATIONS[name](ExperimentConfig.defaults(num_clients=20, aggregation=name, krum_f=0), frozenset(), limits)
    assert none.num_malicious_nodes == 0  # 0 is a setting (assume no attacker), not "auto"


def test_multikrum_averages_multikrum_m_or_all_but_the_assumed_attackers():
    from strategies import AGGREGATIONS
    from strategies.aggregation.reply_guard import ReplyLimits

    limits = ReplyLimits.uniform(10, 1000)
    build = lambda **c: AGGREGATIONS["multikrum"](  # noqa: E731
        ExperimentConfig.defaults(num_clients=10, aggregation="multikrum", **c), frozenset(), limits)
    assert build(multikrum_m=5).num_nodes_to_select == 5
    assert build().num_nodes_to_select == 6  # 10 clients - 4 attackers
    assert (build(krum_f=1).num_nodes_to_select, build(krum_f=1).num_malicious_nodes) == (9, 1)


def test_invariant_step_keeps_the_updates_dtype():
    updates = np.array([[1.0, -1.0], [1.0, 1.0], [1.0, -1.0]], dtype=np.float32)
    step = invariant_step(updates, threshold=0.6, beta=0.0)
    assert step.dtype == np.float32 and step.tolist() == [1.0, 0.0]  # column 1: mean sign -1/3, under 0.6


@pytest.mark.parametrize("changes, refused", [
    ({"aggregation": "rlr", "rlr_theta": 10}, False),  # theta may be every client of the round
    ({"aggregation": "rlr", "rlr_theta": 11}, True),
    ({"aggregation": "krum", "krum_f": 7}, False),  # 10 - 7 - 2 = 1 neighbour to score by
    ({"aggregation": "krum", "krum_f": 8}, True),
    ({"aggregation": "multikrum", "krum_f": 7}, False),
    ({"aggregation": "multikrum", "krum_f": 8}, True),
    ({"aggregation": "multikrum", "multikrum_m": 10}, False),
    ({"aggregation": "multikrum", "multikrum_m": 11}, True),
    ({"aggregation": "bulyan", "num_clients": 11, "krum_f": 2}, False),  # 4 x 2 + 3 = 11
    ({"aggregation": "bulyan", "num_clients": 10, "krum_f": 2}, True),
    ({"aggregation": "bulyan", "num_clients": 15, "krum_f": 3}, False),  # 4 x 3 + 3
    ({"aggregation": "bulyan", "num_clients": 14, "krum_f": 3}, True),
])
def test_rule_counts_are_refused_exactly_at_their_bounds(changes, refused):
    cfg = ExperimentConfig.defaults(**({"num_clients": 10} | changes))
    if refused:
        with pytest.raises(ConfigError):
            check_experiment(cfg)
    else:
        check_experiment(cfg)


# each rule built from a configuration that differs from every default, the expected values
# written out here (FLTrust's server update needs the data set: tests/grids.py stands in for it)
NON_DEFAULT = dict(num_clients=9, min_clients=4, seed=7, rlr_theta=3, rlr_eta=0.5, trim_beta=0.3,
                   invariant_threshold=0.7, invariant_beta=0.15, flame_lambda=0.002, clip_norm=2.5,
                   dp_sigma=0.04, krum_f=2, multikrum_m=5)
BUILT = {
    "rlr": {"theta": 3, "eta": 0.5}, "trimmed-mean": {"beta": 0.3},
    "invariant": {"threshold": 0.7, "beta": 0.15}, "flame": {"noise": 0.002, "seed": 7},
    "norm-clipping": {"clip": 2.5, "sigma": 0.0}, "weak-dp": {"clip": 2.5, "sigma": 0.04, "seed": 7},
    "krum": {"num_malicious_nodes": 2}, "multikrum": {"num_malicious_nodes": 2, "num_nodes_to_select": 5},
    "bulyan": {"num_malicious_nodes": 2}, "fedavg": {}, "median": {}, "foolsgold": {}, "fltrust": {},
}


@pytest.mark.parametrize("name", sorted(BUILT))
def test_each_rule_is_built_from_the_configuration(name):
    assert set(BUILT) == set(AGGREGATIONS)
    buffers = frozenset({"bn.running_mean"})
    rule = build_rule(name, ExperimentConfig.defaults(aggregation=name, **NON_DEFAULT), buffers)
    # every client of the round trains, none evaluates, a round needs min-clients replies
    assert (rule.fraction_train, rule.fraction_evaluate, rule.min_train_nodes, rule.min_available_nodes) == (
        1.0, 0.0, 4, 4)
    assert rule.limits is LIMITS and rule.weighted_by_key == "num-examples"
    assert {key: getattr(rule, key) for key in BUILT[name]} == BUILT[name]
    if hasattr(rule, "buffer_keys"):
        assert rule.buffer_keys == buffers


def test_rlr_theta_zero_means_a_majority_of_each_rounds_replies():
    assert build_rule("rlr", ExperimentConfig.defaults(aggregation="rlr", rlr_theta=0)).theta is None
