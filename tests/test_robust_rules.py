"""FLAME, FoolsGold, norm clipping and weak DP on constructed updates, against hand-computed
values: a planted group of colluding updates is excluded (FLAME) or weighted 0 (FoolsGold),
clipping bounds the norm exactly, the noise has the configured std, and the rules keep
BatchNorm statistics out of clipping and noise."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from sklearn.cluster import HDBSCAN

from experiment.config import ExperimentConfig
from strategies import AGGREGATIONS
from strategies.aggregation.clipping import clipped_mean
from strategies.aggregation.flame import clip_to, cosine_distances, flame_step, largest_cluster
from strategies.aggregation.fltrust import fltrust_step
from strategies.aggregation.foolsgold import foolsgold_weights
from tests import oracles
from tests.grids import LIMITS, LocalGrid, build_rule, train_metrics


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _planted(honest: int = 7, colluding: int = 3, dim: int = 50, seed: int = 0):
    """Honest updates in independent random directions, colluders near one shared direction."""
    rng = np.random.default_rng(seed)
    good = rng.standard_normal((honest, dim))
    bad = 3.0 * rng.standard_normal(dim) + 0.01 * rng.standard_normal((colluding, dim))
    return np.vstack([good, bad])


# ---- FLAME ---------------------------------------------------------------------------------
def test_cosine_distances_by_hand():
    d = cosine_distances(np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]]))
    s = 1 / np.sqrt(2)
    want = np.array([[0, 1, 2, 1 - s], [1, 0, 1, 1 - s], [2, 1, 0, 1 + s], [1 - s, 1 - s, 1 + s, 0]])
    assert np.allclose(d, want, atol=1e-12)


def test_flame_clusters_out_a_colluding_minority():
    # the honest majority is one loose cluster (min_cluster_size 6 of 10), the colluders another
    rng = np.random.default_rng(1)
    honest = np.ones(40) + 0.3 * rng.standard_normal((7, 40))
    colluders = -np.ones(40) + 0.01 * rng.standard_normal((3, 40))
    admitted = largest_cluster(cosine_distances(np.vstack([honest, colluders])))
    # every colluder out; the admitted cluster is honest and a majority (HDBSCAN may call the
    # honest model farthest from the rest noise: FLAME then leaves it out too)
    assert not admitted[7:].any() and admitted[:7].sum() >= 6


def test_flame_step_clips_admitted_updates_to_the_median_norm_and_averages_them():
    updates = np.array([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.3, 0.4], [-100.0, 0.0]])  # norms 5, 1, 10, .5, 100
    models = np.array([[1.0, 1.0], [1.0, 1.2], [1.0, 0.9], [0.9, 1.0], [-1.0, 0.0]])  # the last points away
    step, admitted, bound, factors = flame_step(models, updates, 0.0, np.random.default_rng(0))
    assert admitted.tolist() == [True, True, True, True, False] and bound == 5.0  # median of all five norms
    assert np.allclose(factors, [1.0, 1.0, 0.5, 1.0])
    assert np.allclose(step, ([3.0, 4.0] + np.array([0.0, 1.0]) + [3.0, 4.0] + [0.3, 0.4]) / 4)  # plain mean


def test_flame_noise_has_std_lambda_times_the_bound():
    updates = np.zeros((5, 200_000))
    updates[:, 0] = [1.0, 2.0, 3.0, 4.0, 5.0]  # median norm 3
    step, _, bound, _ = flame_step(updates + 1.0, updates, 0.01, np.random.default_rng(5))
    assert bound == 3.0 and np.std(step[1:]) == pytest.approx(0.03, rel=0.01)
    assert abs(np.mean(step[1:])) < 0.0005  # centred: 6 standard errors (0.03 / sqrt(2e5) = 7e-5)


# ---- FoolsGold -----------------------------------------------------------------------------
def test_foolsgold_gives_identical_sybils_zero_and_distinct_clients_one():
    histories = np.vstack([np.eye(8)[:5], np.tile(np.eye(8)[5], (3, 1))])  # 5 orthogonal, 3 identical
    assert foolsgold_weights(histories).tolist() == [1.0] * 5 + [0.0] * 3


def test_foolsgold_pardons_and_takes_the_logit_by_hand():
    # two clients at cosine 0.6, a third at 0.8 with one of them: v = [.8, .6, .8]
    h = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.8, 0.0, 0.6]])
    cs = h @ h.T - np.eye(3)  # unit rows
    assert np.allclose(cs[0], [0, 0.6, 0.8]) and np.allclose(cs[1], [0.6, 0, 0.48])
    # pardoning: client 1 (v .6) has its similarity to 0 and 2 (v .8) scaled by .6/.8
    alpha = 1 - np.array([0.8, 0.6 * 0.75, 0.8])  # [.2, .55, .2]
    alpha = alpha / alpha.max()
    alpha[alpha == 1] = 0.99
    want = np.clip(np.log(alpha / (1 - alpha)) + 0.5, 0, 1)  # [logit(.3636) + .5 = -.06 -> 0, 1, 0]
    assert np.allclose(foolsgold_weights(h), want) and want.tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("seed", range(12))
def test_foolsgold_weights_equal_the_papers_algorithm(seed):
    """Sybil groups (a shared direction plus noise), honest clients and, in low dimension,
    clients whose every cosine is negative: every branch of the rule against the oracle."""
    rng = np.random.default_rng(seed)
    dim = (2, 3, 6, 20)[seed % 4]
    sybil = rng.normal(size=dim)
    histories = np.vstack([sybil + rng.normal(scale=(0.1, 0.6, 1.5)[seed % 3], size=(3, dim)),
                           rng.normal(size=(4, dim))])
    assert np.allclose(foolsgold_weights(histories), oracles.foolsgold(histories), atol=1e-12)


def test_foolsgold_clips_alpha_at_one_when_every_cosine_is_negative():
    """Cosines -0.5, -0.5 (client 0) and -0.001 (clients 1, 2): pardoning scales client 0's
    by -0.5 / -0.001 = 500, so 1 - max is 251 for it and 1.001 for the others; clipped at 1,
    all three are equal (weight 1 each); unclipped, clients 1 and 2 would fall to 0.004 of
    client 0 and get weight 0."""
    gram = np.array([[1.0, -0.5, -0.5], [-0.5, 1.0, -0.001], [-0.5, -0.001, 1.0]])
    h = np.linalg.cholesky(gram)  # rows with exactly these cosines
    assert np.allclose(h @ h.T, gram)
    assert foolsgold_weights(h).tolist() == [1.0, 1.0, 1.0] == oracles.foolsgold(h)
    for dim in (2, 3):  # every history alike: every alpha 0, whether the cosine rounds to 1 or to 1 - 2e-16
        assert foolsgold_weights(np.ones((4, dim))).tolist() == [0.0] * 4


def test_foolsgold_judge_weights_the_step_and_leaves_zero_weight_clients_out_of_the_buffers():
    strategy = build_rule("foolsgold", ExperimentConfig.defaults(num_clients=4, aggregation="foolsgold"), BUFFERS)
    updates = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # 0 and 1 alike
    examples = np.array([10.0, 20.0, 30.0, 40.0])
    combined = strategy.judge(1, updates, examples, [0, 1, 2, 3])
    assert combined.refusal is None and combined.log == {"weights": {"0": 0.0, "1": 0.0, "2": 1.0, "3": 1.0}}
    assert combined.steps[""].tolist() == [0.0, 0.5, 1.0]  # the mean of clients 2 and 3
    assert combined.buffer_weights.tolist() == [0.0, 0.0, 30.0, 40.0]
    alike = build_rule("foolsgold", ExperimentConfig.defaults(num_clients=3, aggregation="foolsgold"), BUFFERS)
    combined = alike.judge(1, np.ones((3, 2)), examples[:3], [0, 1, 2])
    assert (combined.steps, combined.buffer_weights.tolist(), combined.refusal) == (
        {}, [10.0, 20.0, 30.0], "FoolsGold gave every client weight 0: the model stays")
    assert combined.log == {"weights": {"0": 0.0, "1": 0.0, "2": 0.0}}


def test_foolsgold_oracle_cases_cover_its_branches():
    """The cases above reach weights strictly between 0 and 1, the clip at 1 and at 0, and
    pardoning that changes the result (skipping it changes at least one case)."""
    weights = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        dim = (2, 3, 6, 20)[seed % 4]
        sybil = rng.normal(size=dim)
        h = np.vstack([sybil + rng.normal(scale=(0.1, 0.6, 1.5)[seed % 3], size=(3, dim)), rng.normal(size=(4, dim))])
        weights.append(oracles.foolsgold(h))
    flat = np.concatenate(weights)
    assert ((flat > 0) & (flat < 1)).any() and (flat == 1).any() and (flat == 0).any()


def _state(w: np.ndarray, mean: float = 0.0, count: int = 0) -> ArrayRecord:
    return ArrayRecord({"fc.weight": Array(w.astype(np.float32)),
                        "bn.running_mean": Array(np.full(2, mean, np.float32)),
                        "bn.num_batches_tracked": Array(np.array(count, np.int64))})


BUFFERS = frozenset({"bn.running_mean", "bn.num_batches_tracked"})


def _round(strategy, rnd, start, updates, nodes=None, examples=None):
    nodes = nodes or list(range(1, len(updates) + 1))
    sent = {m.metadata.dst_node_id: m for m in strategy.configure_train(rnd, _state(start), ConfigRecord(),
                                                                         LocalGrid(max(nodes)))}
    replies = [Message(content=RecordDict({"arrays": _state(start + u, float(i), 3 + i),
                                           "metrics": train_metrics((examples or [10] * len(nodes))[i], node - 1)}),
                       reply_to=sent[node]) for i, (node, u) in enumerate(zip(nodes, updates))]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return arrays


def test_foolsgold_history_is_kept_by_partition_through_a_missed_round():
    cfg = ExperimentConfig.defaults(num_clients=4, aggregation="foolsgold")
    strategy = AGGREGATIONS["foolsgold"](cfg, BUFFERS, LIMITS)
    e = np.eye(6).reshape(6, 2, 3)
    start = np.zeros((2, 3))
    _round(strategy, 1, start, [e[0], e[1], e[2], e[3]])
    _round(strategy, 2, start, [e[1], e[2], e[3]], nodes=[2, 3, 4])  # partition 0 misses round 2
    _round(strategy, 3, start, [e[4], e[1], e[2], e[3]])
    h = strategy.histories
    assert np.array_equal(h[0], (e[0] + e[4]).ravel()) and np.array_equal(h[1], 3 * e[1].ravel())
    log = strategy.defense_log
    assert [entry["round"] for entry in log] == [1, 2, 3] and set(log[1]["weights"]) == {"1", "2", "3"}


# ---- FLTrust -------------------------------------------------------------------------------
def test_fltrust_trust_is_relu_cosine_and_updates_take_the_servers_norm():
    server = np.array([2.0, 0.0])  # norm 2
    updates = np.array([[3.0, 0.0], [0.0, 1.0], [-5.0, 0.0], [1.0, 1.0]])
    step, scores = fltrust_step(updates, server)
    s = 1 / np.sqrt(2)
    assert np.allclose(scores, [1.0, 0.0, 0.0, s])  # the reversed update: trust 0
    # normalised to norm 2: [2, 0] and [sqrt 2, sqrt 2]; weights 1 and s
    assert np.allclose(step, (1.0 * np.array([2.0, 0.0]) + s * np.array([np.sqrt(2), np.sqrt(2)])) / (1 + s))


def test_fltrust_with_small_norms_and_a_zero_update_by_hand():
    """Norms under 1 (the server's 0.5, a client's 0.6) and scores summing to under 1: cos 0.5
    for the first client, 0 for a zero update (no division by its norm) and a reversed one."""
    server = np.array([0.5, 0.0])
    updates = np.array([[0.3, 0.3 * np.sqrt(3)], [0.0, 0.0], [-0.2, 0.0]])
    step, scores = fltrust_step(updates, server)
    assert np.allclose(scores, [0.5, 0.0, 0.0])
    assert np.allclose(step, [0.25, 0.25 * np.sqrt(3)])  # the first update rescaled to norm 0.5


def test_fltrust_round_with_no_trust_keeps_the_model_and_says_so():
    cfg = ExperimentConfig.defaults(num_clients=3, aggregation="fltrust")
    strategy = build_rule("fltrust", cfg, BUFFERS)  # the server's update: +1 on every parameter
    arrays = _round(strategy, 1, np.zeros((2, 3)), [-np.ones((2, 3)), -2 * np.ones((2, 3)), np.zeros((2, 3))])
    assert arrays is None
    assert strategy.failures[-1]["kind"] == "refused" and strategy.failures[-1]["reason"] == (
        "FLTrust: every client's update points away from the server's (trust 0): the model stays")
    assert strategy.defense_log == []


def test_fltrust_rule_on_replies_by_hand():
    cfg = ExperimentConfig.defaults(num_clients=3, aggregation="fltrust")
    strategy = build_rule("fltrust", cfg, BUFFERS)  # server update: all ones (norm sqrt 6)
    updates = [np.full((2, 3), 3.0), -np.ones((2, 3)), np.array([[1.0, 1, 1], [0, 0, 0]])]
    arrays = _round(strategy, 1, np.zeros((2, 3)), updates, examples=[10, 10, 10])
    # trust: 1, 0, cos = 3 / (sqrt 3 sqrt 6) = 1/sqrt 2; each rescaled to norm sqrt 6
    t = 1 / np.sqrt(2)
    want = (np.ones((2, 3)) + t * np.sqrt(2) * np.array([[1.0, 1, 1], [0, 0, 0]])) / (1 + t)
    assert np.allclose(arrays["fc.weight"].numpy(), want, atol=1e-6)
    assert np.allclose(arrays["bn.running_mean"].numpy(), 1.0)  # partitions 0 and 2 trusted, equal examples
    assert strategy.defense_log[0]["trust"] == {"0": 1.0, "1": 0.0, "2": pytest.approx(t)}


# ---- clipping and weak DP ------------------------------------------------------------------
def test_clip_bounds_the_norm_exactly():
    updates = np.array([[6.0, 8.0], [0.3, 0.4], [0.0, 0.0]])  # norms 10, 0.5, 0 (an unchanged model)
    clipped, factors = clip_to(updates, 3.0)
    assert np.allclose(clipped, [[1.8, 2.4], [0.3, 0.4], [0.0, 0.0]]) and factors.tolist() == [0.3, 1.0, 1.0]
    step, _ = clipped_mean(updates, np.array([1.0, 1.0, 2.0]), 3.0)
    assert np.allclose(step, [(1.8 + 0.3) / 4, (2.4 + 0.4) / 4])


def test_norm_clipping_rule_on_replies_clips_parameters_and_averages_buffers():
    cfg = ExperimentConfig.defaults(num_clients=3, aggregation="norm-clipping", clip_norm=1.0)
    strategy = AGGREGATIONS["norm-clipping"](cfg, BUFFERS, LIMITS)
    start = np.ones((2, 3))
    updates = [np.full((2, 3), 2.0), np.zeros((2, 3)), np.full((2, 3), 0.1)]  # norms 4.90, 0, 0.245
    arrays = _round(strategy, 1, start, updates, examples=[10, 10, 20])
    want = start + (updates[0] / np.sqrt(24) + 2 * updates[2]) / 4  # weights 1/4, 1/4, 1/2
    assert np.allclose(arrays["fc.weight"].numpy(), want.astype(np.float32), atol=1e-7)
    assert np.allclose(arrays["bn.running_mean"].numpy(), 0.25 * 0 + 0.25 * 1 + 0.5 * 2)  # not clipped
    assert arrays["bn.num_batches_tracked"].numpy() == 5 and strategy.defense_log[0]["clip_factors"]["1"] == 1.0


def test_weak_dp_noise_has_std_sigma_and_comes_from_the_runs_stream():
    def run(seed):
        cfg = ExperimentConfig.defaults(num_clients=2, aggregation="weak-dp", dp_sigma=0.05, seed=seed)
        strategy = AGGREGATIONS["weak-dp"](cfg, frozenset(), LIMITS)
        start = np.zeros((200, 500))
        sent = list(strategy.configure_train(1, ArrayRecord({"w": Array(start.astype(np.float32))}), ConfigRecord(),
                                             LocalGrid(2)))
        replies = [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(start.astype(np.float32))}),
                                               "metrics": train_metrics(10, m.metadata.dst_node_id - 1)}), reply_to=m)
                   for m in sent]
        np.random.seed(0)  # the global numpy RNG must not matter
        return strategy.aggregate_train(1, replies)[0]["w"].numpy()

    a, b, c = run(1), run(1), run(2)
    assert np.std(a) == pytest.approx(0.05, rel=0.01) and abs(np.mean(a)) < 0.001
    assert np.array_equal(a, b) and not np.array_equal(a, c)


BN_LINE = "\t│\t└── BatchNorm buffers: 0, weighted mean (integer counters: max), never flipped"


@pytest.mark.parametrize("name, lines", [
    ("flame", ["\t├──> Flame settings:",
               "\t│\t├── clustering: HDBSCAN on cosine distances, min_cluster_size n/2+1, min_samples 1",
               "\t│\t├── clip: median update norm", "\t│\t├── noise: lambda=0.001 x the clip bound"]),
    ("fltrust", ["\t├──> FLTrust settings:", "\t│\t├── root set: 100 clean images on the server",
                 "\t│\t├── weights: ReLU(cosine) with the server update"]),
    ("foolsgold", ["\t├──> FoolsGold settings:", "\t│\t├── history: summed updates per partition id",
                   "\t│\t├── weights: pardoned cosine similarity, logit (kappa 1)"]),
    ("norm-clipping", ["\t├──> NormClipping settings:", "\t│\t├── clip norm C: 3.0", "\t│\t├── noise std sigma: none"]),
    ("weak-dp", ["\t├──> NormClipping settings:", "\t│\t├── clip norm C: 3.0", "\t│\t├── noise std sigma: 0.025"]),
])
def test_rules_log_their_settings_in_flowers_startup_log(name, lines, caplog):
    """The exact block, last item marked └──, before Flower's own (Sampling: ...)."""
    caplog.set_level("INFO", logger="flwr")
    build_rule(name, ExperimentConfig.defaults(num_clients=5, aggregation=name)).summary()
    logged = [r.getMessage() for r in caplog.records]
    start = logged.index(lines[0])
    assert logged[start:start + len(lines) + 2] == lines + [BN_LINE, "\t├──> Sampling:"]


def test_flame_rule_on_replies_excludes_the_colluders_and_logs_it():
    cfg = ExperimentConfig.defaults(num_clients=10, aggregation="flame", flame_lambda=0.0)
    strategy = AGGREGATIONS["flame"](cfg, BUFFERS, LIMITS)
    rng = np.random.default_rng(1)
    updates = [np.ones((2, 3)) + 0.3 * rng.standard_normal((2, 3)) for _ in range(7)]
    updates += [-np.ones((2, 3)) + 0.01 * rng.standard_normal((2, 3)) for _ in range(3)]
    arrays = _round(strategy, 1, np.zeros((2, 3)), updates)
    entry = strategy.defense_log[0]
    admitted = entry["admitted"]
    assert {7, 8, 9} <= set(entry["excluded"]) and set(admitted) <= set(range(7)) and len(admitted) >= 6
    norms = {i: np.linalg.norm(updates[i]) for i in admitted}
    assert entry["clip_factors"] == {str(i): pytest.approx(min(1.0, np.median([np.linalg.norm(u) for u in updates]) / norms[i]))
                                     for i in admitted}
    bound = np.median([np.linalg.norm(u) for u in updates])  # over all ten
    clipped = [updates[i] * min(1.0, bound / np.linalg.norm(updates[i])) for i in admitted]
    assert entry["clip_bound"] == pytest.approx(bound)
    assert np.allclose(arrays["fc.weight"].numpy(), np.mean(clipped, axis=0), atol=1e-6)
    assert np.allclose(arrays["bn.running_mean"].numpy(), np.mean(admitted))  # admitted clients' statistics


@pytest.mark.slow
@pytest.mark.process  # real Flower or a subprocess: mutation runs skip it
@pytest.mark.parametrize("name, key", [("flame", "admitted"), ("fltrust", "trust"), ("foolsgold", "weights"),
                                       ("norm-clipping", "clip_factors"), ("weak-dp", "noise_std")])
def test_each_rule_through_a_real_small_simulation(name, key, tmp_path):
    """3 clients (1 attacker), 2 rounds, 5% of Fashion-MNIST: the run completes and its
    summary says, round by round, what the rule did."""
    import json
    import subprocess
    import sys

    from launch.superlink import SOURCE_ROOT

    run_dir = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "run", "--set", "num-clients=3", "--set", "num-rounds=2",
         "--set", "train-fraction=0.05", "--set", "mcr=0.34", "--set", f"aggregation='{name}'",
         "--set", "post-defenses='flain'", "--set", f"run-dir='{run_dir}'",
         "--set", f"data-dir='{SOURCE_ROOT / 'data'}'"],
        cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["client_failures"] == []
    assert [entry["round"] for entry in summary["defense_log"]] == [1, 2]
    assert all(key in entry for entry in summary["defense_log"])


def test_fltrust_judges_against_the_servers_own_step_from_the_current_model():
    """Round 2 from a model that is not zero: the server's step is +2 everywhere (trained -
    current, whatever current is); client 0 agrees (trust 1), client 1 is orthogonal (trust 0,
    left out of the BatchNorm statistics), client 2 half agrees."""
    cfg = ExperimentConfig.defaults(num_clients=3, aggregation="fltrust")
    strategy = build_rule("fltrust", cfg, BUFFERS)
    start = np.array([[5.0, -5.0, 0.0], [3.0, 0.0, -1.0]])
    updates = [np.ones((2, 3)), np.array([[1.0, -1, 0], [0, 0, 0]]), np.array([[1.0, 1, 1], [0, 0, 0]])]
    arrays = _round(strategy, 2, start, updates, examples=[10, 20, 30])
    t = 1 / np.sqrt(2)  # client 2: cos = 3 / (sqrt 3 sqrt 6)
    want = start + (np.ones((2, 3)) * 2 + t * 2 * np.sqrt(2) * np.array([[1.0, 1, 1], [0, 0, 0]])) / (1 + t)
    assert np.allclose(arrays["fc.weight"].numpy(), want, atol=1e-5)  # rescaled to the server's norm 2 sqrt 6
    assert np.allclose(arrays["bn.running_mean"].numpy(), (10 * 0 + 30 * 2) / 40)  # clients 0 and 2 only
    assert strategy.defense_log[-1] == {"round": 2, "trust": {"0": pytest.approx(1.0), "1": 0.0, "2": pytest.approx(t)},
                                        "server_update_norm": pytest.approx(2 * np.sqrt(6))}


def test_fltrust_root_set_is_disjoint_from_aux_and_left_out_of_the_evaluation():
    from experiment.data import aux_split, root_split

    labels = np.random.default_rng(0).integers(0, 10, 10_000)
    cfg = ExperimentConfig.defaults(aggregation="fltrust", fltrust_root_size=100)
    aux, _ = aux_split(cfg, labels)
    root, evaluation = root_split(cfg, labels, aux)
    assert len(root) == 100 and len(set(root)) == 100 and not set(root) & set(aux)
    assert sorted(set(root) | set(aux) | set(evaluation)) == list(range(10_000)) and not set(root) & set(evaluation)
    assert np.array_equal(root, root_split(cfg, labels, aux)[0])  # seeded
    none, everything = root_split(cfg.replace(aggregation="fedavg"), labels, aux)
    assert len(none) == 0 and len(everything) == 10_000 - len(aux)


def test_flame_with_three_clients_leaves_the_odd_one_out():
    # the smallest case HDBSCAN decides (min_cluster_size 2 of 3); fewer admit everyone
    d = cosine_distances(np.array([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0]]))
    assert largest_cluster(d).tolist() == [True, True, False]
    assert largest_cluster(cosine_distances(np.array([[1.0, 0.0], [-1.0, 0.0]]))).tolist() == [True, True]


def test_flame_rule_clusters_the_local_models_the_clients_sent_not_their_updates():
    """From a non-zero model the colluders' updates (-2) point away from the honest ones, but
    their local models (current + update = -1 + noise) are what FLAME clusters: the oracle is
    HDBSCAN on the replied models themselves."""
    cfg = ExperimentConfig.defaults(num_clients=10, aggregation="flame", flame_lambda=0.0)
    strategy = AGGREGATIONS["flame"](cfg, BUFFERS, LIMITS)
    rng = np.random.default_rng(3)
    start = np.ones((2, 3))
    updates = [0.3 * rng.standard_normal((2, 3)) for _ in range(7)]
    updates += [-2.0 * np.ones((2, 3)) + 0.01 * rng.standard_normal((2, 3)) for _ in range(3)]
    _round(strategy, 1, start, updates)
    models = np.array([(start + u).astype(np.float32).astype(np.float64).ravel() for u in updates])
    want = largest_cluster(cosine_distances(models))
    entry = strategy.defense_log[0]
    assert entry["admitted"] == [i for i in range(10) if want[i]] and {7, 8, 9} <= set(entry["excluded"])
    assert entry["noise_std"] == 0.0


def test_flame_noise_is_lambda_times_the_bound_and_new_each_round():
    cfg = ExperimentConfig.defaults(num_clients=3, aggregation="flame", flame_lambda=0.5)
    strategy = AGGREGATIONS["flame"](cfg, BUFFERS, LIMITS)
    updates = [np.full((2, 3), 1.0), np.full((2, 3), 2.0), np.full((2, 3), 1.5)]  # norms sqrt6 x (1, 2, 1.5)
    first = _round(strategy, 1, np.zeros((2, 3)), updates)["fc.weight"].numpy()
    second = _round(strategy, 2, np.zeros((2, 3)), updates)["fc.weight"].numpy()
    bound = 1.5 * np.sqrt(6)
    assert [e["noise_std"] for e in strategy.defense_log] == [pytest.approx(0.5 * bound)] * 2
    assert strategy.defense_log[0]["clip_factors"] == {"0": 1.0, "1": pytest.approx(0.75), "2": 1.0}  # by partition
    assert not np.allclose(first, second)  # each round draws its own noise


@pytest.mark.parametrize("name", ["rlr", "invariant", "flame", "foolsgold", "norm-clipping"])
def test_update_rules_report_the_example_weighted_train_metrics(name):
    """What Flower's FedAvg reports per round (rounds.csv's train loss): the example-weighted
    mean, 1.0 x 10/40 + 4.0 x 30/40 = 3.25; a rule with nothing to say logs nothing. (Two
    orthogonal updates: FoolsGold refuses clients that all look alike.)"""
    cfg = ExperimentConfig.defaults(num_clients=2, aggregation=name, flame_lambda=0.0, invariant_beta=0.0)
    strategy = AGGREGATIONS[name](cfg, BUFFERS, LIMITS)
    start = np.zeros((2, 3))
    sent = list(strategy.configure_train(1, _state(start), ConfigRecord(), LocalGrid(2)))
    replies = [Message(content=RecordDict({"arrays": _state(start + u), "metrics": train_metrics(n, i, **{"train-loss": loss})}),
                       reply_to=m) for i, (m, u, n, loss) in enumerate(zip(sent, np.eye(6)[[0, 4]].reshape(2, 2, 3),
                                                                            [10, 30], [1.0, 4.0]))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["train-loss"] == pytest.approx(3.25)
    if name in ("rlr", "invariant"):
        assert strategy.defense_log == []


def test_an_update_rule_with_only_failed_replies_keeps_the_model():
    strategy = AGGREGATIONS["rlr"](ExperimentConfig.defaults(num_clients=2, aggregation="rlr"), BUFFERS, LIMITS)
    sent = list(strategy.configure_train(1, _state(np.zeros((2, 3))), ConfigRecord(), LocalGrid(2)))
    replies = [Message(error=Error(code=0, reason="gone"), reply_to=m) for m in sent]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert [f["kind"] for f in strategy.failures] == ["error", "error"] and strategy.defense_log == []


def test_flame_clusters_by_cosine_distance_like_sklearns_own_cosine_metric():
    """Five models where HDBSCAN on the distance matrix's rows (euclidean, the metric it takes
    without `precomputed`) admits another set: the oracle is scikit-learn's HDBSCAN with its own
    cosine metric on the models."""
    models = np.array([[-0.8, -2.8, -1.9, -5.6, -2.4, 0.5, 0.7, 2.9], [0.3, 2.5, -0.2, -1.6, 3.1, -2.0, -0.6, 1.9],
                       [0.9, 1.4, -1.8, 0.2, 0.6, -2.5, 1.4, 0.4], [-2.5, 0.6, 0.8, 1.2, 0.2, -0.2, -0.9, 0.6],
                       [-2.3, 0.6, 0.3, 1.3, 0.4, 0.0, -0.8, 0.5]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn's note on `copy`'s default
        labels = HDBSCAN(min_cluster_size=3, min_samples=1, allow_single_cluster=True, metric="cosine").fit(models).labels_
    assert labels.tolist() == [-1, 0, 0, 0, 0]
    assert largest_cluster(cosine_distances(models)).tolist() == [False, True, True, True, True]


def test_cosine_distance_of_a_zero_model_is_one():
    d = cosine_distances(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, -2.0]]))
    assert np.array_equal(d, [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])


def test_flame_clip_scales_small_norms_too():
    """Norms under 1 above the bound: factor bound / norm (0.5 / 0.8), the rest untouched."""
    clipped, factors = clip_to(np.array([[0.8, 0.0], [0.0, 0.3], [0.0, 0.0]]), 0.5)
    assert np.allclose(factors, [0.625, 1.0, 1.0]) and np.allclose(clipped, [[0.5, 0.0], [0.0, 0.3], [0.0, 0.0]])


def test_whole_model_rules_span_every_parameter_tensor():
    """Norm clipping over three tensors of different shapes: the norm is the whole update's
    (sqrt(6 x 1 + 4 x 0.25) = sqrt 7), and each tensor gets its own part of the step back."""
    cfg = ExperimentConfig.defaults(num_clients=2, aggregation="norm-clipping", clip_norm=1.0)
    strategy = AGGREGATIONS["norm-clipping"](cfg, frozenset(), LIMITS)
    start = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32), "c": np.zeros(2, np.float32)}
    updates = [{"a": np.ones((2, 3)), "b": np.full(4, 0.5), "c": np.zeros(2)},
               {"a": np.zeros((2, 3)), "b": np.array([0.1, 0, 0, 0]), "c": np.array([0.2, 0.0])}]  # norm 0.22
    record = lambda arrays: ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})  # noqa: E731
    sent = list(strategy.configure_train(1, record(start), ConfigRecord(), LocalGrid(2)))
    replies = [Message(content=RecordDict({"arrays": record(u), "metrics": train_metrics(n, i)}), reply_to=m)
               for i, (m, u, n) in enumerate(zip(sent, updates, [10, 30]))]
    arrays, _ = strategy.aggregate_train(1, replies)
    s = 1 / np.sqrt(7)
    assert np.allclose(arrays["a"].numpy(), np.full((2, 3), 0.25 * s), atol=1e-7)
    assert np.allclose(arrays["b"].numpy(), 0.25 * 0.5 * s + 0.75 * np.array([0.1, 0, 0, 0]), atol=1e-7)
    assert np.allclose(arrays["c"].numpy(), [0.75 * 0.2, 0.0], atol=1e-7)
    assert strategy.defense_log[0]["clip_factors"] == {"0": pytest.approx(s), "1": 1.0}


def test_a_refused_round_is_logged_with_the_rule_and_the_reason(caplog):
    caplog.set_level("WARNING", logger="flwr")
    cfg = ExperimentConfig.defaults(num_clients=3, aggregation="rlr", rlr_theta=3)
    strategy = AGGREGATIONS["rlr"](cfg, BUFFERS, LIMITS)
    sent = list(strategy.configure_train(1, _state(np.zeros((2, 3))), ConfigRecord(), LocalGrid(3)))
    replies = [Message(content=RecordDict({"arrays": _state(np.ones((2, 3))), "metrics": train_metrics(10, i)}), reply_to=m)
               for i, m in enumerate(sent[:2])]
    assert strategy.aggregate_train(1, replies) == (None, None)
    reason = "rlr-theta=3 but only 2 replies: no coordinate could reach it and every weight would move against the mean update"
    assert f"round 1 refused by GuardedRobustLR: {reason}" in [r.getMessage() for r in caplog.records]
    assert strategy.failures == [{"round": 1, "node": 0, "partition": None, "kind": "refused", "reason": reason}]


def test_a_round_a_rule_judges_away_is_logged_and_recorded(caplog):
    """FoolsGold with three identical clients: every weight 0, the round refused in round 2
    (round 1 is aggregated normally), the model kept, the reason logged and recorded."""
    caplog.set_level("WARNING", logger="flwr")
    strategy = AGGREGATIONS["foolsgold"](ExperimentConfig.defaults(num_clients=3, aggregation="foolsgold"), BUFFERS, LIMITS)
    e = np.eye(6).reshape(6, 2, 3)
    assert _round(strategy, 1, np.zeros((2, 3)), [e[0], e[1], e[2]]) is not None
    assert _round(strategy, 2, np.zeros((2, 3)), [e[3] + e[4] - e[i] for i in range(3)]) is None  # histories all e3 + e4
    reason = "FoolsGold gave every client weight 0: the model stays"
    assert f"round 2 refused by GuardedFoolsGold: {reason}" in [r.getMessage() for r in caplog.records]
    assert strategy.failures == [{"round": 2, "node": 0, "partition": None, "kind": "refused", "reason": reason}]
    assert strategy.defense_log[-1]["round"] == 1  # nothing logged for the refused round


def test_weak_dp_records_each_clients_norm_and_clip_and_draws_new_noise_each_round():
    cfg = ExperimentConfig.defaults(num_clients=3, aggregation="weak-dp", clip_norm=3.0, dp_sigma=0.5)
    strategy = AGGREGATIONS["weak-dp"](cfg, BUFFERS, LIMITS)
    updates = [np.full((2, 3), 2.0), np.full((2, 3), 1.0), np.zeros((2, 3))]  # norms 2 sqrt6, sqrt6, 0
    first = _round(strategy, 1, np.zeros((2, 3)), updates, nodes=[2, 5, 3])["fc.weight"].numpy()
    second = _round(strategy, 2, np.zeros((2, 3)), updates, nodes=[2, 5, 3])["fc.weight"].numpy()
    entry = strategy.defense_log[0]
    s6 = np.sqrt(6.0)
    assert entry["update_norms"] == {"1": pytest.approx(2 * s6), "4": pytest.approx(s6), "2": 0.0}
    assert entry["clip_factors"] == {"1": pytest.approx(3.0 / (2 * s6)), "4": 1.0, "2": 1.0}  # sqrt6 < 3: unclipped
    assert [e["noise_std"] for e in strategy.defense_log] == [pytest.approx(0.5)] * 2
    assert not np.allclose(first, second)  # each round draws its own noise
