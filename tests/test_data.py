"""Partitions (flwr-datasets), the aux/eval split, and data errors."""

import numpy as np
import pytest

import experiment.data as data
from experiment.data import DataUnavailable, partition_indices, split_test, subsample


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(0).integers(0, 10, size=3000)


def test_iid_partition_sizes_and_cover(labels):
    parts = partition_indices(labels, 7, "iid", 0.5, seed=1)
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(labels) and max(sizes) - min(sizes) <= 1
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(labels)
    # IID: every partition sees every class in roughly global proportions
    for p in parts:
        share = np.bincount(labels[p], minlength=10) / len(p)
        assert np.all(np.abs(share - 0.1) < 0.05)
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_indices(labels, 7, "iid", 0.5, seed=1)))
    assert not np.array_equal(parts[0], partition_indices(labels, 7, "iid", 0.5, seed=2)[0])


def test_dirichlet_partition_is_skewed_disjoint_cover(labels):
    parts = partition_indices(labels, 5, "dirichlet", 0.3, seed=4)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) == len(labels)
    shares = np.stack([np.bincount(labels[p], minlength=10) / len(p) for p in parts])
    assert shares.max() > 0.3  # some client is dominated by a few classes
    again = partition_indices(labels, 5, "dirichlet", 0.3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partitions_are_flwr_datasets_rows(labels, partition, monkeypatch):
    """The partitions read in one batch are exactly the partitioner's rows, read one by one."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    rows = {}
    for cls in (IidPartitioner, DirichletPartitioner):
        original = cls.load_partition

        def spy(self, partition_id, _original=original):
            part = _original(self, partition_id)
            rows[partition_id] = [r["idx"] for r in part]  # the slow, row-by-row reading
            return part

        monkeypatch.setattr(cls, "load_partition", spy)
    parts = partition_indices(labels, 4, partition, 0.5, seed=7)
    assert len(rows) == 4
    assert all(p.tolist() == rows[i] for i, p in enumerate(parts))


def test_split_test_aux_disjoint_from_eval():
    aux, ev = split_test(10000, 200, seed=3)
    assert len(aux) == 200 and len(ev) == 9800
    assert not set(aux) & set(ev)
    assert sorted(np.concatenate([aux, ev])) == list(range(10000))


def test_subsample():
    idx = np.arange(100, 200)
    sub = subsample(idx, 0.25, np.random.default_rng(0))
    assert len(sub) == 25 and set(sub) <= set(idx)
    assert subsample(idx, 1.0, np.random.default_rng(0)) is idx


def test_missing_fmnist_gives_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FMNIST", tmp_path / "no-debian")

    class Offline:
        def __init__(self, *a, **k):
            raise OSError("network unreachable")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataUnavailable) as err:
        data.fetch("fmnist", tmp_path / "data")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte" in msg


def test_corrupt_debian_files_are_refused(tmp_path, monkeypatch):
    import gzip

    deb = tmp_path / "deb"
    deb.mkdir()
    for f in data._FMNIST_FILES:
        with gzip.open(deb / f"{f}.gz", "wb") as out:
            out.write(b"truncated")
    monkeypatch.setattr(data, "DEBIAN_FMNIST", deb)
    with pytest.raises(DataUnavailable, match="corrupt"):
        data.fetch("fmnist", tmp_path / "data")


def test_per_class_aux_is_the_first_images_of_each_class():
    from experiment.config import ExperimentConfig
    from experiment.data import aux_split, per_class_aux

    labels = np.array([2, 0, 1, 0, 2, 1, 0, 2, 1, 1, 0, 2])
    assert per_class_aux(labels, 6, 3).tolist() == [0, 1, 2, 3, 4, 5]  # two of each class, in order
    assert per_class_aux(labels, 3, 3).tolist() == [0, 1, 2]
    full = np.tile(np.arange(10), 1000)  # 10,000 "test labels"
    cfg = ExperimentConfig.defaults(aux_draw="per-class", aux_size=200)
    aux, ev = aux_split(cfg, full)
    assert aux.tolist() == list(range(200)) and len(ev) == 9800 and ev[0] == 200
    assert np.bincount(full[aux]).tolist() == [20] * 10


def test_per_class_aux_needs_a_multiple_of_the_classes():
    from experiment.config import ConfigError, ExperimentConfig
    from server.checks import check_experiment

    with pytest.raises(ConfigError, match="multiple of the 10 classes"):
        check_experiment(ExperimentConfig.defaults(aux_draw="per-class", aux_size=205))


def test_stratified_partitions_hold_equal_shares_of_every_class():
    labels = np.repeat(np.arange(10), 6000)  # Fashion-MNIST's training labels, counted
    parts = partition_indices(labels, 10, "iid-stratified", 0.5, seed=1)
    for part in parts:
        assert np.bincount(labels[part], minlength=10).tolist() == [600] * 10
    assert sorted(np.concatenate(parts).tolist()) == list(range(60000))  # a partition of the whole set
    uneven = partition_indices(np.array([0] * 7 + [1] * 3), 3, "iid-stratified", 0.5, seed=1)
    assert sorted(len(p) for p in uneven) == [3, 3, 4]
    again = partition_indices(labels, 10, "iid-stratified", 0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))  # seeded
