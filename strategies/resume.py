"""What a strategy keeps across rounds, saved and put back, and a loop that starts later.

A resumed run must aggregate round r + 1 as the uninterrupted run would. Every random stream
is drawn per round from the seed (experiment/seeds.py), so what a rule carries from round to
round is only what it accumulated: FoolsGold's update histories, and the logs that end up in
summary.json (failures, the attackers' reports, what the rule did, who was sampled). Each
class names its own in `RESUMABLE`; `kept_state` collects them through the class hierarchy
(wrappers included) and `restore_state` puts them back. Node ids are not kept: they change
when the federation restarts (the partition query and the first replies learn them again).

Not kept, because it lives on the nodes: an attack's memory in Flower's `context.state`
(Neurotoxin's previous global model). Flower's simulation does not persist node state across
runs, so a resumed Neurotoxin attacker starts its first round after the resume without it,
as in its first round.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.wrapping import StrategyWrapper


def _chain(strategy: Any) -> list[Any]:
    """The strategy and every strategy it wraps (`.strategy`), outermost first."""
    chain = []
    while strategy is not None and all(strategy is not s for s in chain):
        chain.append(strategy)
        strategy = vars(strategy).get("strategy")
    return chain


def _names(obj: Any) -> list[str]:
    return sorted({name for cls in type(obj).__mro__ for name in vars(cls).get("RESUMABLE", ())})


def _to_saveable(value: Any) -> Any:
    """numpy -> torch (torch.load(weights_only=True) reads tensors and plain containers)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_saveable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_saveable(v) for v in value]
    return value


def _from_saved(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _from_saved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_saved(v) for v in value]
    return value


def kept_state(strategy: Strategy) -> dict[str, dict[str, Any]]:
    """{class name: {attribute: value}} for the strategy and what it wraps, saveable with torch."""
    return {type(s).__name__: {name: _to_saveable(copy.deepcopy(getattr(s, name))) for name in _names(s)}
            for s in _chain(strategy) if _names(s)}


def _problem(value: Any, like: Any) -> str | None:
    """Why a saved attribute cannot replace `like` (its fresh value): the logs are lists of
    records, the histories {partition: one finite vector}, all of one length."""
    if type(value) is not type(like):
        return f"is a {type(value).__name__}, expected a {type(like).__name__}"
    if isinstance(value, list) and not all(isinstance(e, dict) and all(isinstance(k, str) for k in e) for e in value):
        return "holds entries that are not records"
    if isinstance(value, dict):
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return "has keys that are not partition ids"
        vectors = list(value.values())
        if not all(isinstance(v, np.ndarray) and v.ndim == 1 and np.isfinite(v).all() for v in vectors):
            return "holds values that are not finite vectors"
        if len({len(v) for v in vectors}) > 1:
            return "holds vectors of different lengths"
    return None


def restore_state(strategy: Strategy, state: dict[str, dict[str, Any]]) -> None:
    """Put `kept_state`'s values back. A state of other classes or attributes, or with a value
    of another shape than the strategy keeps (a damaged or edited file), is refused whole
    (ValueError), before anything is changed."""
    if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
        raise ValueError("saved state is not {class: {attribute: value}}")
    chain = {type(s).__name__: s for s in _chain(strategy) if _names(s)}
    if set(state) != set(chain):
        raise ValueError(f"saved state is of {sorted(state)}, this run's strategy is {sorted(chain)}")
    restored = {}
    for owner, values in state.items():
        if set(values) != set(_names(chain[owner])):
            raise ValueError(f"saved state of {owner} holds {sorted(values)}, expected {_names(chain[owner])}")
        for name, value in values.items():
            value = _from_saved(value)
            problem = _problem(value, getattr(chain[owner], name))
            if problem:
                raise ValueError(f"saved state of {owner}.{name} {problem}")
            restored[owner, name] = value
    for (owner, name), value in restored.items():
        setattr(chain[owner], name, value)


class Offset(StrategyWrapper):
    """`strategy` as round `offset + r` where Flower's loop says round r (a resumed run's loop
    starts again at 1)."""

    def __init__(self, strategy: Strategy, offset: int) -> None:
        super().__init__(strategy)
        self.offset = offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def shifted(self, fn: Callable[[int, ArrayRecord], MetricRecord | None] | None
                ) -> Callable[[int, ArrayRecord], MetricRecord | None] | None:
        """A central evaluation that is told the true round."""
        return None if fn is None else (lambda rnd, arrays: fn(rnd + self.offset, arrays))
