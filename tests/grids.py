"""In-process stand-ins for the parts of a Flower Grid a test drives (node ids, and
optionally answers); every other Grid method refuses."""

from collections.abc import Iterable

from flwr.app import MetricRecord
from flwr.serverapp import Grid

from strategies.aggregation.reply_guard import TRAIN_METRICS, ReplyLimits

LIMITS = ReplyLimits.uniform(16, 1000)  # 16 partitions of at most 1000 examples


def train_metrics(examples: float, partition: int, **overrides: float) -> MetricRecord:
    """The metrics an honest ClientApp sends with a training reply (client/app.py)."""
    values = {key: 0.0 for key in TRAIN_METRICS} | {"num-examples": examples, "partition-id": partition}
    return MetricRecord(values | overrides)


class LocalGrid(Grid):
    """`nodes` connected node ids (1..nodes); `send_and_receive` is the subclass's job."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, self.nodes + 1))

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *a, **k):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


def build_rule(name: str, cfg, buffers: frozenset[str] = frozenset(), limits: ReplyLimits = LIMITS):
    """The `aggregation=` registry's rule for toy arrays. FLTrust's server update (training the
    data set's model on its root set) cannot run on them: it becomes a fixed direction, every
    parameter +1 from the global model (the real one runs in test_robust_rules' simulation)."""
    from strategies import AGGREGATIONS
    from strategies.aggregation import _common
    from strategies.aggregation.fltrust import FLTrust
    from strategies.aggregation.reply_guard import guarded

    if name != "fltrust":
        return AGGREGATIONS[name](cfg, buffers, limits)
    # the server's update: + the round number on every parameter (round 1: all ones)
    return guarded(FLTrust)(server_update=lambda rnd, arrays: {k: v + rnd for k, v in arrays.items()},
                            root_size=cfg.fltrust_root_size, buffer_keys=buffers, **_common(cfg, limits))
