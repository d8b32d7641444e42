"""Data sets: fetch into the data directory, load as uint8 tensors, partition, split.

Images stay uint8 in memory (N, C, H, W) until a batch is used: that is what a trigger
stamps (a white pixel is 255) and it is four times smaller than float32. Partitions
come from flwr-datasets partitioners run on an in-memory label table, so they work
offline and are the same in every process that asks (same seed, same indices).
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

# Offline source: Debian's `dataset-fashion-mnist` package.
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


class DataUnavailable(RuntimeError):
    """A data set is not in the data directory and could not be fetched."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the code needs to know about a data set."""

    name: str
    num_classes: int
    shape: tuple[int, int, int]  # C, H, W
    train_size: int
    test_size: int
    fetch: Callable[[Path], None]
    load: Callable[[Path, bool], tuple[torch.Tensor, torch.Tensor]]


# ---- Fashion-MNIST ------------------------------------------------------------------
_FMNIST_FILES = {  # extracted IDX file -> exact size in bytes (header + payload)
    "train-images-idx3-ubyte": 16 + 60000 * 784,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}


def _fmnist_raw(data_dir: Path) -> Path:
    return data_dir / "FashionMNIST" / "raw"  # torchvision's layout


def _fmnist_ok(raw: Path) -> bool:
    return all(
        (raw / f).is_file() and (raw / f).stat().st_size == size
        for f, size in _FMNIST_FILES.items()
    )


def fetch_fmnist(data_dir: Path) -> None:
    """Put Fashion-MNIST into `data_dir` in torchvision's layout.

    Order: already there -> Debian package files -> torchvision download.
    """
    raw = _fmnist_raw(data_dir)
    if _fmnist_ok(raw):
        return
    if all((DEBIAN_FMNIST / f"{f}.gz").is_file() for f in _FMNIST_FILES):
        raw.mkdir(parents=True, exist_ok=True)
        for f in _FMNIST_FILES:
            with gzip.open(DEBIAN_FMNIST / f"{f}.gz") as src, (raw / f).open("wb") as dst:
                shutil.copyfileobj(src, dst)
        if _fmnist_ok(raw):
            return
        raise DataUnavailable(f"Fashion-MNIST files from {DEBIAN_FMNIST} are corrupt (wrong sizes)")
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(data_dir), train=True, download=True)
        FashionMNIST(str(data_dir), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataUnavailable(
            f"Fashion-MNIST is not in {raw} and could not be fetched ({exc}).\n"
            "Get it one of these ways:\n"
            "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist, then run again;\n"
            "  - with internet: run again (torchvision downloads it);\n"
            "  - by hand: put the four extracted IDX files "
            f"({', '.join(_FMNIST_FILES)}) into {raw}."
        ) from None
    if not _fmnist_ok(raw):
        raise DataUnavailable(f"Fashion-MNIST in {raw} is incomplete after download")


def load_fmnist(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import FashionMNIST

    ds = FashionMNIST(str(data_dir), train=train, download=False)
    return ds.data.unsqueeze(1).contiguous(), ds.targets.long()


DATASETS: dict[str, DatasetSpec] = {
    "fmnist": DatasetSpec(
        name="fmnist",
        num_classes=10,
        shape=(1, 28, 28),
        train_size=60000,
        test_size=10000,
        fetch=fetch_fmnist,
        load=load_fmnist,
    ),
}


# ---- loading --------------------------------------------------------------------------
def fetch(name: str, data_dir: str | Path) -> None:
    """Make sure data set `name` is in `data_dir` (fetching it if it can)."""
    DATASETS[name].fetch(Path(data_dir))


@lru_cache(maxsize=4)
def load(name: str, data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8, N x C x H x W) and labels (int64) of one split.

    Cached per process: a Ray actor serves many rounds and loads the split once.
    """
    spec = DATASETS[name]
    path = Path(data_dir)
    spec.fetch(path)
    return spec.load(path, train)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (models take this)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


# ---- partitions and splits ----------------------------------------------------------
def partition_indices(
    labels: np.ndarray, num_partitions: int, partition: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Indices of every partition, from flwr-datasets' IID or Dirichlet partitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    labels = np.asarray(labels)
    order = np.arange(len(labels))
    if partition == "iid":
        # IidPartitioner takes contiguous shards; shuffle first as FederatedDataset does.
        order = np.random.default_rng(seed).permutation(len(labels))
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif partition == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed
        )
    else:
        raise ValueError(f"partition={partition!r}: choose 'iid' or 'dirichlet'")
    partitioner.dataset = Dataset.from_dict({"label": labels[order], "idx": order})
    try:
        return [
            np.asarray(partitioner.load_partition(i).with_format("numpy")["idx"])
            for i in range(num_partitions)
        ]
    except ValueError as exc:  # Dirichlet gives up when partitions stay too small
        raise ValueError(
            f"could not split {len(labels)} samples into {num_partitions} "
            f"{partition} partitions (dirichlet-alpha={alpha}): {exc}"
        ) from exc


def subsample(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A fixed random share of `indices` (train-fraction, for quick tries)."""
    if fraction >= 1.0:
        return indices
    keep = max(1, int(round(fraction * len(indices))))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(indices, size=keep, replace=False))


def split_test(test_size: int, aux_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (aux, eval) index sets of the test split.

    The server's clean auxiliary set is drawn from the test split; ACC and ASR are
    measured only on the rest, so the defense never sees an image it is scored on.
    """
    order = np.random.default_rng(seed).permutation(test_size)
    return np.sort(order[:aux_size]), np.sort(order[aux_size:])
