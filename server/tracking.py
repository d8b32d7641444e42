"""Optional experiment tracking (`tracker=`, off by default): TensorBoard event files in the run
directory, written by `torch.utils.tensorboard` (as the FLAIN authors' code and backdoors101 do).

What is written: per round `round/acc`, `round/asr`, `round/seconds`; per post-training defense
`defense/<name>/<metric>` (acc, asr, flipped, threshold, seconds, aux accuracy); FLAIN's search
curve as `search/<name>/aux_acc` by flipped count (the step axis). `tensorboard --logdir RUN_DIR`
shows them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

from experiment.config import ConfigError, ExperimentConfig, choice


class Tracker(Protocol):
    def round(self, rnd: int, acc: float, asr: float, seconds: float) -> None: ...

    def defense(self, name: str, result: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NoTracker:
    """tracker=none: nothing is written."""

    def round(self, rnd: int, acc: float, asr: float, seconds: float) -> None:
        pass

    def defense(self, name: str, result: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# the scalars of a defense's report worth a chart (the rest is in summary.json)
DEFENSE_SCALARS = ("acc", "asr", "flipped", "pruned", "threshold", "seconds", "aux_acc_before", "aux_acc_after")


class TensorBoardTracker:
    """tracker=tensorboard: event files under `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def round(self, rnd: int, acc: float, asr: float, seconds: float) -> None:
        for key, value in (("acc", acc), ("asr", asr), ("seconds", seconds)):
            self.writer.add_scalar(f"round/{key}", value, rnd)
        self.writer.flush()

    def defense(self, name: str, result: dict[str, Any]) -> None:
        for key in DEFENSE_SCALARS:
            if isinstance(result.get(key), (int, float)) and not isinstance(result.get(key), bool):
                self.writer.add_scalar(f"defense/{name}/{key}", result[key], 0)
        curve = result.get("search_curve") or {}
        for flipped, acc in zip(curve.get("flipped", ()), curve.get("aux_acc", ())):
            self.writer.add_scalar(f"search/{name}/aux_acc", acc, flipped)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


TRACKERS = {"none": NoTracker, "tensorboard": TensorBoardTracker}


def check(cfg: ExperimentConfig) -> None:
    """`tracker` is known and its package can be imported (raises ConfigError)."""
    choice("tracker", cfg.tracker, TRACKERS)
    if cfg.tracker == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tracker='tensorboard' needs the tensorboard package: pip install tensorboard")


def make_tracker(cfg: ExperimentConfig, log_dir: Path) -> Tracker:
    return NoTracker() if cfg.tracker == "none" else TRACKERS[cfg.tracker](log_dir)
