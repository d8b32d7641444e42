"""CIFAR-10 (3x32x32, BatchNorm, DBA in 4 parts, RLR) end to end in a real Flower simulation,
on small generated data written in the real on-disk format (it cannot be had offline here);
EMNIST's reader on generated IDX files (its model and the invariant rule are unit-tested)."""

import json
import pickle
import struct

import numpy as np
import pytest
import torch


def _idx(path, array: np.ndarray) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801
    with path.open("wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def _fake_emnist(root, n_train=240, n_test=120):
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 62
        _idx(raw / f"emnist-byclass-{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"emnist-byclass-{split}-labels-idx1-ubyte", labels)


def _fake_cifar(root, per_batch=48, n_test=120):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(np.arange(n) % 10)}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)


def test_emnist_reader_on_generated_files(tmp_path):
    from experiment.data import load

    _fake_emnist(tmp_path)
    images, labels = load("emnist", str(tmp_path), True)
    assert images.shape == (240, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 62 for i in range(240)]


def test_idx_reader_matches_torchvision(tmp_path):
    """Our IDX reader (no torchvision import at start-up) gives torchvision's arrays:
    on generated EMNIST files and on the real Fashion-MNIST files where they are present."""
    from torchvision.datasets import EMNIST, FashionMNIST

    from experiment.data import DataUnavailable, load_emnist, load_fmnist, read_idx
    from launch.superlink import SOURCE_ROOT

    _fake_emnist(tmp_path)
    pairs = [(load_emnist, EMNIST, tmp_path, {"split": "byclass"})]
    if (SOURCE_ROOT / "data" / "FashionMNIST" / "raw").is_dir():  # `make test` fetches it
        pairs.append((load_fmnist, FashionMNIST, SOURCE_ROOT / "data", {}))
    for ours, theirs, root, kwargs in pairs:
        for train in (True, False):
            images, labels = ours(root, train)
            ref = theirs(str(root), train=train, download=False, **kwargs)
            assert torch.equal(images, ref.data.unsqueeze(1)) and torch.equal(labels, ref.targets.long())
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x03" + bytes(12))  # float IDX
    with pytest.raises(DataUnavailable, match="not an uint8 IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + bytes(3))
    with pytest.raises(DataUnavailable, match="holds 3 bytes"):
        read_idx(tmp_path / "short")


# The run also drives an update-based rule through a real simulation: RLR with BatchNorm buffers.
@pytest.mark.parametrize("dataset,make,trigger,rule", [("cifar10", _fake_cifar, "dba", "rlr")])
def test_dataset_runs_end_to_end(tmp_path, flain_cli, dataset, make, trigger, rule):
    make(tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = flain_cli(
        "run", "--set", f"dataset='{dataset}'", "--set", "num-clients=3", "--set", "num-rounds=2",
        "--set", f"aggregation='{rule}'", "--set", "invariant-beta=0.0",
        "--set", "mcr=0.34", "--set", "pdr=1.0", "--set", f"trigger='{trigger}'", "--set", "aux-size=40",
        "--set", "post-defenses='flain,pruning'", "--set", "attack='pgd'", "--set", "pgd-eps=0.5",
        "--set", f"data-dir='{tmp_path / 'data'}'", "--set", f"run-dir='{run_dir}'",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["client_failures"] == []
    assert json.loads((run_dir / "config.json").read_text())["aggregation"] == rule
    assert set(summary["post_defenses"]) == {"flain", "pruning"}
    # the PGD attacker stayed within eps of each round's global model, BatchNorm stats aside
    assert [e["round"] for e in summary["attack_log"]] == [1, 2]
    assert all(e["update-norm"] <= 0.5 * (1 + 1e-5) < e["update-norm-unconstrained"] for e in summary["attack_log"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["resolved"]["aux-size"] == 40 and len(config["malicious_clients"]) == 1

    final = torch.load(run_dir / "final.pt", weights_only=True)
    initial = torch.load(run_dir / "initial.pt", weights_only=True)
    if dataset == "cifar10":  # BatchNorm statistics were trained and averaged, never sign-flipped
        assert final["fc1.weight"].shape == (1024, 4096)
        assert not torch.allclose(final["bn1.running_var"], torch.ones(64))
        assert (final["bn1.running_var"] > 0).all()  # a flipped variance update could go negative
        assert int(final["bn1.num_batches_tracked"]) > 0
    else:
        assert final["fc2.weight"].shape == (62, 128)
    assert not torch.equal(initial["fc1.weight"], final["fc1.weight"])
