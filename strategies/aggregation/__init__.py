"""Mid-training aggregation rules (registry: `aggregation=` name -> builder).

Every rule trains every client it is given each round (Flower's fraction 1; with
`clients-per-round` the `Sampled` wrapper gives it the round's sample), skips client-side
evaluation, and drops malformed replies (`reply_guard`). Flower's own strategies are used
where Flower has the rule; RLR and the invariant aggregator act on updates (`DeltaStrategy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from experiment.config import ConfigError, ExperimentConfig, choice
from strategies.aggregation.clipping import NormClipping
from strategies.aggregation.flame import Flame
from strategies.aggregation.fltrust import FLTrust, root_training
from strategies.aggregation.foolsgold import FoolsGold
from strategies.aggregation.invariant import InvariantAggregator
from strategies.aggregation.reply_guard import ReplyLimits, guarded
from strategies.aggregation.rlr import RobustLR


def _common(cfg: ExperimentConfig, limits: ReplyLimits) -> dict[str, Any]:
    # Every connected client trains (fraction 1); a round goes on while at least
    # `min-clients` nodes are connected (nodes can die in a real deployment). `limits`: what
    # a reply may claim about itself (reply_guard).
    return dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.min_replies,
                min_available_nodes=cfg.min_replies, limits=limits)


def krum_f(cfg: ExperimentConfig) -> int:
    """Malicious clients per round that Krum/MultiKrum/Bulyan assume: `krum-f`, or (-1) the
    true count (with sampling: the fixed schedule's count, or the expected one)."""
    return cfg.round_attackers if cfg.krum_f < 0 else cfg.krum_f


def fedavg(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """FedAvg (McMahan et al. 2017), weighted by examples, server learning rate 1."""
    return guarded(FedAvg)(**_common(cfg, limits))


def rlr(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """Robust learning rate (Ozdayi et al., AAAI 2021); theta 0 = a majority of each round's replies."""
    return guarded(RobustLR)(theta=cfg.rlr_theta or None, eta=cfg.rlr_eta, buffer_keys=buffers, **_common(cfg, limits))


def krum(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """Krum (Blanchard et al. 2017), Flower's implementation."""
    return guarded(Krum)(num_malicious_nodes=krum_f(cfg), **_common(cfg, limits))


def multikrum(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """Multi-Krum: average the `multikrum-m` most central updates (0 = n - f)."""
    f = krum_f(cfg)
    m = cfg.multikrum_m or cfg.round_clients - f
    return guarded(MultiKrum)(num_malicious_nodes=f, num_nodes_to_select=m, **_common(cfg, limits))


def bulyan(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """Bulyan (El Mhamdi et al. 2018), Flower's implementation."""
    return guarded(Bulyan)(num_malicious_nodes=krum_f(cfg), **_common(cfg, limits))


def trimmed_mean(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """Coordinate-wise trimmed mean (Yin et al. 2018), Flower's FedTrimmedAvg."""
    return guarded(FedTrimmedAvg)(beta=cfg.trim_beta, **_common(cfg, limits))


def median(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """Coordinate-wise median (Yin et al. 2018), Flower's FedMedian."""
    return guarded(FedMedian)(**_common(cfg, limits))


def invariant(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """Invariant aggregator (Wang et al.): sign-agreement mask + trimmed mean."""
    return guarded(InvariantAggregator)(
        threshold=cfg.invariant_threshold, beta=cfg.invariant_beta, buffer_keys=buffers, **_common(cfg, limits))


def flame(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """FLAME (Nguyen et al., USENIX Security 2022): HDBSCAN on cosine distances, median-norm clip, noise."""
    return guarded(Flame)(noise=cfg.flame_lambda, seed=cfg.seed, buffer_keys=buffers, **_common(cfg, limits))


def fltrust(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """FLTrust (Cao et al., NDSS 2021): trust = ReLU(cosine) with the server's update on its root set."""
    return guarded(FLTrust)(server_update=root_training(cfg), root_size=cfg.fltrust_root_size, buffer_keys=buffers,
                            **_common(cfg, limits))


def foolsgold(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """FoolsGold (Fung et al., RAID 2020): similar update histories get small weights."""
    return guarded(FoolsGold)(buffer_keys=buffers, **_common(cfg, limits))


def norm_clipping(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """Norm clipping (Sun et al. 2019): every update clipped to clip-norm, then FedAvg."""
    return guarded(NormClipping)(clip=cfg.clip_norm, buffer_keys=buffers, **_common(cfg, limits))


def weak_dp(cfg: ExperimentConfig, buffers: frozenset[str], limits: ReplyLimits) -> Strategy:
    """Weak DP (Sun et al. 2019): norm clipping plus Gaussian noise of std dp-sigma."""
    return guarded(NormClipping)(clip=cfg.clip_norm, sigma=cfg.dp_sigma, seed=cfg.seed, buffer_keys=buffers,
                                 **_common(cfg, limits))


# builder(cfg, BatchNorm buffer keys, reply limits) -> Flower strategy
AGGREGATIONS: dict[str, Callable[[ExperimentConfig, frozenset[str], ReplyLimits], Strategy]] = {
    "fedavg": fedavg,
    "rlr": rlr,
    "krum": krum,
    "multikrum": multikrum,
    "bulyan": bulyan,
    "trimmed-mean": trimmed_mean,
    "median": median,
    "invariant": invariant,
    "flame": flame,
    "fltrust": fltrust,
    "foolsgold": foolsgold,
    "norm-clipping": norm_clipping,
    "weak-dp": weak_dp,
}


def check(cfg: ExperimentConfig) -> None:
    """The rule is known and can work with these counts (raises ConfigError)."""
    choice("aggregation", cfg.aggregation, AGGREGATIONS)
    n, f = cfg.round_clients, krum_f(cfg)  # each rule sees one round's replies
    if cfg.aggregation == "rlr" and cfg.rlr_theta > n:
        raise ConfigError(f"rlr-theta={cfg.rlr_theta} is not allowed with {n} clients per round: "
                          f"must be 0 (auto: a majority of each round's replies) or 1..{n}")
    # Krum scores each update by its n - f - 2 nearest neighbours: there must be one.
    # (Its guarantee needs n > 2f + 2; with fewer clients it still runs, unguaranteed.)
    if cfg.aggregation in ("krum", "multikrum") and n - f - 2 < 1:
        raise ConfigError(f"aggregation={cfg.aggregation!r} needs clients per round >= krum-f + 3, "
                          f"got {n} clients per round, krum-f={f}")
    if cfg.aggregation == "multikrum" and cfg.multikrum_m > n:
        raise ConfigError(f"multikrum-m={cfg.multikrum_m} is not allowed: must be 0 (auto: n - f) or 1..{n}")
    if cfg.aggregation == "bulyan" and n < 4 * f + 3:
        raise ConfigError(f"aggregation='bulyan' needs clients per round >= 4*krum-f + 3, got {n} clients per round, krum-f={f}")
