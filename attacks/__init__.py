"""Backdoor attacks: trigger schemes (registry: name -> builder) and data poisoning."""

from collections.abc import Callable

from attacks.poisoning import malicious_clients, poison
from attacks.triggers import CORNERS, PIXEL_COUNTS, PixelTrigger, TriggerScheme, cba, dba
from experiment.config import ConfigError, ExperimentConfig, choice
from experiment.data import DATASETS

# name -> builder(height, width, pixels, value, corner, margin)
TRIGGERS: dict[str, Callable[..., TriggerScheme]] = {
    "cba": cba,
    "dba": dba,
}


def trigger_scheme(cfg: ExperimentConfig) -> TriggerScheme:
    """The configured attack's pattern for the data set's images."""
    _, height, width = DATASETS[cfg.dataset].shape
    return TRIGGERS[cfg.trigger](height, width, cfg.trigger_pixels, cfg.trigger_value,
                                 cfg.trigger_corner, cfg.trigger_margin)


def check(cfg: ExperimentConfig) -> None:
    """The trigger is known and fits the data set's images (raises ConfigError)."""
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


__all__ = ["CORNERS", "PIXEL_COUNTS", "TRIGGERS", "PixelTrigger", "TriggerScheme",
           "check", "malicious_clients", "poison", "trigger_scheme"]
