"""The post-training defenses on models that are not our `nn.Sequential` networks: torchvision's
ResNet-18 (tau = `fc`, split by torch.fx), a custom `forward` (traceable), and a skip connection
around tau (not splittable: every step evaluates the whole model). The oracle is the paper's
Algorithm 1 written out in tests/oracles.py, scoring each candidate with the whole model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from models import resolve_tau
from strategies.post_training import PostTrainingInput
from strategies.post_training.flain import Flain
from strategies.post_training.flain_cv import FlainCV
from strategies.post_training.pruning import Pruning
from strategies.post_training.tau import TauNotUsable, TauView, rest_after
from tests import oracles


class CustomForward(nn.Module):
    """Not Sequential: functional ReLU and a reshape in `forward` (torch.fx traces it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.hidden = nn.Linear(4 * 8 * 8, 24)
        self.out = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.out(F.relu(self.hidden(x.reshape(x.shape[0], -1))))


class SkipAroundTau(CustomForward):
    """The output also depends on tau's input another way: no split at `hidden`."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1)
        return self.out(F.relu(self.hidden(h))) + 0.1 * self.skip(h)


def _setup(model: nn.Module, tau: str, size: int, n: int = 48):
    """(model with tau's weight moved from W0, W0 state, aux images, aux labels = the trained
    model's own predictions: aux accuracy 1 before any flip)."""
    g = torch.Generator().manual_seed(7)
    initial = copy.deepcopy(model.state_dict())
    weight = model.get_submodule(tau).weight
    with torch.no_grad():
        weight.add_(0.5 * weight.abs().mean() * torch.randn(weight.shape, generator=g))
    images = torch.rand(n, 3, size, size, generator=g)
    model.eval()
    with torch.no_grad():
        labels = model(images).argmax(1)
    return model, initial, images, labels


def _whole_model_evaluate(model: nn.Module, tau: str, images: torch.Tensor, labels: torch.Tensor):
    model = copy.deepcopy(model).eval()

    def evaluate(w: torch.Tensor) -> float:
        with torch.no_grad():
            model.get_submodule(tau).weight.copy_(w)
            return (model(images).argmax(1) == labels).float().mean().item()

    return evaluate


def _features(model: nn.Module, tau: str, images: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(tau).register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    with torch.no_grad():
        model.eval()(images)
    handle.remove()
    return seen[0]


def _check_flain_equals_algorithm1(model: nn.Module, tau: str, size: int, split: bool, step_parts: int = 40):
    model, initial, images, labels = _setup(model, tau, size)
    x = _features(model, tau, images).mean(0).double().numpy()
    step = float(x.max() - x.min()) / step_parts
    state, info = Flain(step=step, rho=0.1, layer="auto").apply(PostTrainingInput(model, initial, images, labels))
    w0, w = initial[f"{tau}.weight"], model.get_submodule(tau).weight.detach()
    naive = oracles.algorithm1(x, w0, w, step, 0.1, _whole_model_evaluate(model, tau, images, labels))
    assert info["layer"] == tau and info["split"] is split
    assert (info["flipped"], info["exhausted"]) == (naive.flipped, naive.exhausted)
    assert 0 < naive.flipped < w.shape[1]  # the search stopped inside, not at either end
    assert info["threshold"] == pytest.approx(naive.threshold, abs=1e-9)
    assert torch.allclose(state[f"{tau}.weight"], naive.weight, atol=1e-6)
    for k, v in model.state_dict().items():  # nothing but tau's weight changes
        assert torch.equal(state[k], v) == (k != f"{tau}.weight"), k


@pytest.mark.slow
def test_resnet18_tau_is_fc_and_flain_equals_algorithm1():
    torch.manual_seed(0)
    model = resnet18(num_classes=4)
    assert resolve_tau(model, "auto") == "fc"  # the first Linear after the last convolution
    _check_flain_equals_algorithm1(model, "fc", size=16, split=True)


def test_custom_forward_is_split_by_fx_and_flain_equals_algorithm1():
    torch.manual_seed(1)
    _check_flain_equals_algorithm1(CustomForward(), "hidden", size=16, split=True)


def test_skip_around_tau_evaluates_the_whole_model_and_flain_equals_algorithm1():
    torch.manual_seed(2)
    model = SkipAroundTau()
    assert rest_after(model, "hidden") is None  # `skip(h)` reaches the output around tau
    _check_flain_equals_algorithm1(model, "hidden", size=16, split=False)


class ScaledHead(nn.Module):
    """After tau, a parameter used directly (an fx `get_attr` node), not through a module."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 5), nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor([2.0, -1.0, 0.5]))

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x))) * self.scale


class TauUnused(nn.Module):
    """tau is computed but the output never depends on it."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        self.hidden(x)
        return self.out(x)


def test_rest_after_copies_parameters_used_after_tau_and_refuses_an_unused_tau():
    torch.manual_seed(4)
    model = ScaledHead().eval()
    x = torch.randn(8, 6)
    rest = rest_after(model, "hidden")
    with torch.no_grad():
        want = (model.out(torch.relu(model.hidden(x))) * model.scale)
        assert rest is not None and torch.allclose(rest(model.hidden(x)), want, atol=1e-6)
    assert rest_after(TauUnused(), "hidden") is None


@pytest.mark.slow
def test_pruning_on_a_resnet_equals_the_paper_loop():
    torch.manual_seed(3)
    model, initial, images, labels = _setup(resnet18(num_classes=4), "fc", 16)
    x = _features(model, "fc", images).mean(0).double().numpy()
    step = float(x.max() - x.min()) / 40
    state, info = Pruning(step=step, rho=0.1).apply(PostTrainingInput(model, initial, images, labels))
    want, pruned, lam = oracles.pruning(x, model.fc.weight.detach(), step, 0.1,
                                        _whole_model_evaluate(model, "fc", images, labels))
    assert (info["pruned"], info["threshold"]) == (pruned, pytest.approx(lam, abs=1e-9))
    assert torch.equal(state["fc.weight"], want)


def test_split_head_reproduces_the_model_and_rest_is_only_what_follows_tau():
    torch.manual_seed(4)
    model = CustomForward().eval()
    images = torch.rand(5, 3, 16, 16)
    view = TauView.of(model, "hidden", images, torch.zeros(5, dtype=torch.long))
    with torch.no_grad():
        assert torch.allclose(view.rest(model.hidden(view.features)), model(images), atol=1e-6)
    # `rest` holds `out` and nothing before tau
    assert {name for name, _ in view.rest.named_modules() if name} == {"out"}


def test_flain_cv_refuses_a_model_it_cannot_split_with_a_clear_reason():
    torch.manual_seed(5)
    model, initial, images, labels = _setup(SkipAroundTau(), "hidden", 16)
    with pytest.raises(TauNotUsable, match="flain-cv .*torch.fx-traceable"):
        FlainCV(layer="hidden").apply(PostTrainingInput(model, initial, images, labels))


def test_a_tau_that_gets_more_than_one_vector_per_image_is_refused():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Linear(6, 2))  # Linear over the last axis: N x 2 x 6 x 6
    with pytest.raises(TauNotUsable) as refused:
        TauView.of(model, "auto", torch.rand(3, 3, 8, 8), torch.zeros(3, dtype=torch.long))
    assert str(refused.value) == ("layer '1' gets inputs of shape (3, 2, 6, 6) per batch: "
                                  "tau must be a Linear layer that gets one flat vector per image")


class TauTwice(nn.Module):
    """tau applied twice in one forward pass (a weight-tied block)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.hidden(self.hidden(x)))


def test_a_tau_that_runs_more_than_once_per_input_is_refused_by_name():
    torch.manual_seed(9)
    with pytest.raises(TauNotUsable) as refused:
        TauView.of(TauTwice(), "hidden", torch.rand(5, 4), torch.zeros(5, dtype=torch.long))
    assert str(refused.value) == "layer 'hidden' ran 2 times on 1 batches: tau must run once per input"


def _view_with_a_hidden_change(rows: list[int], scale: float, n: int = 100) -> TauView:
    """TauView.of on a model whose output differs from its fx trace on the aux images `rows`
    by `scale` times allclose's tolerance (atol 1e-4 + rtol 1e-4 x |output|) there: a forward
    hook on the whole model changes its output, and a traced graph does not run the root's hooks."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[2].weight.mul_(20.0)  # outputs of several units: the relative tolerance dominates
    x = torch.randn(n, 5)
    x[:, 4] = 0.0
    x[rows, 4] = 1.0  # marks the rows the hook changes

    def hidden_change(_m, args, y):
        return y + scale * (1e-4 + 1e-4 * y.abs()) * args[0][:, 4:5]

    model.register_forward_hook(hidden_change)
    return TauView.of(model, "2", x, torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("rows, n", [([0], 100), ([63], 100), ([9], 10)])
def test_a_split_that_does_not_reproduce_the_model_on_the_probe_is_not_used(rows, n):
    """The split is checked on the first 64 aux images (all of them when fewer): a difference
    of 1.5x the tolerance on the first, the 64th or the last of 10 falls back to the whole model."""
    assert _view_with_a_hidden_change(rows, 1.5, n).rest is None
    assert _view_with_a_hidden_change(rows, 0.5, n).rest is not None  # within the tolerance: split

