"""Backdoor attacks: trigger schemes (registry: name -> builder) and data poisoning."""

from collections.abc import Callable
from typing import Any

from attacks.poisoning import malicious_clients, poison
from attacks.triggers import CORNERS, PIXEL_COUNTS, PixelTrigger, TriggerScheme, cba, dba

# name -> builder(height, width, pixels, value, corner, margin)
TRIGGERS: dict[str, Callable[..., TriggerScheme]] = {
    "cba": cba,
    "dba": dba,
}


def trigger_scheme(cfg: Any, height: int, width: int) -> TriggerScheme:
    """The configured attack's pattern for H x W images."""
    return TRIGGERS[cfg.trigger](height, width, cfg.trigger_pixels, cfg.trigger_value,
                                 cfg.trigger_corner, cfg.trigger_margin)


__all__ = ["CORNERS", "PIXEL_COUNTS", "TRIGGERS", "PixelTrigger", "TriggerScheme",
           "malicious_clients", "poison", "trigger_scheme"]
