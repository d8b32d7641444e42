"""Every random stream of a run, derived from its one `seed`.

Each stream is a `numpy.random.SeedSequence` spawned from the run's seed by purpose and
by the integers that identify it (round, client), so no two streams share state: the
batch order of client 3 in round 2 has nothing to do with that of client 34 in round 1,
and a client's poisoning draw is not its subsampling draw.
"""

from __future__ import annotations

import numpy as np

# One fixed id per purpose (never renumber: it would change every run's streams).
PURPOSES: dict[str, int] = {
    "partition": 1,  # the IID shuffle / Dirichlet partitioner
    "attackers": 2,  # which clients are malicious
    "subsample": 3,  # train-fraction, per client
    "poison": 4,  # which source images a malicious client stamps, per client
    "batches": 5,  # batch order, per round and client
    "dropout": 6,  # torch's global generator in local training, per round and client
    "aux-split": 7,  # the server's aux set / eval set split of the test split
    "init": 8,  # the initial global model
    "aux-folds": 9,  # flain-cv: the folds of the aux set
    "flame-noise": 10,  # aggregation=flame: the noise on the aggregate, per round
    "weak-dp-noise": 11,  # aggregation=weak-dp: the noise on the aggregate, per round
    "fltrust-root": 12,  # aggregation=fltrust: the server's root set in the test split
    "fltrust-batches": 13,  # aggregation=fltrust: batch order of the server's training, per round
    "sampling": 14,  # clients-per-round: the clients that train, per round
}


def sequence(seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    """The seed sequence of one stream: (seed) spawned by (purpose, *keys)."""
    if purpose not in PURPOSES:
        raise KeyError(f"unknown random purpose {purpose!r}; known: {sorted(PURPOSES)}")
    return np.random.SeedSequence(entropy=seed, spawn_key=(PURPOSES[purpose], *map(int, keys)))


def rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy generator for one stream."""
    return np.random.default_rng(sequence(seed, purpose, *keys))


def int_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit integer for seeding torch (or a library that takes an int) for one stream."""
    return int(sequence(seed, purpose, *keys).generate_state(1, np.uint64)[0] >> np.uint64(1))
