"""FlainDefense, the strategy wrapper: W0 from the arrays `start()` receives, the wrapped
strategy's training unchanged (Flower's FedAvg, exact weighted mean), FLAIN on the final model
equal to the paper's Algorithm 1 written out (tests/oracles.py), and the example app of
examples/add_flain in Flower's simulation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Krum
from torch import nn

from strategies.flain_defense import DefendedResult, FlainDefense, build_defenses
from strategies.post_training.flain import Flain
from strategies.post_training.flain_cv import FlainCV
from tests import oracles
from tests.grids import LocalGrid

PROJECT_ROOT = Path(__file__).resolve().parent.parent
IN, HIDDEN = 12, 10


class TwoLayers(nn.Module):
    """Not a Sequential: a custom forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _w0() -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    return {k: v.clone() for k, v in TwoLayers().state_dict().items()}


def _delta(node: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + node)
    return {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in _w0().items()}


class ClientGrid(LocalGrid):
    """Node i trains by adding its own fixed update to the model it receives, on i examples."""

    def __init__(self, nodes: int) -> None:
        super().__init__(nodes)
        self.rounds = 0

    def send_and_receive(self, messages, *, timeout=None):
        self.rounds += 1
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            state = msg.content["arrays"].to_torch_state_dict()
            trained = {k: v + _delta(node)[k] for k, v in state.items()}
            content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": node})})
            replies.append(Message(content=content, reply_to=msg))
        return replies


def _final(rounds: int = 2) -> dict[str, torch.Tensor]:
    """What FedAvg must train: each round adds the example-weighted mean update (weights 1, 2, 3)."""
    w0 = _w0()
    return {k: w0[k] + rounds * sum(n * _delta(n)[k] for n in (1, 2, 3)) / 6 for k in w0}


def _aux() -> tuple[torch.Tensor, torch.Tensor]:
    """Clean images, labelled as the trained model predicts them: aux accuracy 1 before a flip."""
    images = torch.rand(60, IN, generator=torch.Generator().manual_seed(3)) * 4 - 2  # three classes predicted
    model = TwoLayers()
    model.load_state_dict(_final())
    with torch.no_grad():
        return images, model(images).argmax(1)


class Sink:
    def __init__(self) -> None:
        self.models, self.reports = {}, {}

    def save_model(self, name, state):
        self.models[name] = state

    def post_defense(self, name, result):
        self.reports[name] = result


def _evaluate(aux):
    def evaluate(state):
        model = TwoLayers()
        model.load_state_dict(state)
        with torch.no_grad():
            return {"acc": (model(aux[0]).argmax(1) == aux[1]).float().mean().item()}
    return evaluate


def test_start_trains_unchanged_and_returns_flain_of_the_final_model_against_w0():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    aux, sink, w0 = _aux(), Sink(), _w0()
    wrapped = FlainDefense(FedAvg(fraction_evaluate=0.0), model_fn=TwoLayers, aux=aux, layer="fc1",
                           step=0.01, rho=0.05, evaluate_fn=_evaluate(aux), sink=sink)
    result = wrapped.start(grid=ClientGrid(3), initial_arrays=ArrayRecord(w0), num_rounds=2)
    assert isinstance(result, DefendedResult)
    final = _final()  # the wrapped FedAvg, unchanged
    undefended = result.undefended.to_torch_state_dict()
    for k in w0:
        assert torch.allclose(undefended[k], final[k], atol=1e-5), k
    # FLAIN on the final model with W0 = the initial arrays (not round 1's model): Algorithm 1
    model = TwoLayers()
    model.load_state_dict(undefended)
    x = aux[0].mean(0).double().numpy()  # tau = fc1, the first layer: its inputs are the aux set itself

    def evaluate(w):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.fc1.weight.copy_(w)
            return (m(aux[0]).argmax(1) == aux[1]).float().mean().item()

    naive = oracles.algorithm1(x, w0["fc1.weight"], undefended["fc1.weight"], 0.01, 0.05, evaluate)
    defended = result.arrays.to_torch_state_dict()
    assert torch.allclose(defended["fc1.weight"], naive.weight, atol=1e-6)
    for k in ("fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(defended[k], undefended[k])
    report = result.reports["flain"]
    assert report["flipped"] == naive.flipped and report["layer"] == "fc1"
    assert 0 < naive.flipped < IN and not naive.exhausted  # the search stopped inside
    assert report["acc"] == pytest.approx(evaluate(naive.weight), abs=1e-6)  # evaluate_fn's metrics, on W*
    assert set(result.defended) == {"flain"} and torch.equal(result.defended["flain"].to_torch_state_dict()["fc1.weight"],
                                                             defended["fc1.weight"])
    assert set(sink.models) == {"final", "flain"} and sink.reports["flain"] == report


def test_defenses_by_name_take_the_settings_they_have():
    built = build_defenses(["flain", "flain-cv"], layer="fc1", step=0.01, rho=0.05, start=0.2)
    assert built["flain"] == Flain(step=0.01, rho=0.05, layer="fc1", start=0.2)
    assert built["flain-cv"] == FlainCV(step=0.01, layer="fc1")  # no rho or start: its own rule
    with pytest.raises(ValueError, match="unknown post-training defense 'flame'.*'flain'"):
        build_defenses(["flame"])


class Broken(Flain):
    def apply(self, inp):
        raise RuntimeError("broken on purpose")


def test_a_failing_defense_costs_only_itself():
    aux, w0, final = _aux(), _w0(), _final()
    one = FlainDefense(FedAvg(), model_fn=TwoLayers, aux=aux, defenses={"broken": Broken(), "flain": Flain(layer="fc1")})
    states, reports = one.defend(final, w0)
    assert reports["broken"] == {"error": "RuntimeError: broken on purpose"} and set(states) == {"flain"}
    assert "flipped" in reports["flain"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"strategy": "fedavg"}, TypeError, "must be a Flower Strategy, got str"),
    ({"aux": (torch.rand(5, IN), torch.zeros(4, dtype=torch.long))}, ValueError, r"aux images \(5, 12\) and labels \(4,\)"),
    ({"aux": (torch.rand(5, IN), torch.zeros(5))}, ValueError, "integer class indices"),
    ({"aux": torch.rand(5, IN)}, ValueError, "a pair"),
    ({"defenses": ["flan"]}, ValueError, "unknown post-training defense 'flan'"),
    ({"rho": 5.0}, ValueError, "0 < rho <= 1"),
    ({"step": 0.0}, ValueError, "step > 0"),
    ({"aux": (torch.full((5, IN), float("nan")), torch.zeros(5, dtype=torch.long))}, ValueError, "NaN"),
])
def test_bad_arguments_are_refused_with_one_line(kwargs, error, match):
    args = {"strategy": FedAvg(), "model_fn": TwoLayers, "aux": _aux()} | kwargs
    with pytest.raises(error, match=match):
        FlainDefense(args.pop("strategy"), **args)


def test_wrapping_twice_is_refused_and_any_strategy_is_wrapped():
    once = FlainDefense(Krum(num_malicious_nodes=0), model_fn=TwoLayers, aux=_aux())
    assert "Krum" in repr(once)
    with pytest.raises(TypeError, match="already a FlainDefense"):
        FlainDefense(once, model_fn=TwoLayers, aux=_aux())


@pytest.mark.slow
@pytest.mark.process  # real Flower or a subprocess: mutation runs skip it
def test_example_app_runs_in_flower_simulation(monkeypatch):
    """examples/add_flain: Flower's simulation, 3 clients, 2 rounds; FLAIN's report comes back
    and the defended model differs from the trained one in tau's weight only."""
    monkeypatch.setenv("FLAIN_DATA", str(PROJECT_ROOT / "data"))
    monkeypatch.syspath_prepend(str(PROJECT_ROOT))
    from examples.add_flain import app

    app.RESULTS.clear()
    app.simulate(rounds=2, clients=3)
    assert len(app.RESULTS) == 1
    result = app.RESULTS[0]
    report = result.reports["flain"]
    assert {"acc", "asr", "flipped", "threshold"} <= set(report) and report["layer"] == "fc1"
    trained, defended = result.undefended.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    for k in trained:
        assert torch.equal(trained[k], defended[k]) == (k != "fc1.weight"), k
    assert 0 < report["flipped"] < trained["fc1.weight"].shape[1]


def test_what_would_fail_after_training_is_refused_before_the_first_round():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    cases = [({"layer": "fc9"}, "not a Linear layer"),
             ({"aux": (torch.rand(6, IN + 1), torch.tensor([0, 1, 2, 0, 1, 2]))}, "cannot take the aux images"),
             ({"aux": (torch.rand(6, IN), torch.tensor([0, 1, 5, 0, 1, 2]))}, "aux label 5 is not a class"),
             ({"aux": (torch.rand(6, IN), torch.zeros(6, dtype=torch.long))}, "of 1 class")]
    for change, message in cases:
        grid = ClientGrid(3)
        wrapped = FlainDefense(FedAvg(fraction_evaluate=0.0), model_fn=TwoLayers, **({"aux": _aux()} | change))
        with pytest.raises(ValueError, match=message):
            wrapped.start(grid=grid, initial_arrays=ArrayRecord(_w0()), num_rounds=2)
        assert grid.rounds == 0, change  # no round was trained for nothing


def test_a_trained_model_no_better_than_chance_on_the_aux_set_is_not_defended():
    aux_x, aux_y = _aux()
    wrong = (aux_x, (aux_y + 1) % 3)  # every label shifted: the trained model scores 0 on them
    sink = Sink()
    wrapped = FlainDefense(FedAvg(), model_fn=TwoLayers, aux=wrong, layer="fc1", sink=sink)
    states, reports = wrapped.defend(_final(), _w0())
    assert states == {} and "no better than chance" in reports["flain"]["error"] and sink.reports == reports
