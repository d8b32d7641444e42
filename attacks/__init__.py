"""Backdoor attacks: trigger schemes and model attacks (registries: name -> builder), and
data poisoning.

Every malicious client poisons its data with the trigger. `attack=` chooses what it does on
top, in its local training (each in its own module, with its paper):
  none         the paper's attacker: plain training on the poisoned data
  neurotoxin   freeze the coordinates benign clients write to most (Zhang et al., ICML 2022)
  scaling      multiply the update before sending it: model replacement (Bagdasaryan et al. 2020)
  pgd          stay within an L2 ball around the global model (Sun et al. 2019; Wang et al. 2020)
  flain-aware  keep the backdoor out of the inputs FLAIN flips (ours; see attacks/flain_aware.py)
"""

from collections.abc import Callable

from attacks.base import UPDATE_METRICS, AttackContext, ModelAttack
from attacks.flain_aware import FlainAware
from attacks.neurotoxin import Neurotoxin
from attacks.pgd import PGD
from attacks.poisoning import malicious_clients, poison
from attacks.scaling import Scaling
from attacks.triggers import CORNERS, PIXEL_COUNTS, PixelTrigger, TriggerScheme, cba, dba
from experiment.config import ConfigError, ExperimentConfig, choice
from experiment.data import DATASETS

# name -> builder(height, width, pixels, value, corner, margin)
TRIGGERS: dict[str, Callable[..., TriggerScheme]] = {
    "cba": cba,
    "dba": dba,
}


def scaling_factor(cfg: ExperimentConfig) -> float:
    """`scaling-factor`, or (0) the round's clients / its attackers: together the attackers
    replace the model (all clients training: num-clients / num-malicious)."""
    return cfg.scaling_factor or cfg.round_clients / max(cfg.round_attackers, 1)


# name -> builder(cfg): what a malicious client does in its local training
ATTACKS: dict[str, Callable[[ExperimentConfig], ModelAttack]] = {
    "none": lambda cfg: ModelAttack(),
    "neurotoxin": lambda cfg: Neurotoxin(cfg.neurotoxin_topk),
    "scaling": lambda cfg: Scaling(scaling_factor(cfg)),
    "pgd": lambda cfg: PGD(cfg.pgd_eps),
    "flain-aware": lambda cfg: FlainAware(cfg.flain_aware_quantile, cfg.flain_aware_lambda),
}


def trigger_scheme(cfg: ExperimentConfig) -> TriggerScheme:
    """The configured attack's pattern for the data set's images."""
    _, height, width = DATASETS[cfg.dataset].shape
    return TRIGGERS[cfg.trigger](height, width, cfg.trigger_pixels, cfg.trigger_value,
                                 cfg.trigger_corner, cfg.trigger_margin)


def check(cfg: ExperimentConfig) -> None:
    """The trigger and the attack are known, the trigger fits the data set's images (raises
    ConfigError)."""
    choice("attack", cfg.attack, ATTACKS)
    choice("trigger", cfg.trigger, TRIGGERS)
    choice("trigger-corner", cfg.trigger_corner, CORNERS)
    if cfg.trigger_pixels not in (0, *PIXEL_COUNTS):
        raise ConfigError(f"trigger-pixels={cfg.trigger_pixels} is not allowed: "
                          f"0 (the default pattern) or one of {list(PIXEL_COUNTS)}")
    if cfg.trigger_pixels and cfg.trigger != "cba":
        raise ConfigError(f"trigger-pixels={cfg.trigger_pixels} applies to trigger='cba' only, not {cfg.trigger!r}")
    try:
        trigger_scheme(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


__all__ = ["ATTACKS", "CORNERS", "PIXEL_COUNTS", "TRIGGERS", "UPDATE_METRICS", "AttackContext", "ModelAttack",
           "PixelTrigger", "TriggerScheme", "check", "malicious_clients", "poison", "scaling_factor", "trigger_scheme"]
