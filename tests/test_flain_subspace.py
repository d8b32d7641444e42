"""flain-subspace: FLAIN's flip in the eigenbasis of the clean features, checked against
independent oracles (FLAIN's own column flip, numpy's SVD, hand-computed values) and on a
planted backdoor that rides on inputs every clean example lights."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from strategies.post_training import PostTrainingInput
from strategies.post_training.flain import Flain, flip_updates
from strategies.post_training.flain_subspace import (EPSILONS, FlainSubspace, augment, clean_basis, spectrum,
                                                     flipped_weight, kept_directions, select_eps, subspace_flip)


def test_in_the_coordinate_basis_it_is_flains_column_flip():
    g = torch.Generator().manual_seed(1)
    w0, w = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    order = torch.randperm(9, generator=g)
    basis = torch.eye(9, dtype=torch.float64)[order]  # directions = input coordinates in this order
    for k in (0, 1, 4, 9):
        mask = np.ones(9, dtype=bool)
        mask[order[:k].numpy()] = False  # the k kept coordinates are not flipped, all others are
        assert torch.allclose(subspace_flip(w0, w, basis, k), flip_updates(w0, w, mask), atol=1e-6), k


def test_clean_basis_is_the_svd_of_the_features():
    g = np.random.default_rng(2)
    feats = g.normal(size=(12, 40)) @ np.diag(np.linspace(3, 0.1, 40))
    v, energy = clean_basis(torch.as_tensor(feats))
    _, s, vt = np.linalg.svd(feats, full_matrices=False)
    np.testing.assert_allclose(energy.numpy(), s**2, rtol=1e-8)
    for k in (1, 5, 12):  # the same subspaces (vectors may differ in sign)
        np.testing.assert_allclose(v[:k].numpy().T @ v[:k].numpy(), vt[:k].T @ vt[:k], atol=1e-8)
    low_rank = feats[:3].copy()
    low_rank = np.concatenate([low_rank, low_rank[:1] * 2 + low_rank[1:2]])  # 4 rows, rank 3
    assert len(clean_basis(torch.as_tensor(low_rank))[1]) == 3


def test_kept_directions_by_hand():
    energy = torch.tensor([6.0, 3.0, 1.0], dtype=torch.float64)  # left out after 1, 2, 3: 0.4, 0.1, 0
    assert [kept_directions(energy, e) for e in (0.0, 0.05, 0.1, 0.2, 0.4, 0.5)] == [3, 3, 2, 2, 1, 1]


def test_select_eps_returns_the_last_candidate_within_tolerance():
    assert select_eps(np.array([0.0, 0.001, 0.01, 0.03, 0.005]), 0.02) == 2  # never past the first beyond
    assert select_eps(np.array([0.0, 0.001, 0.01]), 0.02) == 2
    assert select_eps(np.array([0.0, 0.05, 0.0]), 0.02) == 0  # nothing is flipped


def test_augment_rolls_and_mirrors():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = augment(img, 1)
    assert out.shape == (8, 1, 4, 4)
    assert torch.equal(out[0], img[0])
    assert torch.equal(out[1, 0, 0], torch.tensor([5.0, 6.0, 7.0, 4.0]))  # dx=-1, dy=-1: row 1, rotated left
    assert torch.equal(out[-1, 0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0]))
    assert augment(img, 0) is img
    flat = torch.rand(5, 7)
    assert augment(flat, 2) is flat  # not images


def test_augment_by_hand_on_images_without_a_channel():
    """shift 1 on N x H x W: the image, rolled by (dy, dx) for dx in (-1, 1), dy in (-1, 0, 1)
    in that order, then mirrored; out[r, c] = in[(r - dy) % H, (c - dx) % W]."""
    img = np.arange(12.0).reshape(1, 3, 4)
    want = [img[0]]
    for dx in (-1, 1):
        for dy in (-1, 0, 1):
            want.append(np.array([[img[0, (r - dy) % 3, (c - dx) % 4] for c in range(4)] for r in range(3)]))
    want.append(img[0, :, ::-1])
    out = augment(torch.from_numpy(img), 1)
    assert out.shape == (8, 3, 4) and np.array_equal(out.numpy(), np.stack(want))


def test_flipped_weight_keeps_the_directions_the_chosen_eps_allows():
    """Basis = the coordinates, energy 6, 3, 1 (left out after 1, 2, 3 directions: 0.4, 0.1, 0):
    eps in [0.1, 0.4) keeps 2 directions, so only column 2's update is flipped."""
    w0 = torch.tensor([[1.0, 2.0, 3.0]])
    w = torch.tensor([[2.0, 4.0, 7.0]])  # dW = 1, 2, 4
    basis, energy = torch.eye(3, dtype=torch.float64), torch.tensor([6.0, 3.0, 1.0], dtype=torch.float64)
    i = int(np.flatnonzero(EPSILONS >= 0.1)[0]) + 1  # index into [no flip, *EPSILONS] of the first eps >= 0.1
    assert EPSILONS[i - 2] < 0.1 <= EPSILONS[i - 1] < 0.4
    drops = np.zeros(len(EPSILONS) + 1)
    drops[i + 1:] = 0.5  # beyond the tolerance from the next eps on
    weight, k, index = flipped_weight(w0, w, drops, 0.02, basis, energy)
    assert (k, index) == (2, i) and torch.equal(weight, torch.tensor([[2.0, 4.0, -1.0]]))  # 3 - 4
    drops[1:] = 0.5  # every flip beyond it: nothing flipped, index 0
    weight, k, index = flipped_weight(w0, w, drops, 0.02, basis, energy)
    assert (k, index) == (None, 0) and torch.equal(weight, w) and weight is not w


def _planted(g: torch.Generator):
    """Clean class c = a * p_c (+ small noise) with every input lit; the trigger adds a
    direction d orthogonal to p_0 and p_1 on the same inputs: nothing quiet to flip."""
    z = 20
    p = 0.5 + torch.rand(2, z, generator=g)
    d = torch.randn(z, generator=g)
    d -= torch.linalg.lstsq(p.T, d.unsqueeze(1)).solution.squeeze(1) @ p  # orthogonal to p_0 and p_1
    d /= d.norm()

    def sample(n: int, triggered: bool) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.zeros(n, dtype=torch.long) if triggered else torch.arange(n) % 2
        a = 0.5 + torch.rand(n, 1, generator=g)
        x = a * p[labels] + 0.02 * torch.randn(n, z, generator=g)
        if triggered:
            x += 1.5 * d
            labels = torch.ones(n, dtype=torch.long)
        return x, labels

    return sample


def _rates(model: nn.Module, sample) -> tuple[float, float]:
    clean_x, clean_y = sample(400, False)
    bad_x, _ = sample(200, True)
    with torch.no_grad():
        return ((model(clean_x).argmax(1) == clean_y).float().mean().item(),
                (model(bad_x).argmax(1) == 1).float().mean().item())


def test_a_backdoor_on_active_inputs_is_removed_where_flain_leaves_it():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sample = _planted(g)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(20, 8), relu=nn.ReLU(), fc2=nn.Linear(8, 2)))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = (torch.cat(t) for t in zip(sample(400, False), sample(120, True)))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    acc0, asr0 = _rates(model, sample)
    assert acc0 > 0.95 and asr0 > 0.95  # the backdoor is in
    aux_x, aux_y = sample(200, False)
    inp = PostTrainingInput(model=model, initial_state=initial, aux_images=aux_x, aux_labels=aux_y)

    state, info = FlainSubspace(augment="none", seed=0).apply(inp)
    defended = nn.Sequential(OrderedDict(fc1=nn.Linear(20, 8), relu=nn.ReLU(), fc2=nn.Linear(8, 2)))
    defended.load_state_dict(state)
    acc, asr = _rates(defended.eval(), sample)
    assert asr < 0.05 and acc > acc0 - 0.02, (acc, asr, info["kept_directions"])
    assert info["kept_directions"] is not None and info["kept_directions"] < info["directions"]
    # what the result says, against what it must be: fc1 is the first layer, so its inputs are the aux images
    energy = torch.linalg.svdvals(aux_x.double()) ** 2
    curve = info["drop_curve"]
    assert set(info) == {"layer", "kept_directions", "directions", "inputs", "eps", "estimated_drop", "drop_curve",
                         "aux_acc_before", "aux_acc_after", "rule", "search_seconds"}
    assert (info["layer"], info["inputs"], info["directions"]) == ("fc1", 20, 20)
    assert info["rule"] == {"tol": 0.02, "folds": 5, "augment": "none"}
    assert curve["eps"] == [None, *EPSILONS.tolist()] and len(curve["drop"]) == len(EPSILONS) + 1
    assert curve["drop"][0] == 0.0 and info["estimated_drop"] == curve["drop"][curve["eps"].index(info["eps"])] <= 0.02
    assert info["kept_directions"] == kept_directions(energy, info["eps"])
    beyond = [j for j, d in enumerate(curve["drop"]) if j > 0 and d > 0.02]  # last-within, written out
    assert info["eps"] == curve["eps"][beyond[0] - 1 if beyond else -1]
    with torch.no_grad():
        assert info["aux_acc_before"] == (model(aux_x).argmax(1) == aux_y).float().mean().item()
        assert info["aux_acc_after"] == (defended(aux_x).argmax(1) == aux_y).float().mean().item()
    assert isinstance(info["search_seconds"], float)  # its value is timing: benchmarks/, not here

    flain_state, _ = Flain().apply(inp)  # the coordinate version finds no quiet input to flip
    defended.load_state_dict(flain_state)
    assert _rates(defended.eval(), sample)[1] > 0.5


def test_spectrum_drops_directions_under_a_millionth_of_the_largest():
    """Eigenvalues 1e4, 1e-2, 1e-9 and 0 of a diagonal Gram matrix, shuffled: square roots 100,
    0.1, 3.2e-5, 0; the cut is 1e-6 x 100 = 1e-4, so two directions stay, largest first."""
    gram = torch.diag(torch.tensor([1e-9, 1e4, 0.0, 1e-2], dtype=torch.float64))
    u, energy = spectrum(gram)
    assert energy.tolist() == [1e4, 1e-2]
    assert torch.equal(u.abs(), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("bias", [True, False])
def test_drop_curve_is_the_naive_cross_fitting(bias):
    """Every fold, every eps: the directions from the other folds' copies, the flipped weight
    put into the whole model, the held-out images' mean true-class probability; restated
    with numpy's SVD and full forward passes. Also for a tau without bias."""
    from experiment import seeds
    from strategies.post_training.flain_cv import stratified_folds
    from strategies.post_training.flain_subspace import EPSILONS
    from strategies.post_training.tau import TauView

    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(30, 6, bias=bias), relu=nn.ReLU(), fc2=nn.Linear(6, 3)))
    w0 = model.fc1.weight.detach().clone() + 0.3 * torch.randn(6, 30, generator=g)
    x = torch.randn(24, 30, generator=g) @ torch.diag(torch.linspace(2, 0.05, 30))
    y = torch.arange(24) % 3
    copies = torch.cat([x, x + 0.1 * torch.randn(24, 30, generator=g)])  # row j: a copy of image j % 24
    tau = TauView.of(model, "fc1", x, y)
    acc0, drops = FlainSubspace(folds=3, seed=7).drop_curve(tau, w0, copies)

    fold = stratified_folds(y.numpy(), 3, seeds.rng(7, "aux-folds"))
    w = model.fc1.weight.detach().double().numpy()
    x, copies, w0 = x.double(), copies.double(), w0.double()
    totals = np.zeros(len(EPSILONS) + 1)
    for f in range(3):
        train = copies.numpy()[np.tile(fold, 2) != f]
        _, s, vt = np.linalg.svd(train, full_matrices=False)
        energy = s**2
        held = np.flatnonzero(fold == f)
        for i, eps in enumerate([None, *EPSILONS]):
            if eps is None:
                weight = w
            else:
                left = 1 - np.cumsum(energy) / energy.sum()
                k = len(energy) if eps == 0 else min(int((left > eps).sum()) + 1, len(energy))
                dw = w - w0.numpy()
                p = vt[:k].T @ vt[:k]
                weight = w0.numpy() + dw @ p - dw @ (np.eye(30) - p)
            probe = nn.Sequential(OrderedDict(fc1=nn.Linear(30, 6, bias=bias), relu=nn.ReLU(), fc2=nn.Linear(6, 3)))
            probe.load_state_dict(model.state_dict())
            probe.double()
            with torch.no_grad():
                probe.fc1.weight.copy_(torch.as_tensor(weight))
                prob = torch.softmax(probe(x[held]), 1)[torch.arange(len(held)), y[held]]
            totals[i] += prob.sum().item()
    expected = totals / 24
    assert abs(acc0 - expected[0]) < 1e-5
    assert np.ptp(expected) > 0.01  # the flips change the held-out accuracy: the comparison means something
    np.testing.assert_allclose(drops, expected[0] - expected, atol=1e-5)
