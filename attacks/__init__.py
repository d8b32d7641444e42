"""Backdoor attacks: triggers (registry: name -> builder) and data poisoning."""

from collections.abc import Callable

from attacks.poisoning import malicious_clients, poison
from attacks.triggers import PixelTrigger, cba

# name -> builder(height, width) of the trigger that ASR is measured with.
TRIGGERS: dict[str, Callable[[int, int], PixelTrigger]] = {
    "cba": cba,
}

__all__ = ["TRIGGERS", "PixelTrigger", "malicious_clients", "poison"]
