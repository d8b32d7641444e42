"""Trigger stamping, poisoning rate, choice of malicious clients."""

import numpy as np
import pytest
import torch

from attacks import TRIGGERS, malicious_clients, poison
from attacks.triggers import square


def test_cba_is_5x5_white_square_bottom_right():
    trig = TRIGGERS["cba"](28, 28)
    rows, cols = np.nonzero(trig.mask)
    assert trig.num_pixels == 25
    assert set(rows) == set(cols) == set(range(23, 28))


@pytest.mark.parametrize("dtype,white", [(torch.uint8, 255), (torch.float32, 1.0)])
@pytest.mark.parametrize("shape", [(4, 28, 28), (4, 1, 28, 28), (4, 3, 28, 28)])
def test_stamp_sets_only_the_pattern(dtype, white, shape):
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(shape, generator=g) * 0.5 * (255 if dtype == torch.uint8 else 1)).to(dtype)
    before = images.clone()
    out = TRIGGERS["cba"](28, 28).stamp(images)
    assert torch.equal(images, before)  # input untouched
    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[23:28, 23:28] = True
    assert torch.all(out[..., mask] == white)
    assert torch.equal(out[..., ~mask], images[..., ~mask])


def test_stamp_rejects_wrong_image_size():
    with pytest.raises(ValueError, match="32x32"):
        square(5, 32, 32).stamp(torch.zeros(2, 1, 28, 28))


@pytest.mark.parametrize("pdr", [0.0, 0.3, 0.5, 1.0])
def test_poisoning_rate_and_relabel(pdr):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (1000,), generator=g)
    images = torch.zeros(1000, 1, 28, 28, dtype=torch.uint8)
    trig = TRIGGERS["cba"](28, 28)
    px, py, count = poison(images, labels, trig, source=0, target=5, pdr=pdr, seed=3)
    n_source = int((labels == 0).sum())
    assert count == round(pdr * n_source)
    changed = (py != labels).nonzero().flatten()
    assert len(changed) == count
    assert torch.all(labels[changed] == 0) and torch.all(py[changed] == 5)
    stamped = px.flatten(1).any(1)
    assert torch.equal(stamped.nonzero().flatten(), changed)  # exactly the relabelled ones
    assert torch.equal(px[changed], trig.stamp(images[changed]))
    assert labels.sum() == torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(1)).sum()


def test_malicious_clients_deterministic_and_sized():
    a = malicious_clients(10, 4, seed=42)
    assert a == malicious_clients(10, 4, seed=42)
    assert len(a) == 4 and all(0 <= i < 10 for i in a)
    assert malicious_clients(10, 0, seed=1) == frozenset()
    assert malicious_clients(10, 10, seed=1) == frozenset(range(10))
    assert len({malicious_clients(10, 4, seed=s) for s in range(20)}) > 1
