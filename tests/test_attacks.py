"""Triggers (CBA, DBA parts, pixel-count patterns, positions), poisoning, attackers."""

import numpy as np
import pytest
import torch

from attacks import TRIGGERS, malicious_clients, poison
from attacks.triggers import PixelTrigger, _place, cba, dba


def _cells(mask):
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(mask))}


def test_cba_is_5x5_white_square_bottom_right():
    trig = TRIGGERS["cba"](28, 28).full
    assert trig.num_pixels == 25
    assert _cells(trig.mask) == {(r, c) for r in range(23, 28) for c in range(23, 28)}
    assert cba(32, 32).full.num_pixels == 16  # CIFAR-10: a 4x4 patch
    assert _cells(cba(32, 32).full.mask) == {(r, c) for r in range(28, 32) for c in range(28, 32)}


@pytest.mark.parametrize("count", [3, 5, 7, 9])
def test_pixel_count_patterns(count):
    trig = cba(28, 28, pixels=count).full
    assert trig.num_pixels == count
    assert all(25 <= r <= 27 and 25 <= c <= 27 for r, c in _cells(trig.mask))  # a 3x3 box in the corner
    assert (26, 26) in _cells(trig.mask)  # always the centre
    if count == 5:
        assert _cells(trig.mask) == {(26, 26), (25, 26), (27, 26), (26, 25), (26, 27)}  # a plus


@pytest.mark.parametrize("corner,margin,expected", [
    ("top-left", 0, (0, 0)), ("top-right", 1, (1, 22)), ("bottom-left", 2, (21, 2)), ("bottom-right", 0, (23, 23)),
])
def test_positions(corner, margin, expected):
    cells = _cells(cba(28, 28, corner=corner, margin=margin).full.mask)
    assert min(cells) == expected and len(cells) == 25


@pytest.mark.parametrize("size,parts", [(28, 2), (32, 4)])
def test_dba_parts_disjoint_and_cover_the_plus(size, parts):
    scheme = dba(size, size)
    assert len(scheme.parts) == parts
    cells = [_cells(p.mask) for p in scheme.parts]
    for i in range(parts):
        for j in range(i + 1, parts):
            assert not cells[i] & cells[j]
    assert set().union(*cells) == _cells(scheme.full.mask)
    assert scheme.full.num_pixels == 9  # plus sign, arms of 2
    assert [scheme.for_client(k) for k in range(2 * parts)] == list(scheme.parts) * 2
    if parts == 2:  # vertical bar and horizontal arms
        assert _cells(scheme.parts[0].mask) == {(r, 25) for r in range(23, 28)}
        assert _cells(scheme.parts[1].mask) == {(25, c) for c in (23, 24, 26, 27)}


def test_bad_trigger_settings_raise():
    with pytest.raises(ValueError, match="trigger-pixels=4"):
        cba(28, 28, pixels=4)
    with pytest.raises(ValueError, match=r"^trigger-pixels applies to trigger=cba only \(dba uses its plus-sign parts\)$"):
        dba(28, 28, pixels=5)
    with pytest.raises(ValueError, match="does not fit"):
        cba(28, 28, margin=25)
    with pytest.raises(ValueError, match="trigger-corner"):
        cba(28, 28, corner="middle")


def test_a_trigger_fits_up_to_the_images_edge_in_each_dimension():
    """A 3x2 box with margin 1 needs 4 rows and 3 columns: it fits 4x3 images exactly (in every
    corner) and neither 3x3 nor 4x2 ones."""
    box = np.ones((3, 2), dtype=bool)
    want = {"top-left": (1, 1), "top-right": (1, 0), "bottom-left": (0, 1), "bottom-right": (0, 0)}
    for corner, (top, left) in want.items():
        mask = _place(box, 4, 3, corner, 1)
        expected = np.zeros((4, 3), dtype=bool)
        expected[top:top + 3, left:left + 2] = True
        assert np.array_equal(mask, expected), corner
    for height, width in [(3, 3), (4, 2)]:
        with pytest.raises(ValueError, match=rf"^a 3x2 trigger with trigger-margin=1 does not fit {height}x{width} images$"):
            _place(box, height, width, "top-left", 1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("shape", [(4, 28, 28), (4, 1, 28, 28), (4, 3, 28, 28)])
@pytest.mark.parametrize("value", [1.0, 0.5])
def test_stamp_sets_only_the_pattern(dtype, shape, value):
    g = torch.Generator().manual_seed(0)
    scale = 255 if dtype == torch.uint8 else 1
    images = (torch.rand(shape, generator=g) * 0.4 * scale).to(dtype)
    before = images.clone()
    trig = PixelTrigger(cba(28, 28).full.mask, value)
    out = trig.stamp(images)
    assert torch.equal(images, before)  # input untouched
    mask = torch.from_numpy(trig.mask)
    want = round(value * 255) if dtype == torch.uint8 else value
    assert torch.all(out[..., mask] == want)
    assert torch.equal(out[..., ~mask], images[..., ~mask])


def test_stamp_rejects_wrong_image_size():
    with pytest.raises(ValueError, match=r"^trigger is 32x32, images are \(28, 28\)$"):
        cba(32, 32).full.stamp(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"^trigger is 3x5, images are \(5, 3\)$"):  # rows x columns, in order
        PixelTrigger(np.ones((3, 5), dtype=bool)).stamp(torch.zeros(2, 1, 5, 3))


@pytest.mark.parametrize("scheme", [cba, dba])
def test_the_trigger_value_reaches_every_part(scheme):
    """The default is the brightest value; a set value is what every part and the full pattern stamp."""
    for value, want in ((None, 1.0), (0.25, 0.25)):
        trig = scheme(28, 28) if value is None else scheme(28, 28, value=value)
        for t in (trig.full, *trig.parts):
            out = t.stamp(torch.zeros(1, 1, 28, 28))
            assert torch.all(out[0, 0][torch.from_numpy(t.mask)] == want) and out.sum() == want * t.num_pixels


def test_dba_splits_in_two_up_to_28_pixels_and_in_four_above():
    assert [len(dba(n, n).parts) for n in (27, 28, 29, 32)] == [2, 2, 4, 4]


def test_plus_parts_refuses_other_counts():
    from attacks.triggers import plus_parts

    with pytest.raises(ValueError, match="^a plus sign splits into 2 or 4 parts, not 3$"):
        plus_parts(arm=2, parts=3)


@pytest.mark.parametrize("pdr", [0.0, 0.3, 0.5, 1.0])
def test_poisoning_rate_and_relabel(pdr):
    labels = torch.randint(0, 10, (1000,), generator=torch.Generator().manual_seed(1))
    original = labels.clone()
    images = torch.zeros(1000, 1, 28, 28, dtype=torch.uint8)
    trig = cba(28, 28).full
    px, py, idx = poison(images, labels, trig, source=0, target=5, pdr=pdr, rng=np.random.default_rng(3))
    count = len(idx)
    n_source = int((labels == 0).sum())
    assert count == round(pdr * n_source)
    changed = (py != labels).nonzero().flatten()
    assert len(changed) == count
    assert torch.all(labels[changed] == 0) and torch.all(py[changed] == 5)
    stamped = px.flatten(1).any(1)
    assert torch.equal(stamped.nonzero().flatten(), changed)  # exactly the relabelled ones
    assert torch.equal(idx, changed)  # and the indices say which
    assert torch.equal(px[changed], trig.stamp(images[changed]))
    assert torch.equal(labels, original)  # inputs untouched


def test_malicious_clients_deterministic_and_sized():
    a = malicious_clients(10, 4, seed=42)
    # pinned: the paper setting's attackers of seed 42 (a change here changes every run's attackers)
    assert a == frozenset({0, 4, 6, 7})
    assert len(a) == 4 and all(0 <= i < 10 for i in a)
    assert malicious_clients(10, 0, seed=1) == frozenset()
    assert malicious_clients(10, 10, seed=1) == frozenset(range(10))
    with pytest.raises(ValueError, match=r"num_malicious=11 not in 0\.\.10"):
        malicious_clients(10, 11, seed=1)
    assert len({malicious_clients(10, 4, seed=s) for s in range(20)}) > 1
