"""Mid-training aggregation rules (registry: `aggregation=` name -> builder).

Every rule samples every client every round (client sampling rate 1), skips client-side
evaluation, and is wrapped (`wrap`) so that malformed replies are dropped and the W0
snapshot and the post-training defenses work with any of them. Flower's own strategies are used where
Flower has the rule; RLR and the invariant aggregator act on updates (`DeltaStrategy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import Bulyan, FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Strategy

from strategies.invariant import InvariantAggregator
from strategies.post_training import PostTrainingHook, with_post_training
from strategies.reply_guard import with_reply_guard
from strategies.rlr import RobustLR, default_theta


def wrap(base: type[Strategy]) -> type[Strategy]:
    """Any rule + reply validation + W0 snapshot and post-training hook."""
    return with_post_training(with_reply_guard(base))


def _common(cfg: Any, post_training: PostTrainingHook | None) -> dict[str, Any]:
    # Every connected client trains (fraction 1); a round goes on while at least
    # `min-clients` nodes are connected (nodes can die in a real deployment).
    return dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.min_replies,
                min_available_nodes=cfg.min_replies, post_training=post_training)


def krum_f(cfg: Any) -> int:
    """Malicious clients that Krum/MultiKrum/Bulyan assume: `krum-f`, or (-1) the true count."""
    return cfg.num_malicious if cfg.krum_f < 0 else cfg.krum_f


def rlr_theta(cfg: Any) -> int:
    return default_theta(cfg.num_clients) if cfg.rlr_theta == 0 else cfg.rlr_theta


def fedavg(cfg, hook, buffers):
    """FedAvg (McMahan et al. 2017), weighted by examples, server learning rate 1."""
    return wrap(FedAvg)(**_common(cfg, hook))


def rlr(cfg, hook, buffers):
    """Robust learning rate (Ozdayi et al., AAAI 2021)."""
    return wrap(RobustLR)(theta=rlr_theta(cfg), eta=cfg.rlr_eta, buffer_keys=buffers, **_common(cfg, hook))


def krum(cfg, hook, buffers):
    """Krum (Blanchard et al. 2017), Flower's implementation."""
    return wrap(Krum)(num_malicious_nodes=krum_f(cfg), **_common(cfg, hook))


def multikrum(cfg, hook, buffers):
    """Multi-Krum: average the `multikrum-m` most central updates (0 = n - f)."""
    f = krum_f(cfg)
    m = cfg.multikrum_m or cfg.num_clients - f
    return wrap(MultiKrum)(num_malicious_nodes=f, num_nodes_to_select=m, **_common(cfg, hook))


def bulyan(cfg, hook, buffers):
    """Bulyan (El Mhamdi et al. 2018), Flower's implementation."""
    return wrap(Bulyan)(num_malicious_nodes=krum_f(cfg), **_common(cfg, hook))


def trimmed_mean(cfg, hook, buffers):
    """Coordinate-wise trimmed mean (Yin et al. 2018), Flower's FedTrimmedAvg."""
    return wrap(FedTrimmedAvg)(beta=cfg.trim_beta, **_common(cfg, hook))


def median(cfg, hook, buffers):
    """Coordinate-wise median (Yin et al. 2018), Flower's FedMedian."""
    return wrap(FedMedian)(**_common(cfg, hook))


def invariant(cfg, hook, buffers):
    """Invariant aggregator (Wang et al.): sign-agreement mask + trimmed mean."""
    return wrap(InvariantAggregator)(
        threshold=cfg.invariant_threshold, beta=cfg.invariant_beta, buffer_keys=buffers, **_common(cfg, hook))


# builder(cfg, post-training hook, BatchNorm buffer keys) -> Flower strategy
AGGREGATIONS: dict[str, Callable[[Any, PostTrainingHook | None, frozenset[str]], Strategy]] = {
    "fedavg": fedavg,
    "rlr": rlr,
    "krum": krum,
    "multikrum": multikrum,
    "bulyan": bulyan,
    "trimmed-mean": trimmed_mean,
    "median": median,
    "invariant": invariant,
}


def check(cfg: Any) -> str | None:
    """Why this aggregation cannot work with these settings (None if it can)."""
    n, f = cfg.num_clients, krum_f(cfg)
    if cfg.aggregation == "rlr" and not 1 <= rlr_theta(cfg) <= n:
        return f"rlr-theta={cfg.rlr_theta} is not allowed with num-clients={n}: must be 0 (auto) or 1..{n}"
    # Krum scores each update by its n - f - 2 nearest neighbours: there must be one.
    # (Its guarantee needs n > 2f + 2; with fewer clients it still runs, unguaranteed.)
    if cfg.aggregation in ("krum", "multikrum") and n - f - 2 < 1:
        return f"krum needs num-clients >= krum-f + 3, got num-clients={n}, krum-f={f}"
    if cfg.aggregation == "multikrum" and not 0 <= cfg.multikrum_m <= n:
        return f"multikrum-m={cfg.multikrum_m} is not allowed: must be 0 (auto: n - f) or 1..{n}"
    if cfg.aggregation == "bulyan" and n < 4 * f + 3:
        return f"bulyan needs num-clients >= 4*krum-f + 3, got num-clients={n}, krum-f={f}"
    return None
