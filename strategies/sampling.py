"""Partial participation: each round, the server trains a sample of its clients.

Flower's strategies sample with `random.sample` over the connected node ids, and a node id
is random per run: the same seed would train different clients in every run, and the
attackers' share of a round could not be fixed (the FLAIN authors' code puts a fixed number
of attackers in every round). So the round's clients are chosen here, by partition id, from
the run's seeded stream (`round_sample`), and handed to the wrapped strategy as the only
nodes it sees: it trains all of them with its own `configure_train` (Flower's fraction 1),
and every rule that counts replies (RLR's theta, Krum's f, FLAME's cluster size) counts the
round's sample.

Which node serves which partition, the server learns once, before round 1, by asking every
node (`query.partition`; client/app.py answers from its node config). The answers are
untrusted: a reply that is not exactly {partition-id, num-partitions} with integers in range,
and every node of a partition that two nodes claim, is refused and recorded; the reply guard
then also refuses a training reply whose partition differs from the node's answer here.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from experiment import seeds
from strategies.wrapping import StrategyWrapper

PARTITION_QUERY = "query.partition"
ROSTER_METRICS = frozenset({"partition-id", "num-partitions"})


def round_sample(seed: int, rnd: int, num_clients: int, k: int, malicious: Collection[int] = (),
                 attackers: int | None = None, available: Collection[int] | None = None) -> list[int]:
    """The partition ids that train in round `rnd`, sorted: `k` drawn uniformly without
    replacement (attackers None), or exactly `attackers` of the malicious ids and k - attackers
    of the others (the fixed schedule). One stream per round: a round's sample does not depend
    on the rounds before it (a resumed run draws the same).

    `available`: draw only from these partitions (those whose node answered the partition
    query); with fewer of a kind than asked, all of them. So a hostile node that claims an
    honest client's partition takes that client out of the draw, but cannot empty a round."""
    rng = seeds.rng(seed, "sampling", rnd)
    pool = list(range(num_clients)) if available is None else sorted({int(p) for p in available
                                                                       if 0 <= p < num_clients})
    if attackers is None:
        return sorted(pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False))
    bad_set = {int(i) for i in malicious}
    bad, good = [p for p in pool if p in bad_set], [p for p in pool if p not in bad_set]
    if available is None and (not 0 <= attackers <= min(k, len(bad)) or k - attackers > len(good)):
        raise ValueError(f"cannot put {attackers} of {len(bad)} attackers in a round of {k} "
                         f"with {len(good)} benign clients")
    a = min(attackers, len(bad))
    chosen = [bad[i] for i in rng.choice(len(bad), size=a, replace=False)]
    chosen += [good[i] for i in rng.choice(len(good), size=min(k - a, len(good)), replace=False)]
    return sorted(chosen)


def roster_problem(reply: Message, num_partitions: int) -> str | None:
    """Why a partition-query reply is not a node's honest-looking answer (None if it is)."""
    if reply.has_error():
        return f"error: {reply.error.reason}"
    content = reply.content
    if list(content.metric_records) != ["metrics"] or content.array_records or content.config_records:
        return "expected exactly one MetricRecord 'metrics'"
    metrics = content.metric_records["metrics"]
    if set(metrics) != ROSTER_METRICS:
        return f"metrics must be exactly {sorted(ROSTER_METRICS)}, got {sorted(metrics)}"
    values = {k: metrics[k] for k in ROSTER_METRICS}
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values.values()):
        return f"partition-id and num-partitions must be integers, got {values}"
    if values["num-partitions"] != num_partitions:
        return f"num-partitions={values['num-partitions']} but num-clients={num_partitions}"
    if not 0 <= values["partition-id"] < num_partitions:
        return f"partition-id={values['partition-id']} is not a partition (0..{num_partitions - 1})"
    return None


def read_roster(replies: Iterable[Message], num_partitions: int
                ) -> tuple[dict[int, int], list[tuple[int, str]]]:
    """(partition id -> node id, [(node, why refused)]) from the partition-query replies.
    A partition claimed by two nodes is given to neither: the server cannot tell which one lies."""
    claims: dict[int, list[int]] = {}
    refused = []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        problem = roster_problem(reply, num_partitions)
        if problem is None:
            claims.setdefault(int(reply.content["metrics"]["partition-id"]), []).append(node)
        else:
            refused.append((node, f"partition query: {problem}"))
    roster = {}
    for partition, nodes in sorted(claims.items()):
        if len(nodes) == 1:
            roster[partition] = nodes[0]
        else:
            refused += [(node, f"partition query: partition {partition} is claimed by nodes {sorted(nodes)}")
                        for node in nodes]
    return roster, refused


class _SampleView:
    """The grid as the wrapped strategy sees it in one round: only the sampled nodes."""

    def __init__(self, grid: Grid, nodes: Sequence[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class Sampled(StrategyWrapper):
    """Wrap `strategy` so that round r trains only the partitions `choose(r, answered)`, where
    `answered` are those whose node answered the partition query.

    `strategy` must train every node it sees (fraction_train 1). `participation` lists, per
    round, the partitions sampled and those that could not be reached.
    """

    RESUMABLE = ("participation",)

    def __init__(self, strategy: Strategy, *, choose: Callable[[int, Sequence[int]], Sequence[int]],
                 num_partitions: int,
                 malicious: Collection[int] = (), timeout: float = 600.0) -> None:
        super().__init__(strategy)
        self.choose, self.num_partitions = choose, num_partitions
        self.malicious, self.timeout = frozenset(malicious), timeout
        self.roster: dict[int, int] | None = None  # partition -> node, asked before round 1
        self.participation: list[dict[str, Any]] = []

    def summary(self) -> None:
        log(INFO, "\t├── clients per round: sampled by partition from the run's seed, of %d", self.num_partitions)
        self.strategy.summary()

    def ask_roster(self, grid: Grid, before_round: int = 1) -> dict[int, int]:
        """Every connected node's partition; refused answers are recorded as failures of the
        round before `before_round` (0; a resumed run asks again, after its last round)."""
        content = RecordDict({"config": ConfigRecord({})})
        messages = [Message(content=content, message_type=PARTITION_QUERY, dst_node_id=node)
                    for node in grid.get_node_ids()]
        roster, refused = read_roster(grid.send_and_receive(messages, timeout=self.timeout), self.num_partitions)
        for node, reason in refused:
            log(WARNING, "node %d refused: %s", node, reason)
            if hasattr(self.strategy, "record"):
                self.strategy.record(before_round - 1, node, "rejected", reason)
        partitions = getattr(self.strategy, "partitions", None)
        if isinstance(partitions, dict):  # the reply guard then holds each node to its answer
            partitions.update({node: p for p, node in roster.items()})
        log(INFO, "[flain] %d of %d partitions answered the partition query", len(roster), self.num_partitions)
        return roster

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.roster is None:
            self.roster = self.ask_roster(grid, server_round)
        wanted = list(self.choose(server_round, sorted(self.roster)))
        connected = set(grid.get_node_ids())
        reached = [p for p in wanted if self.roster.get(p) in connected]
        missed = sorted(set(wanted) - set(reached))
        self.participation.append({"round": server_round, "partitions": reached, "unreachable": missed,
                                   "attackers": sum(p in self.malicious for p in reached)})
        log(INFO, "[flain] round %d trains partitions %s (%d attackers)%s", server_round, reached,
            self.participation[-1]["attackers"], f"; not reachable: {missed}" if missed else "")
        least = getattr(self.strategy, "min_train_nodes", 1)
        if len(reached) < least:
            reason = (f"only {len(reached)} of the {len(wanted)} sampled clients can be reached "
                      f"(min-clients {least}): round skipped")
            log(WARNING, "round %d: %s", server_round, reason)
            if hasattr(self.strategy, "record"):
                self.strategy.record(server_round, 0, "refused", reason)
            return []
        view = _SampleView(grid, [self.roster[p] for p in reached])
        return self.strategy.configure_train(server_round, arrays, config, view)  # type: ignore[arg-type]


def sample_plan(seed: int, num_clients: int, k: int, malicious: Collection[int],
                attackers: int | None) -> Callable[[int, Sequence[int]], list[int]]:
    """`choose` for `Sampled`: (round, answered partitions) -> `round_sample(...)` of that round."""
    frozen = frozenset(malicious)
    return lambda rnd, available: round_sample(seed, rnd, num_clients, k, frozen, attackers, available)
