"""Partial participation (strategies/sampling.py): which clients a round trains, the
partition query's untrusted answers, and the settings that count a round's clients."""

from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from attacks import scaling_factor
from experiment.config import ConfigError, ExperimentConfig
from server.checks import check_experiment
from strategies.aggregation import krum_f
from strategies.sampling import PARTITION_QUERY, Sampled, read_roster, round_sample, sample_plan
from tests.grids import LocalGrid, build_rule, train_metrics


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


# ---- round_sample ------------------------------------------------------------------
def test_round_sample_is_k_distinct_partitions_and_pinned():
    got = round_sample(42, 1, 100, 10)
    assert len(set(got)) == 10 and got == sorted(got) and all(0 <= p < 100 for p in got)
    # the stream is part of a run's reproducibility: pinned (a change here changes every sampled run)
    assert got == PINNED_42_1
    assert round_sample(42, 1, 100, 10) == got  # the same seed and round: the same clients
    assert round_sample(42, 2, 100, 10) != got and round_sample(43, 1, 100, 10) != got


PINNED_42_1 = [6, 31, 36, 38, 40, 42, 48, 63, 95, 98]


def test_round_sample_is_uniform_over_many_rounds():
    """Each of 20 partitions is drawn with probability 5/20 per round: over 2000 rounds its
    count is 500 +- 3.5 sd (sd = sqrt(2000 * 0.25 * 0.75) = 19.4)."""
    counts = Counter(p for rnd in range(1, 2001) for p in round_sample(7, rnd, 20, 5))
    assert sorted(counts) == list(range(20))
    assert all(abs(c - 500) < 68 for c in counts.values()), counts


def test_fixed_schedule_puts_exactly_that_many_attackers_in_every_round():
    malicious = {3, 8, 11, 19}
    for rnd in range(1, 200):
        got = round_sample(5, rnd, 20, 6, malicious, attackers=2)
        assert len(set(got)) == 6 and len(malicious & set(got)) == 2
    # and over the rounds every attacker takes its turn, about equally (2 of 4 per round)
    turns = Counter(p for rnd in range(1, 401) for p in round_sample(5, rnd, 20, 6, malicious, 2) if p in malicious)
    assert set(turns) == malicious and all(abs(c - 200) < 40 for c in turns.values())


def test_fixed_schedule_refuses_impossible_counts():
    with pytest.raises(ValueError, match="cannot put 3 of 2 attackers"):
        round_sample(1, 1, 10, 5, {0, 1}, attackers=3)
    with pytest.raises(ValueError, match="benign"):
        round_sample(1, 1, 4, 4, {0, 1}, attackers=1)  # would need 3 of the 2 benign


# ---- the partition query -----------------------------------------------------------
def _answer(node: int, **metrics) -> Message:
    query = Message(content=RecordDict({"config": ConfigRecord({})}), message_type=PARTITION_QUERY, dst_node_id=node)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=query)


def test_read_roster_keeps_honest_answers_and_refuses_the_rest():
    replies = [
        _answer(11, **{"partition-id": 0, "num-partitions": 4}),
        _answer(12, **{"partition-id": 1, "num-partitions": 4}),
        _answer(13, **{"partition-id": 1, "num-partitions": 4}),  # claims node 12's partition
        _answer(14, **{"partition-id": 4, "num-partitions": 4}),  # not a partition
        _answer(15, **{"partition-id": 2, "num-partitions": 5}),  # another split
        _answer(16, **{"partition-id": 3}),  # a key missing
        _answer(17, **{"partition-id": 2.0, "num-partitions": 4}),  # not an integer
        _answer(18, **{"partition-id": 3, "num-partitions": 4}),
    ]
    roster, refused = read_roster(replies, 4)
    assert roster == {0: 11, 3: 18}  # partition 1 goes to neither claimant
    assert sorted(node for node, _ in refused) == [12, 13, 14, 15, 16, 17]
    why = dict(refused)
    assert "claimed by nodes [12, 13]" in why[12] and "not a partition" in why[14]
    assert "num-partitions=5" in why[15] and "metrics must be exactly" in why[16] and "integers" in why[17]


class RosterGrid(LocalGrid):
    """Node i + 1 serves partition `claims[i]` (default i) and answers the partition query;
    `gone`: nodes that are not connected."""

    def __init__(self, nodes: int, claims: dict[int, int] | None = None, gone: frozenset[int] = frozenset(),
                 partitions: int | None = None) -> None:
        super().__init__(nodes)
        self.claims, self.gone, self.sent = claims or {}, gone, []
        self.partitions = partitions or nodes

    def get_node_ids(self):
        return [n for n in super().get_node_ids() if n not in self.gone]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.sent.append(messages)
        assert all(m.metadata.message_type == PARTITION_QUERY for m in messages)
        return [Message(content=RecordDict({"metrics": MetricRecord({
            "partition-id": self.claims.get(m.metadata.dst_node_id - 1, m.metadata.dst_node_id - 1),
            "num-partitions": self.partitions})}), reply_to=m) for m in messages]


def _state(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full((2, 2), value, np.float32))})


def test_sampled_trains_exactly_the_rounds_partitions_with_the_rule_unchanged():
    n, k = 12, 4
    cfg = ExperimentConfig.defaults(num_clients=n, clients_per_round=k)
    rule = build_rule("fedavg", cfg)
    # node of partition p is p + 5 here: the roster, not the node ids, decides who trains
    grid = RosterGrid(n + 5, claims={i: i - 5 for i in range(n + 5)}, partitions=n)
    sampled = Sampled(rule, choose=sample_plan(3, n, k, {0, 1, 2}, None), num_partitions=n)
    for rnd in (1, 2):
        sent = list(sampled.configure_train(rnd, _state(0.0), ConfigRecord(), grid))
        expected = round_sample(3, rnd, n, k)
        assert sorted(m.metadata.dst_node_id for m in sent) == [p + 6 for p in expected]
        # each reply's weight w = partition id: FedAvg of equal weights over the sample
        replies = [Message(content=RecordDict({"arrays": _state(float(m.metadata.dst_node_id - 6)),
                                               "metrics": train_metrics(100, m.metadata.dst_node_id - 6)}),
                           reply_to=m) for m in sent]
        arrays, _ = sampled.aggregate_train(rnd, replies)
        assert np.allclose(arrays["w"].numpy(), np.mean(expected))
    assert len(grid.sent) == 1  # the partition query, once, before round 1
    assert [r["partitions"] for r in sampled.participation] == [round_sample(3, 1, n, k), round_sample(3, 2, n, k)]
    refused = [f for f in sampled.failures if f["round"] == 0]
    assert {f["node"] for f in refused} == {1, 2, 3, 4, 5}  # their claims -5..-1 are not partitions


def test_a_node_that_answers_one_partition_and_trains_as_another_is_refused():
    n = 6
    cfg = ExperimentConfig.defaults(num_clients=n, clients_per_round=n, attacker_schedule="fixed",
                                    attackers_per_round=2, mcr=0.34)
    rule = build_rule("fedavg", cfg)
    sampled = Sampled(rule, choose=lambda rnd, available: list(range(n)), num_partitions=n)
    sent = list(sampled.configure_train(1, _state(0.0), ConfigRecord(), RosterGrid(n)))
    replies = [Message(content=RecordDict({"arrays": _state(1.0 if m.metadata.dst_node_id != 2 else 99.0),
                                           # node 2 answered partition 1, now claims partition 5
                                           "metrics": train_metrics(100, 5 if m.metadata.dst_node_id == 2
                                                                    else m.metadata.dst_node_id - 1)}),
                       reply_to=m) for m in sent]
    arrays, _ = sampled.aggregate_train(1, replies)
    assert np.array_equal(arrays["w"].numpy(), np.ones((2, 2), np.float32))
    assert [(f["node"], f["kind"]) for f in sampled.failures] == [(2, "rejected")]
    assert "served partition 1 before" in sampled.failures[0]["reason"]


def test_unreachable_sample_is_recorded_and_a_round_below_min_clients_is_skipped():
    n, k = 8, 4
    cfg = ExperimentConfig.defaults(num_clients=n, clients_per_round=k, min_clients=3)
    wanted = round_sample(9, 1, n, k)
    grid = RosterGrid(n)
    sampled = Sampled(build_rule("fedavg", cfg), choose=sample_plan(9, n, k, (), None), num_partitions=n)
    sampled.roster = sampled.ask_roster(grid)
    grid.gone = frozenset({wanted[0] + 1})  # one of the round's nodes left after the query
    sent = list(sampled.configure_train(1, _state(0.0), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id - 1 for m in sent) == wanted[1:]
    assert sampled.participation[0]["unreachable"] == [wanted[0]]
    grid.gone = frozenset({p + 1 for p in wanted[:2]})  # 2 of 4 reachable < min-clients 3
    assert list(sampled.configure_train(1, _state(0.0), ConfigRecord(), grid)) == []
    assert sampled.failures[-1]["kind"] == "refused" and "round skipped" in sampled.failures[-1]["reason"]


def test_a_partition_two_nodes_claim_leaves_the_draw_and_every_round_stays_full():
    """Node 1 (partition 0) also claims partition 5: both leave the roster, and each round
    draws its 5 clients from the 8 partitions that answered honestly (none is skipped)."""
    n, k = 10, 5
    cfg = ExperimentConfig.defaults(num_clients=n, clients_per_round=k)
    sampled = Sampled(build_rule("fedavg", cfg), choose=sample_plan(4, n, k, (), None), num_partitions=n)
    grid = RosterGrid(n, claims={0: 5})
    for rnd in range(1, 21):
        sent = list(sampled.configure_train(rnd, _state(0.0), ConfigRecord(), grid))
        trained = sorted(m.metadata.dst_node_id - 1 for m in sent)
        assert len(trained) == k and not {0, 5} & set(trained)
        assert trained == round_sample(4, rnd, n, k, available=[1, 2, 3, 4, 6, 7, 8, 9])
    assert {f["node"] for f in sampled.failures} == {1, 6}  # both claimants of partition 5, in round 0


def test_with_fewer_answers_than_asked_the_fixed_schedule_takes_what_there_is():
    got = round_sample(1, 1, 10, 4, {0, 1, 2}, attackers=2, available=[0, 5, 6, 7, 8])
    assert len(got) == 4 and set(got) <= {0, 5, 6, 7, 8} and 0 in got  # the one attacker left, 3 benign
    assert round_sample(1, 1, 10, 4, available=[2, 3]) == [2, 3]


# ---- settings that count the round's clients -----------------------------------------
def test_counts_follow_the_round_not_the_population():
    cfg = ExperimentConfig.defaults(num_clients=100, clients_per_round=10, mcr=0.2)
    assert (cfg.round_clients, cfg.round_attackers, cfg.min_replies) == (10, 2, 5)
    assert krum_f(cfg) == 2 and scaling_factor(cfg) == 5.0  # 10 clients / 2 attackers
    fixed = cfg.replace(attacker_schedule="fixed", attackers_per_round=3)
    assert (fixed.round_attackers, krum_f(fixed), scaling_factor(fixed)) == (3, 3, 10 / 3)
    everyone = ExperimentConfig.defaults(num_clients=10)  # the paper: all train, 4 attackers
    assert (everyone.round_clients, everyone.round_attackers, everyone.min_replies, everyone.sampled) == (10, 4, 5, False)
    assert ExperimentConfig.defaults(num_clients=10, attacker_schedule="fixed").sampled


@pytest.mark.parametrize("changes, message", [
    ({"clients_per_round": 11}, "clients-per-round=11 is not allowed"),
    ({"clients_per_round": 4, "min_clients": 5}, "min-clients=5 is not allowed: 0 (auto: half) or 1..4"),
    ({"attacker_schedule": "always"}, "attacker-schedule='always' is not allowed"),
    ({"attackers_per_round": 2}, "needs attacker-schedule='fixed'"),
    ({"attacker_schedule": "fixed", "attackers_per_round": 5}, "5 attackers in each round of 10 clients"),
    ({"attacker_schedule": "fixed", "clients_per_round": 8, "attackers_per_round": 1}, "is not possible"),
    ({"attacker_schedule": "fixed", "clients_per_round": 3, "attackers_per_round": 4}, "4 attackers in each round of 3"),
    ({"clients_per_round": 6, "aggregation": "bulyan", "krum_f": 1}, "needs clients per round >= 4*krum-f + 3"),
    ({"clients_per_round": 4, "aggregation": "rlr", "rlr_theta": 5}, "rlr-theta=5 is not allowed with 4 clients"),
    ({"clients_per_round": 4, "aggregation": "multikrum", "krum_f": 1, "multikrum_m": 5}, "multikrum-m=5"),
])
def test_settings_that_cannot_work_with_the_rounds_sample_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
                       .replace("+", r"\+")):
        check_experiment(ExperimentConfig.defaults(num_clients=10, **changes))


def test_bulyan_fits_a_round_of_seven_with_one_attacker():
    check_experiment(ExperimentConfig.defaults(num_clients=50, clients_per_round=7, mcr=0.1, aggregation="bulyan"))


def test_a_sampled_run_trains_the_seeded_sample_with_one_attacker_each_round(flain_cli, tmp_path):
    """Real simulation: 6 clients (2 attackers), 3 of them per round with exactly 1 attacker,
    FoolsGold (histories by partition, so it sees who trained), 3 rounds on 5% of the data."""
    import json

    from attacks import malicious_clients
    from launch.superlink import SOURCE_ROOT

    run_dir = tmp_path / "sampled"
    settings = {"num-clients": 6, "clients-per-round": 3, "attacker-schedule": "'fixed'", "attackers-per-round": 1,
                "mcr": 0.34, "num-rounds": 3, "train-fraction": 0.05, "aggregation": "'foolsgold'",
                "post-defenses": "'flain'", "run-dir": f"'{run_dir}'", "data-dir": f"'{SOURCE_ROOT / 'data'}'"}
    proc = flain_cli("run", *(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["client_failures"] == []
    malicious = malicious_clients(6, 2, 42)
    expected = [round_sample(42, rnd, 6, 3, malicious, attackers=1) for rnd in (1, 2, 3)]
    assert [entry["partitions"] for entry in summary["participation"]] == expected
    # the rule aggregated exactly the sampled partitions, and one attacker replied each round
    assert [sorted(map(int, entry["weights"])) for entry in summary["defense_log"]] == expected
    assert [entry["round"] for entry in summary["attack_log"]] == [1, 2, 3]
