"""Post-training defenses on small generated models: a planted backdoor that FLAIN removes,
Pruning and federated pruning `apply`, the evaluator, and device-agnostic masks.

`DEVICES`: the CPU, PyTorch's `meta` device (no data: a device other than the CPU on every
machine, so a mask left on the CPU fails here as it would on a GPU), and CUDA where present."""

from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from torch import nn

from attacks.triggers import PixelTrigger
from experiment.config import ExperimentConfig
from server.evaluation import Evaluator
from strategies import AGGREGATIONS
from strategies.aggregation.reply_guard import ReplyLimits
from strategies.post_training import PostTrainingInput
from strategies.post_training.fedpruning import RANKING_MESSAGE, FedPruning, clip_extremes
from strategies.post_training.flain import Flain, flip_updates
from strategies.post_training.pruning import Pruning, prune_columns
from strategies.post_training.tau import TauView
from tests import oracles
from tests.grids import LocalGrid, train_metrics

# the CUDA cases show as skipped where there is no GPU (they run on one)
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", "meta", CUDA]
COMPUTE_DEVICES = ["cpu", CUDA]
Z, HIDDEN, BACKDOOR = 20, 8, 19  # tau's inputs; input 19 is the planted backdoor feature


# ---- a planted backdoor ----------------------------------------------------------------
def _features(n: int, triggered: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean class 0 lights inputs 0-9, class 1 inputs 10-18; input 19 is silent on clean
    data and strong on triggered data (which is class-0 data labelled 1 by the attacker)."""
    labels = torch.zeros(n, dtype=torch.long) if triggered else torch.arange(n) % 2
    x = 0.1 * torch.rand(n, Z, generator=g)
    strength = 0.2 + 0.05 * torch.arange(Z)  # inputs differ in how active they are
    for i, c in enumerate(labels.tolist()):
        lit = slice(0, 10) if c == 0 or triggered else slice(10, 19)
        x[i, lit] += strength[lit] * (0.5 + 0.5 * torch.rand(x[i, lit].shape, generator=g))
    x[:, BACKDOOR] = 3.0 if triggered else 0.0
    return x, torch.ones(n, dtype=torch.long) if triggered else labels


def _backdoored_model(device: str) -> tuple[nn.Sequential, dict[str, torch.Tensor], torch.Generator]:
    """(trained model, W0 state, generator): trained from W0 on clean + poisoned features."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(Z, HIDDEN), relu=nn.ReLU(), fc2=nn.Linear(HIDDEN, 2)))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    clean_x, clean_y = _features(400, False, g)
    bad_x, bad_y = _features(120, True, g)
    x, y = torch.cat([clean_x, bad_x]), torch.cat([clean_y, bad_y])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.to(device).eval(), {k: v.to(device) for k, v in initial.items()}, g


def _rates(model: nn.Module, g: torch.Generator, device: str) -> tuple[float, float]:
    clean_x, clean_y = _features(400, False, g)
    bad_x, _ = _features(200, True, g)
    with torch.no_grad():
        acc = (model(clean_x.to(device)).argmax(1).cpu() == clean_y).float().mean().item()
        asr = (model(bad_x.to(device)).argmax(1).cpu() == 1).float().mean().item()
    return acc, asr


def _fresh(state: dict[str, torch.Tensor], device: str) -> nn.Sequential:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(Z, HIDDEN), relu=nn.ReLU(), fc2=nn.Linear(HIDDEN, 2)))
    model.load_state_dict(state)
    return model.to(device).eval()


def _accuracy(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """The planted model with `state`, its plain accuracy on (x, y), on the CPU."""
    with torch.no_grad():
        return (_fresh(state, "cpu")(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("device", COMPUTE_DEVICES)
def test_flain_removes_a_planted_backdoor(device):
    model, initial, g = _backdoored_model(device)
    acc0, asr0 = _rates(model, g, device)
    assert acc0 > 0.95 and asr0 > 0.95  # the backdoor is in
    aux_x, aux_y = _features(200, False, g)  # the server's clean aux set: no trigger in it
    state, info = Flain(step=0.001, rho=0.02, layer="fc1").apply(
        PostTrainingInput(model, initial, aux_x.to(device), aux_y.to(device)))
    assert _rates(_fresh(state, device), g, device)[1] < 0.05  # ASR gone
    assert not info["exhausted"] and info["aux_acc_before"] - info["aux_acc_at_stop"] >= 0.02  # Algorithm 1's stop
    # The mechanism: the backdoor input is the quietest on clean data, so it is flipped
    # first, and flipping its update alone reverses the backdoor at no clean cost.
    activations = TauView.of(model, "fc1", aux_x.to(device), aux_y.to(device)).activations
    assert activations.argmin() == BACKDOOR and activations[BACKDOOR] <= info["threshold"]
    only = torch.zeros(Z, dtype=torch.bool)
    only[BACKDOOR] = True
    alone = dict(model.state_dict(), **{"fc1.weight": flip_updates(initial["fc1.weight"], model.fc1.weight.detach(), only)})
    acc, asr = _rates(_fresh(alone, device), g, device)
    assert asr < 0.05 and acc >= acc0 - 0.01, (acc, asr)
    # the oracle: Algorithm 1 written out (tests/oracles.py) on tau = fc1, the model's first
    # layer, whose inputs' mean is the aux images' mean; every result field
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    aux_x, aux_y = aux_x.cpu(), aux_y.cpu()

    def evaluate(w):
        return _accuracy({**weights, "fc1.weight": w}, aux_x, aux_y)

    naive = oracles.algorithm1(aux_x.mean(0).double().numpy(), initial["fc1.weight"].cpu(), weights["fc1.weight"],
                               0.001, 0.02, evaluate)
    assert torch.allclose(state["fc1.weight"].cpu(), naive.weight, rtol=1e-5, atol=1e-6)
    assert (info["threshold"], info["flipped"], info["aux_acc_before"], info["aux_acc_at_stop"]) == (
        pytest.approx(naive.threshold, abs=1e-8), naive.flipped, naive.acc0, pytest.approx(naive.acc1, abs=1e-6))
    assert info["aux_acc_after"] == pytest.approx(evaluate(state["fc1.weight"].cpu()), abs=1e-6)
    assert (info["layer"], info["inputs"], info["exhausted"], info["split"]) == ("fc1", Z, naive.exhausted, True)
    curve = info["search_curve"]
    assert len(curve["flipped"]) == len(curve["aux_acc"]) == info["evaluations"] >= 2
    assert curve["flipped"][-1] == naive.flipped and curve["aux_acc"][-1] == pytest.approx(naive.acc1, abs=1e-6)
    assert curve["flipped"] == sorted(set(curve["flipped"]))  # each step flips more: only where the set changes
    assert set(info) == {"layer", "threshold", "flipped", "inputs", "aux_acc_before", "aux_acc_at_stop",
                         "aux_acc_after", "exhausted", "evaluations", "exact_fallbacks", "split", "search_curve",
                         "search_seconds"}
    assert isinstance(info["exact_fallbacks"], int) and isinstance(info["search_seconds"], float)  # split: rank-1 scoring
    # the authors' protocol: a given first threshold, past the six quietest inputs
    start = float(np.sort(aux_x.mean(0).double().numpy())[5]) + 0.0005
    state, info = Flain(step=0.001, rho=0.02, layer="fc1", start=start).apply(
        PostTrainingInput(model, initial, aux_x.to(device), aux_y.to(device)))
    naive = oracles.algorithm1(aux_x.mean(0).double().numpy(), initial["fc1.weight"].cpu(), weights["fc1.weight"],
                               0.001, 0.02, evaluate, start=start)
    assert (info["threshold"], info["flipped"]) == (pytest.approx(naive.threshold, abs=1e-8), naive.flipped)
    assert naive.flipped >= 6 and torch.allclose(state["fc1.weight"].cpu(), naive.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("device", COMPUTE_DEVICES)
def test_pruning_apply_zeroes_the_silent_inputs(device):
    model, initial, g = _backdoored_model(device)
    aux_x, aux_y = _features(200, False, g)
    state, info = Pruning(step=0.001, rho=0.02, layer="fc1").apply(
        PostTrainingInput(model, initial, aux_x.to(device), aux_y.to(device)))
    zero_columns = (state["fc1.weight"] == 0).all(0)
    assert bool(zero_columns[BACKDOOR]) and int(zero_columns.sum()) == info["pruned"] >= 1
    for k, v in model.state_dict().items():  # only tau's weight changes; the model is untouched
        assert torch.equal(state[k].to(device), v) == (k != "fc1.weight"), k
    # the oracle: the paper's Pruning loop on tau = fc1 (the model's first layer: x is the input mean)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    aux_x, aux_y = aux_x.cpu(), aux_y.cpu()

    def evaluate(w):
        return _accuracy({**weights, "fc1.weight": w}, aux_x, aux_y)

    want, pruned, lam = oracles.pruning(aux_x.mean(0).double().numpy(), weights["fc1.weight"], 0.001, 0.02, evaluate)
    assert (info["pruned"], info["threshold"]) == (pruned, pytest.approx(lam, abs=1e-8))
    assert torch.equal(state["fc1.weight"].cpu(), want)
    assert info["layer"] == "fc1" and info["inputs"] == Z and info["aux_acc_before"] == evaluate(weights["fc1.weight"])
    assert info["aux_acc_after"] == evaluate(want) and info["evaluations"] >= 2 and not info["exhausted"]
    assert isinstance(info["search_seconds"], float)  # its value is timing: benchmarks/, not here
    # the authors' protocol: a given first threshold (flain-start) instead of min + step
    x = aux_x.mean(0).double().numpy()
    start = float(np.sort(x)[3]) + 0.0005  # past the four quietest inputs
    state, info = Pruning(step=0.001, rho=0.02, layer="fc1", start=start).apply(
        PostTrainingInput(model, initial, aux_x.to(device), aux_y.to(device)))
    want, pruned, lam = oracles.pruning(x, weights["fc1.weight"], 0.001, 0.02, evaluate, start=start)
    assert (info["pruned"], info["threshold"]) == (pruned, pytest.approx(lam, abs=1e-8)) and pruned >= 4
    assert torch.equal(state["fc1.weight"].cpu(), want)


FINETUNE_STEP = 0.5


class RankingGrid(LocalGrid):
    """An in-process federation for the ranking query: node i answers with the real client
    ranking (`client.training.input_ranks`) on its own data."""

    def __init__(self, data: list[torch.Tensor]) -> None:
        super().__init__(len(data))
        self.data = data

    def send_and_receive(self, messages, *, timeout=None):
        from client.training import input_ranks

        replies = []
        for msg in messages:
            if msg.metadata.message_type != RANKING_MESSAGE:  # a fine-tuning round: every client moves by +STEP
                arrays = msg.content["arrays"].to_torch_state_dict()
                content = RecordDict({"arrays": ArrayRecord({k: v + FINETUNE_STEP for k, v in arrays.items()}),
                                      "metrics": train_metrics(len(self.data[msg.metadata.dst_node_id - 1]),
                                                               msg.metadata.dst_node_id - 1)})
                replies.append(Message(content=content, reply_to=msg))
                continue
            model = nn.Sequential(OrderedDict(fc1=nn.Linear(Z, HIDDEN), relu=nn.ReLU(), fc2=nn.Linear(HIDDEN, 2)))
            model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
            images = self.data[msg.metadata.dst_node_id - 1]
            ranks = input_ranks(model, str(msg.content["config"]["layer"]), images)
            content = RecordDict({"ranks": ArrayRecord({"ranks": Array(ranks)}),
                                  "metrics": MetricRecord({"num-examples": len(images),
                                                           "partition-id": msg.metadata.dst_node_id - 1})})
            replies.append(Message(content=content, reply_to=msg))
        return replies


def _fedpruning_input(grid_type: type, sizes=(100, 100, 100), last_round: int = 0):
    """(model, initial, aux images, aux labels, client features, strategy, PostTrainingInput) for
    FedPruning on the planted backdoor, with clients answering through `grid_type`."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    model, initial, g = _backdoored_model("cpu")
    aux_x, aux_y = _features(200, False, g)
    clients = [_features(n, False, g)[0] for n in sizes]
    strategy = AGGREGATIONS["fedavg"](ExperimentConfig.defaults(num_clients=3), frozenset(), ReplyLimits.uniform(3, 100))
    inp = PostTrainingInput(model, initial, aux_x, aux_y, grid=grid_type(clients), strategy=strategy,
                            last_round=last_round)
    return model, initial, aux_x, aux_y, clients, strategy, inp


@pytest.mark.slow
def test_fedpruning_apply_prunes_by_the_clients_rankings():
    model, initial, aux_x, aux_y, _, _, inp = _fedpruning_input(RankingGrid)
    state, info = FedPruning(rate=0.1, extreme=0.0, layer="fc1").apply(inp)  # 10% of 20 inputs: 2
    zero_columns = (state["fc1.weight"] == 0).all(0)
    assert info["clients"] == 3 and info["pruned"] == 2 == int(zero_columns.sum())
    assert bool(zero_columns[BACKDOOR])  # silent on every client's clean data: ranked lowest
    with pytest.raises(RuntimeError, match="needs the Flower grid"):
        FedPruning().apply(PostTrainingInput(model, initial, aux_x, aux_y))

    # two fine-tuning rounds: FedAvg of three equal +0.5 updates, twice; the pruned columns stay zero
    tuned, tuned_info = FedPruning(rate=0.1, extreme=0.0, layer="fc1", finetune_rounds=2).apply(inp)
    assert tuned_info["finetune_rounds"] == 2 and tuned.keys() == state.keys()
    for key in state:
        want = state[key] + 2 * FINETUNE_STEP
        if key == "fc1.weight":
            want[:, zero_columns] = 0.0
        assert torch.allclose(tuned[key], want, atol=1e-6), key


class TimedRankingGrid(RankingGrid):
    """RankingGrid that records each call's deadline."""

    def __init__(self, data: list[torch.Tensor]) -> None:
        super().__init__(data)
        self.timeouts: list[float | None] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        return super().send_and_receive(messages, timeout=timeout)


def test_fedpruning_fine_tuning_continues_the_round_count_and_waits_with_a_deadline():
    """After a 5-round training, two fine-tuning rounds are rounds 6 and 7 for the strategy
    (its records and seeded noise are per round) and every wait on the grid has the deadline."""
    *_, strategy, inp = _fedpruning_input(TimedRankingGrid, last_round=5)
    rounds = []

    def spy(name):
        method = getattr(strategy, name)

        def call(server_round, *args):
            rounds.append((name, server_round))
            return method(server_round, *args)
        setattr(strategy, name, call)

    spy("configure_train")
    spy("aggregate_train")
    FedPruning(rate=0.1, extreme=0.0, layer="fc1", finetune_rounds=2, timeout=123.0).apply(inp)
    assert rounds == [("configure_train", 6), ("aggregate_train", 6), ("configure_train", 7), ("aggregate_train", 7)]
    assert inp.grid.timeouts == [123.0] * 3  # the ranking query, then each fine-tuning round


# ---- the evaluator -------------------------------------------------------------------
def test_evaluator_measures_acc_on_clean_and_asr_on_stamped_source_images():
    # A 4x4 "image" model: class 1 iff the bottom-right pixel is bright.
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, -5.0]))
        model[1].weight[1, 15] = 10.0
    images = torch.randint(0, 100, (40, 1, 4, 4), dtype=torch.uint8)  # dark: predicted 0
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 20)
    mask = np.zeros((4, 4), dtype=bool)
    mask[3, 3] = True
    evaluator = Evaluator(model, images, labels, PixelTrigger(mask), source=2, target=1)
    assert evaluator.triggered.shape == (20, 1, 4, 4)  # only the source-label images are stamped
    m = evaluator(model.state_dict())
    assert m == {"acc": 0.25, "asr": 1.0}
    with torch.no_grad():
        model[1].weight[1, 15] = 0.0  # the trigger no longer works
    assert evaluator(model.state_dict()) == {"acc": 0.25, "asr": 0.0}


# ---- masks on the weight's device ------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("as_numpy", [True, False])
def test_masks_and_signs_follow_the_weight_device(device, as_numpy):
    w0, w = torch.randn(3, 5, device=device), torch.randn(3, 5, device=device)
    mask = np.array([True, False, True, False, False])
    mask = mask if as_numpy else torch.from_numpy(mask)  # built on the CPU, as the search builds it
    for out in (flip_updates(w0, w, mask), prune_columns(w, mask)):
        assert out.device.type == device and out.shape == (3, 5)
    if device != "meta":  # (boolean indexing has no meta kernel)
        assert clip_extremes(w, mask, 1.0)[0].device.type == device
        flipped = flip_updates(w0, w, mask).cpu()
        assert torch.allclose(flipped[:, 0], (2 * w0 - w).cpu()[:, 0]) and torch.allclose(flipped[:, 1], w.cpu()[:, 1])
        assert (prune_columns(w, mask).cpu()[:, [0, 2]] == 0).all()


def test_each_defense_takes_every_setting_from_the_config():
    """Every setting that is not the default reaches the defense built by the registry."""
    from strategies.post_training import POST_DEFENSES
    from strategies.post_training.flain_cv import FlainCV
    from strategies.post_training.flain_subspace import FlainSubspace

    cfg = ExperimentConfig.defaults(
        flain_step=0.002, flain_rho=0.05, flain_layer="fc2", flain_start=0.0005, seed=7,
        flain_cv_tol=0.03, flain_cv_folds=3, flain_cv_scores="split", flain_cv_select="first-beyond",
        flain_cv_accuracy="balanced", flain_subspace_tol=0.04, flain_subspace_folds=4, flain_subspace_augment="none",
        fedpruning_rate=0.2, fedpruning_extreme=1.5, fedpruning_finetune_rounds=2)
    assert {name: POST_DEFENSES[name].from_config(cfg) for name in POST_DEFENSES} == {
        "flain": Flain(step=0.002, rho=0.05, layer="fc2", start=0.0005),
        "pruning": Pruning(step=0.002, rho=0.05, layer="fc2", start=0.0005),
        "flain-cv": FlainCV(tol=0.03, folds=3, scores="split", select="first-beyond", balanced=True, soft=False,
                            step=0.002, layer="fc2", seed=7),
        "flain-subspace": FlainSubspace(tol=0.04, folds=4, augment="none", layer="fc2", seed=7),
        "fedpruning": FedPruning(rate=0.2, extreme=1.5, finetune_rounds=2, step=0.002, rho=0.05, layer="fc2"),
    }
    soft = FlainCV.from_config(cfg.replace(flain_cv_accuracy="soft"))
    plain = FlainCV.from_config(cfg.replace(flain_cv_accuracy="plain"))
    assert (soft.balanced, soft.soft, plain.balanced, plain.soft) == (False, True, False, False)
    assert Flain.from_config(ExperimentConfig.defaults()).start is None  # -1: the paper's min + step
    assert Flain.from_config(ExperimentConfig.defaults(flain_start=0.0)).start == 0.0  # 0 is a threshold too


def test_each_defense_notes_what_it_did():
    from strategies.post_training.flain_cv import FlainCV
    from strategies.post_training.flain_subspace import FlainSubspace

    flain = {"threshold": 0.00812, "flipped": 4767, "inputs": 9216}
    assert Flain.note(flain) == "lambda=0.0081 flipped=4767/9216"
    assert Flain.note(flain | {"exhausted": True}) == "lambda=0.0081 flipped=4767/9216 (all flipped)"
    assert Flain.note({"threshold": 0.1, "flipped": 3}) == "lambda=0.1000 flipped=3/?"  # a result written before `inputs`
    cv = {"flipped": 3454, "inputs": 9216, "estimated_drop": 0.01683}
    assert FlainCV.note(cv) == "flipped=3454/9216 (cross-fitted aux drop 0.0168)"
    assert FlainCV.note(cv | {"exhausted": True}) == ("flipped=3454/9216 (cross-fitted aux drop 0.0168)"
                                                      " ALL FLIPPED: no threshold was chosen")
    assert FlainCV.note({"flipped": 1, "estimated_drop": 0.0}) == "flipped=1/? (cross-fitted aux drop 0.0000)"
    assert Pruning.note({"pruned": 12, "inputs": 128}) == "pruned=12/128"
    assert Pruning.note({"pruned": 12}) == "pruned=12/?"
    assert FedPruning.note({"pruned": 2, "inputs": 20}) == "pruned=2/20"
    assert FedPruning.note({"pruned": 2}) == "pruned=2/?"
    assert FlainSubspace.note({"kept_directions": 5, "directions": 40, "eps": 0.0123, "estimated_drop": 0.0091}) == (
        "kept 5/40 clean directions (eps=0.012, cross-fitted aux drop 0.0091)")
    assert FlainSubspace.note({"kept_directions": None}) == "nothing flipped (every flip costs more than the tolerance)"


def _ranking_reply(ranks: np.ndarray, **metrics: float) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    sent = Message(content=RecordDict(), message_type=RANKING_MESSAGE, dst_node_id=2)
    values = {"num-examples": 50, "partition-id": 1} | metrics
    return Message(content=RecordDict({"ranks": ArrayRecord({"ranks": Array(ranks)}),
                                       "metrics": MetricRecord(values)}), reply_to=sent)


@pytest.mark.parametrize("ranks, metrics, refused", [
    (np.array([2, 0, 3, 1]), {}, None),
    (np.array([0, 0, 2, 3]), {}, "ranks is not a ranking of the 4 inputs (a permutation of 0..3)"),
    (np.array([0, 1, 2, 4]), {}, "ranks is not a ranking of the 4 inputs (a permutation of 0..3)"),
    (np.array([2.0, 0.0, 3.0, 1.0]), {}, "dtype"),  # a permutation, but not the int64 ranks asked for
    (np.array([2, 0, 3, 1, 4]), {}, "shape"),
    (np.array([2, 0, 3, 1]), {"num-examples": 1000}, "num-examples"),  # more than its partition holds
])
def test_a_ranking_reply_is_checked_like_a_training_reply(ranks, metrics, refused):
    from strategies.post_training.fedpruning import ranking_problem

    problem = ranking_problem(_ranking_reply(ranks, **metrics), 4, ReplyLimits.uniform(3, 100))
    if refused is None or refused.startswith("ranks is not"):
        assert problem == refused
    else:
        assert problem is not None and refused in problem, problem


class CorruptRankingGrid(RankingGrid):
    """Node 3 answers the ranking query with a ranking that repeats an input."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if reply.metadata.src_node_id == 3 and "ranks" in reply.content.array_records:
                ranks = reply.content["ranks"]["ranks"].numpy().copy()
                ranks[0] = ranks[1]
                reply.content["ranks"] = ArrayRecord({"ranks": Array(ranks)})
        return replies


@pytest.mark.slow
def test_fedpruning_leaves_out_and_records_a_malformed_ranking():
    *_, strategy, inp = _fedpruning_input(CorruptRankingGrid, last_round=4)
    _, info = FedPruning(rate=0.1, extreme=0.0, layer="fc1").apply(inp)
    assert info["clients"] == 2
    (failure,) = strategy.failures
    assert (failure["round"], failure["node"], failure["partition"], failure["kind"]) == (4, 3, 2, "rejected")
    assert failure["reason"] == f"ranking query: ranks is not a ranking of the {Z} inputs (a permutation of 0..{Z - 1})"


class FailingRankingGrid(RankingGrid):
    """Node 2 answers the ranking query with an error (a crashed client)."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        return [Message(error=Error(code=0, reason="node died"), reply_to=m) if r.metadata.src_node_id == 2 else r
                for r, m in zip(replies, messages)]


def test_fedpruning_records_an_error_reply_to_the_ranking_query_as_an_error():
    *_, strategy, inp = _fedpruning_input(FailingRankingGrid, last_round=4)
    _, info = FedPruning(rate=0.1, extreme=0.0, layer="fc1").apply(inp)
    assert info["clients"] == 2
    (failure,) = strategy.failures
    assert (failure["round"], failure["node"], failure["partition"], failure["kind"]) == (4, 2, None, "error")
    assert failure["reason"] == "ranking query: node died"
    with pytest.raises(RuntimeError, match="^fedpruning needs the training strategy's reply limits to check the "
                                           "rankings$"):
        FedPruning(rate=0.1, extreme=0.0, layer="fc1").apply(replace(inp, strategy=object()))


@pytest.mark.slow
@pytest.mark.parametrize("step", [0.01, 0.15])
def test_fedpruning_by_default_prunes_by_the_papers_schedule_on_the_weighted_mean_rank(step):
    """rate 0 (the default): Pruning's adaptive threshold, on the clients' example-weighted
    mean rank scaled to [0, 1] instead of the aux activations; restated with the oracle. A step
    of 0.15 takes several inputs at a time, so the scale of the mean rank matters."""
    from client.training import input_ranks

    sizes = (50, 80, 100)
    model, _, aux_x, aux_y, clients, _, inp = _fedpruning_input(RankingGrid, sizes)
    state, info = FedPruning(rate=0.0, extreme=0.0, step=step, rho=0.02, layer="fc1").apply(inp)

    weights = {k: v.detach() for k, v in model.state_dict().items()}
    ranks = np.stack([input_ranks(model, "fc1", x) for x in clients]).astype(np.float64)
    mean_rank = (np.array(sizes, dtype=np.float64)[:, None] * ranks).sum(0) / sum(sizes) / (Z - 1)

    def evaluate(w):
        return _accuracy({**weights, "fc1.weight": w}, aux_x, aux_y)

    want, pruned, _ = oracles.pruning(mean_rank, weights["fc1.weight"], step, 0.02, evaluate)
    assert torch.equal(state["fc1.weight"], want)
    info.pop("search_seconds")
    assert info == {"layer": "fc1", "clients": 3, "pruned": pruned, "inputs": Z, "clipped": 0, "finetune_rounds": 0,
                    "aux_acc_before": evaluate(weights["fc1.weight"]), "aux_acc_after_pruning": evaluate(want)}
