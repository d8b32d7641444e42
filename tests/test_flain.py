"""FLAIN (Algorithm 1): the flip rule, the threshold jumps, and fast search == plain loop."""

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from strategies.post_training.flain import (
    Flain,
    flain_search,
    flain_search_reference,
    flip_updates,
    frobenius,
    rescale,
)
from strategies.post_training.flip_path import IncrementalFlips
from strategies.post_training.threshold import adaptive_threshold, adaptive_threshold_reference, thresholds
from strategies.post_training.tau import head_accuracy, tau_inputs
from models import split_at
from tests import oracles
from strategies.post_training import PostTrainingInput


def test_flip_rule_on_hand_made_layer():
    # 2 outputs x 3 inputs; columns are input neurons.
    w0 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    w = torch.tensor([[1.5, 1.0, 3.0], [3.0, 5.5, 8.0]])  # dW = [[.5,-1,0],[-1,.5,2]]
    flip = torch.tensor([True, False, True])
    got = flip_updates(w0, w, flip)
    want = torch.tensor([[0.5, 1.0, 3.0], [5.0, 5.5, 4.0]])  # w0 - dW in cols 0, 2
    assert torch.equal(got, want)
    assert torch.equal(flip_updates(w0, w, torch.zeros(3, dtype=torch.bool)), w)


def test_rescale_restores_frobenius_norm():
    w = torch.randn(4, 5)
    out = rescale(w * 3.0, torch.linalg.matrix_norm(w).item())
    assert torch.allclose(out, w, atol=1e-6)
    assert torch.equal(rescale(torch.zeros(4, 5), 2.0), torch.zeros(4, 5))  # nothing to scale: no 0/0


def test_rescale_hits_the_norm_of_a_large_float32_layer():
    """A 256 x 9216 layer (tau of the FMNIST network): summed in float32 its norm is off by
    about 1e-5 relative; the rescaled W* must have the trained norm to float32's resolution."""
    g = torch.Generator().manual_seed(0)
    w = 0.01 * torch.randn(256, 9216, generator=g)
    w_star = w.clone()
    w_star[:, :3000] *= -1.7
    want = torch.sqrt((w.double() ** 2).sum()).item()  # the norm summed in float64 by hand
    got = rescale(w_star, frobenius(w))
    assert got.dtype == torch.float32
    assert torch.sqrt((got.double() ** 2).sum()).item() == pytest.approx(want, rel=2e-7)


def test_thresholds_jump_only_where_flipped_set_changes():
    x = np.array([0.0, 0.0005, 0.0031, 0.0031, 0.01])
    mu, ks = thresholds(x, 0.001)
    assert mu == 0.0
    # k=1 covers 0 and 0.0005; 0.0031 needs k=4 (0.004); 0.01 needs k=10
    assert ks.tolist() == [1, 4, 10]
    # the naive walk: every k from 1, kept where the flipped set differs from the previous one
    naive, previous = [], None
    for k in range(1, 20):
        mask = tuple(x <= 0.0 + k * 0.001)
        if mask != previous:
            naive.append(k)
        previous = mask
    assert naive == [1, 4, 10]


@pytest.mark.parametrize("mu, step", [(0.0, 0.001), (0.00037, 0.0001), (0.5, 0.003), (0.123, 0.01)])
def test_thresholds_settle_float_rounding_like_the_plain_walk(mu, step):
    """Scores on the grid mu + k*step (k < 2000) and one float above each, where
    ceil((x - mu)/step) is one off either way (both happen on these grids): each score's first
    k, by the plain walk, is where the set changes, exactly."""
    lattice = mu + np.arange(0, 2000) * step
    x = np.concatenate([lattice, np.nextafter(lattice, np.inf)])
    got_mu, ks = thresholds(x, step)

    def first_k(v: float) -> int:
        k = max(1, int((v - mu) / step) - 2)  # a start below the answer (checked), then walk
        assert k == 1 or mu + (k - 1) * step < v
        while mu + k * step < v:
            k += 1
        return k

    first = {v: first_k(v) for v in np.unique(x)}
    assert got_mu == mu and ks.tolist() == sorted(set(first.values()))
    # each score alone beside mu: in the whole grid a neighbour on the lattice can hide one
    # score's wrong k (the set of ks is the same)
    for v, k in first.items():
        assert thresholds(np.array([mu, v]), step)[1].tolist() == sorted({1, k}), v
    # the smallest case: (mu + step - mu) / step is 1.0000000000000009, yet mu + 1*step takes it
    assert thresholds(np.array([mu, mu + step]), step)[1].tolist() == [1]


def _problem(seed: int, z: int = 40, parts: bool = False):
    """A random head (tau = fc, then ReLU + classifier) with cached tau inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # nn.Linear draws from the global generator: seed it here
        torch.manual_seed(seed)
        head = nn.Sequential(OrderedDict(fc=nn.Linear(z, 16), relu=nn.ReLU(), out=nn.Linear(16, 4)))
    feats = torch.relu(torch.randn(120, z, generator=g) * torch.rand(z, generator=g) * 2)
    labels = head(feats).argmax(1)  # the trained model is right on the aux set
    labels[:10] = torch.randint(0, 4, (10,), generator=g)
    w = head.fc.weight.detach().clone()
    w0 = w + 0.5 * torch.randn(w.shape, generator=g)
    x = feats.mean(0).double().numpy()
    if parts:
        return x, w0, w, head, feats, labels
    return x, w0, w, head_accuracy(head, "fc", feats, labels)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("margin", [1e-4, pytest.param(float("inf"), marks=pytest.mark.slow)])
def test_incremental_flips_give_the_plain_evaluations_result(seed, margin):
    """Rank-1 updates instead of W* per threshold: the same stop, accuracies and weights
    (margin inf: every evaluation falls back to the plain one, the guard's path)."""
    x, w0, w, head, feats, labels = _problem(seed, parts=True)
    with torch.no_grad():  # logits of a trained net's size (argmax, hence labels, unchanged)
        head.out.weight.mul_(20)
        head.out.bias.mul_(20)
    evaluate = head_accuracy(head, "fc", feats, labels)
    for rho in (0.0, 0.02, 0.1):
        fast = IncrementalFlips(feats, labels, w0, w, head.fc.bias, head[1:],
                                lambda mask: evaluate(flip_updates(w0, w, mask)), margin=margin)
        got = flain_search(x, w0, w, 0.003, rho, evaluate, fast)
        ref = flain_search_reference(x, w0, w, 0.003, rho, evaluate)
        assert (got.threshold, got.flipped, got.aux_acc_at_stop) == (ref.threshold, ref.flipped, ref.aux_acc_at_stop)
        assert torch.equal(got.weight, ref.weight)
        if margin == float("inf"):
            assert fast.fallbacks == got.evaluations
        # every mask along the way, not just the stop
        for k in range(1, 30):
            mask = x <= x.min() + k * 0.003
            assert fast(mask) == evaluate(flip_updates(w0, w, mask))
        fast(np.zeros_like(mask))  # a smaller mask starts over
        assert fast(mask) == evaluate(flip_updates(w0, w, mask))
        if margin < 1:  # the rank-1 path did the work; the plain one only at near-ties
            assert fast.fallbacks < 10


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rho", [0.0, 0.02, 0.1, pytest.param(2.0, marks=pytest.mark.slow)])  # 2: flips all
def test_fast_search_equals_plain_loop(seed, rho):
    x, w0, w, evaluate = _problem(seed)
    step = 0.003
    fast = flain_search(x, w0, w, step, rho, evaluate)
    slow = flain_search_reference(x, w0, w, step, rho, evaluate)
    assert fast.threshold == slow.threshold
    assert fast.steps == slow.steps
    assert fast.flipped == slow.flipped
    assert fast.exhausted == slow.exhausted
    assert fast.aux_acc_at_stop == slow.aux_acc_at_stop
    assert torch.equal(fast.weight, slow.weight)
    assert fast.evaluations <= slow.evaluations
    # the stop rule itself: the paper's loop written out column by column (tests/oracles.py)
    naive = oracles.algorithm1(x, w0, w, step, rho, evaluate)
    assert (fast.threshold, fast.flipped, fast.aux_acc_at_stop, fast.exhausted) == (
        pytest.approx(naive.threshold, abs=1e-12), naive.flipped, naive.acc1, naive.exhausted)
    assert torch.allclose(fast.weight, naive.weight, rtol=1e-6, atol=1e-7)
    if rho > 1:  # an accuracy drop can never reach 2: stops with everything flipped
        assert fast.exhausted and fast.flipped == len(x)
    assert torch.linalg.matrix_norm(fast.weight).item() == pytest.approx(torch.linalg.matrix_norm(w).item(), rel=1e-5)


def test_search_returns_first_threshold_reaching_rho():
    # Accuracy falls by 0.1 for each flipped input: with rho=0.25 the stop is at 3 inputs.
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    w0, w = torch.zeros(2, 5), torch.ones(2, 5)

    def evaluate(weight):
        return 1.0 - 0.1 * int((weight < 0).any(0).sum())

    res = flain_search(x, w0, w, 0.01, 0.25, evaluate)
    assert res.flipped == 3 and res.steps == 20 and res.threshold == pytest.approx(0.3)
    assert not res.exhausted
    ref = flain_search_reference(x, w0, w, 0.01, 0.25, evaluate)
    assert ref.evaluations == 20 and res.evaluations == 3


def test_head_evaluation_equals_full_model():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 3, 3), relu=nn.ReLU(), flat=nn.Flatten(),
        fc1=nn.Linear(3 * 6 * 6, 10), relu2=nn.ReLU(), fc2=nn.Linear(10, 3))).eval()
    images = torch.rand(50, 1, 8, 8)
    body, head = split_at(model, "auto")
    feats = tau_inputs(body, images)
    assert torch.allclose(head(feats), model(images))
    labels = model(images).argmax(1)
    assert head_accuracy(head, "fc1", feats, labels)(model.fc1.weight.detach().clone()) == 1.0


def test_flain_apply_changes_only_tau_weight():
    torch.manual_seed(1)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(1, 4, 3), relu=nn.ReLU(), flat=nn.Flatten(),
        fc1=nn.Linear(4 * 6 * 6, 12), relu2=nn.ReLU(), fc2=nn.Linear(12, 3)))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(64, 1, 8, 8)
    labels = model.eval()(images).argmax(1)
    state, info = Flain(step=0.001, rho=0.05).apply(PostTrainingInput(model, initial, images, labels))
    # the oracle: Algorithm 1 on the whole model, fc1's inputs extracted by hand
    with torch.no_grad():
        x = model[:3](images).mean(0).double().numpy()  # conv -> relu -> flatten: fc1's inputs
        probe = copy.deepcopy(model).eval()

        def evaluate(weight):
            probe.load_state_dict({**trained, "fc1.weight": weight})
            return (probe(images).argmax(1) == labels).float().mean().item()
    naive = oracles.algorithm1(x, initial["fc1.weight"], trained["fc1.weight"], 0.001, 0.05, evaluate)
    assert info["layer"] == "fc1" and (info["flipped"], info["aux_acc_at_stop"]) == (naive.flipped, naive.acc1)
    assert info["threshold"] == pytest.approx(naive.threshold, abs=1e-8) and not naive.exhausted
    assert torch.allclose(state["fc1.weight"], naive.weight, rtol=1e-6, atol=1e-7)
    for k in trained:
        same = torch.equal(state[k], trained[k])
        assert same == (k != "fc1.weight"), k
    assert torch.equal(model.state_dict()["fc1.weight"], trained["fc1.weight"])  # input untouched
    norm = torch.linalg.matrix_norm
    assert norm(state["fc1.weight"]).item() == pytest.approx(norm(trained["fc1.weight"]).item(), rel=1e-5)
    assert info["aux_acc_before"] == 1.0


def test_a_given_start_is_the_first_threshold_as_in_the_authors_code():
    """Scores 0.0002 .. 0.003, step 0.0001, start 0.0005 (the authors' grid): lambda_k =
    0.0005 + (k-1) * 0.0001. The hand-counted stops, and the naive loop written out here."""
    x = np.array([0.003, 0.0002, 0.0011, 0.0006])
    accuracy = lambda mask: 1.0 - 0.01 * int(mask.sum())  # noqa: E731 - each flipped input costs 0.01
    # rho 0.005: the first threshold (0.0005) already flips 0.0002: stop at k = 1
    stop = adaptive_threshold(x, 0.0001, 0.005, 1.0, accuracy, start=0.0005)
    assert stop.steps == 1 and stop.threshold == pytest.approx(0.0005, abs=1e-15) and stop.mask.tolist() == [
        False, True, False, False]
    # rho 0.025: three inputs must be in; 0.0011 enters at lambda = 0.0011, the 7th threshold
    naive_k = 1
    while not (x <= 0.0004 + naive_k * 0.0001).sum() >= 3:
        naive_k += 1
    for search in (adaptive_threshold, adaptive_threshold_reference):
        stop = search(x, 0.0001, 0.025, 1.0, accuracy, start=0.0005)
        assert stop.steps == naive_k and naive_k in (7, 8) and stop.mask.sum() == 3, search.__name__
    # the paper's base: min(x) + step = 0.0003 comes first
    stop = adaptive_threshold(x, 0.0001, 0.005, 1.0, accuracy)
    assert stop.steps == 1 and stop.threshold == pytest.approx(0.0003, abs=1e-15)
    # a start below every score: the first thresholds flip nothing and cost nothing
    stop = adaptive_threshold(x, 0.0001, 0.005, 1.0, accuracy, start=0.0)
    assert stop.steps == 3 and stop.mask.sum() == 1


def test_a_search_that_flips_every_input_before_the_drop_reaches_rho_says_so():
    """Scores 0.1, 0.2, 0.3, step 0.1, each flipped input costs 0.001: lambda_1 = 0.2 takes
    two inputs (drop 0.002), lambda_2 = 0.3 all three (drop 0.003). rho 0.5: the search runs out
    (exhausted); rho 0.003: the last threshold reaches it exactly, so it is a stop by rho."""
    x = np.array([0.3, 0.1, 0.2])
    accuracy = lambda mask: 1.0 - 0.001 * int(mask.sum())  # noqa: E731
    for search in (adaptive_threshold, adaptive_threshold_reference):
        stop = search(x, 0.1, 0.5, 1.0, accuracy)
        assert (stop.steps, stop.mask.tolist(), stop.acc, stop.exhausted) == (2, [True] * 3, 0.997, True)
        stop = search(x, 0.1, 0.003, 1.0, accuracy)
        assert (stop.steps, stop.mask.tolist(), stop.acc, stop.exhausted) == (2, [True] * 3, 0.997, False)
        stop = search(x, 0.1, 0.002, 1.0, accuracy)
        assert (stop.steps, stop.mask.tolist(), stop.exhausted) == (1, [False, True, True], False)


def test_incremental_flips_of_a_tau_without_bias_match_the_plain_evaluation():
    x, w0, w, head, feats, labels = _problem(3, parts=True)
    with torch.no_grad():
        head.fc.bias.zero_()  # the same head as one whose tau has no bias
        head.out.weight.mul_(20)
    evaluate = head_accuracy(head, "fc", feats, labels)
    fast = IncrementalFlips(feats, labels, w0, w, None, head[1:], lambda mask: evaluate(flip_updates(w0, w, mask)))
    for k in range(1, 30):
        mask = x <= x.min() + k * 0.003
        assert fast(mask) == evaluate(flip_updates(w0, w, mask))


@pytest.mark.parametrize("search", [flain_search, flain_search_reference])
def test_both_searches_take_a_given_first_threshold(search):
    x, w0, w, evaluate = _problem(4)
    start = float(np.sort(x)[4]) + 0.0001  # past the five quietest inputs
    got = search(x, w0, w, 0.001, 0.02, evaluate, start=start)
    naive = oracles.algorithm1(x, w0, w, 0.001, 0.02, evaluate, start=start)
    assert (got.threshold, got.flipped) == (pytest.approx(naive.threshold, abs=1e-12), naive.flipped) and naive.flipped >= 5
    assert torch.allclose(got.weight, naive.weight, rtol=1e-6, atol=1e-7)
