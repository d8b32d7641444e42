"""EMNIST (62 classes) and CIFAR-10 (3x32x32, BatchNorm) end to end in a real Flower
simulation, on small generated data written in the real on-disk formats (neither data
set can be had offline here)."""

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


# Each run also drives another aggregation rule through a real simulation: the update-based
# ones, RLR with BatchNorm buffers (CIFAR-10) and the invariant aggregator.
@pytest.mark.parametrize("dataset,make,trigger,rule", [
    ("emnist", _fake_emnist, "cba", "invariant"),
    ("cifar10", _fake_cifar, "dba", "rlr"),
])
def test_dataset_runs_end_to_end(tmp_path, flain_cli, dataset, make, trigger, rule):
    make(tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = flain_cli(
        "run", "--set", f"dataset='{dataset}'", "--set", "num-clients=3", "--set", "num-rounds=2",
        "--set", f"aggregation='{rule}'", "--set", "invariant-beta=0.0",
        "--set", "mcr=0.34", "--set", "pdr=1.0", "--set", f"trigger='{trigger}'", "--set", "aux-size=40",
        "--set", "post-defenses='flain,pruning'",
        "--set", f"data-dir='{tmp_path / 'data'}'", "--set", f"run-dir='{run_dir}'",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["client_failures"] == []
    assert json.loads((run_dir / "config.json").read_text())["aggregation"] == rule
    assert 0 <= summary["final"]["acc"] <= 1 and 0 <= summary["final"]["asr"] <= 1
    assert set(summary["post_defenses"]) == {"flain", "pruning"}
    final = torch.load(run_dir / "final.pt")
    initial = torch.load(run_dir / "initial.pt")
    if dataset == "cifar10":  # BatchNorm statistics were trained and averaged, never sign-flipped
        assert final["fc1.weight"].shape == (1024, 4096)
        assert not torch.allclose(final["bn1.running_var"], torch.ones(64))
        assert (final["bn1.running_var"] > 0).all()  # a flipped variance update could go negative
        assert int(final["bn1.num_batches_tracked"]) > 0
    else:
        assert final["fc2.weight"].shape == (62, 128)
    assert not torch.equal(initial["fc1.weight"], final["fc1.weight"])
