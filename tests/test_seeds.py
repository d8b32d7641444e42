"""Every random stream comes from one SeedSequence, spawned by purpose, round and client."""

import numpy as np
import pytest

from experiment import seeds
from experiment.config import ExperimentConfig


def test_streams_of_100_clients_by_50_rounds_are_distinct():
    for purpose in ("batches", "dropout"):
        values = {seeds.int_seed(42, purpose, r, c) for r in range(1, 51) for c in range(100)}
        assert len(values) == 100 * 50, purpose
    # the old arithmetic collided: client p+31 in round r == client p in round r+1
    assert seeds.int_seed(42, "batches", 1, 34) != seeds.int_seed(42, "batches", 2, 3)
    first_draws = {tuple(seeds.rng(42, "batches", r, c).integers(0, 2**62, 2)) for r in range(1, 51) for c in range(100)}
    assert len(first_draws) == 5000


def test_purposes_and_seeds_do_not_share_streams():
    per_purpose = {p: seeds.int_seed(7, p, 3) for p in seeds.PURPOSES}
    assert len(set(per_purpose.values())) == len(seeds.PURPOSES)  # poison != subsample for one client
    assert seeds.int_seed(7, "poison", 3) != seeds.int_seed(8, "poison", 3)
    # the documented derivation: SeedSequence(seed) spawned by (purpose id, keys...), and a
    # pinned value (a renumbered purpose or a changed derivation changes every run's streams)
    assert seeds.int_seed(7, "poison", 3) == int(
        np.random.SeedSequence(entropy=7, spawn_key=(4, 3)).generate_state(1, np.uint64)[0] >> np.uint64(1))
    assert seeds.int_seed(7, "poison", 3) == 6580839859764499286
    assert np.array_equal(seeds.rng(1, "aux-split").permutation(10),
                          np.random.default_rng(np.random.SeedSequence(1, spawn_key=(7,))).permutation(10))
    with pytest.raises(KeyError, match="unknown random purpose"):
        seeds.rng(1, "typo")


@pytest.mark.parametrize("mcr,clients,attackers", [
    (0.4, 10, 4), (0.5, 10, 5), (0.6, 10, 6), (0.4, 20, 8), (0.5, 20, 10), (0.6, 20, 12),
    (0.25, 10, 3), (0.35, 10, 4), (0.45, 10, 5), (0.34, 3, 1), (0.0, 10, 0), (1.0, 7, 7), (0.3, 15, 5),
])
def test_attacker_count_rounds_halves_up(mcr, clients, attackers):
    assert ExperimentConfig.defaults(mcr=mcr, num_clients=clients).num_malicious == attackers
