"""FLAIN added to any Flower strategy, in the style of Flower's DP wrappers.

    strategy = FlainDefense(FedAvg(), model_fn=Net, aux=(aux_images, aux_labels))
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=10)
    result.arrays      # the defended model (FLAIN, Ding et al., Algorithm 1)
    result.undefended  # what the wrapped strategy trained
    result.reports     # per defense: threshold, flipped inputs, seconds, your evaluate_fn's metrics

The wrapper keeps W0 (the arrays `start()` receives), runs the wrapped strategy's own `start()`
unchanged (FedAvg, RLR, Krum, a DP wrapper: its rounds, its aggregation), then applies each
post-training defense to the final arrays with the server's clean aux set. It acts at the start
and the end of training, so it must be the outermost wrapper (inside a DP wrapper its `start()`
would never run). Defenses are the `post-defenses=` registry's (`strategies.post_training`);
`fedpruning` asks the clients for rankings, which only our ClientApp answers.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import nn

from experiment.config import ExperimentConfig
from experiment.data import to_float
from models import inference_batches
from strategies.post_training import POST_DEFENSES, PostTrainingDefense, PostTrainingInput
from strategies.post_training.tau import TauView
from strategies.resume import Offset
from strategies.wrapping import StrategyWrapper

StateDict = dict[str, torch.Tensor]
# the metrics of a model (e.g. {"acc": ..., "asr": ...}), put beside each defense's report
Scores = Callable[[StateDict], Mapping[str, float]]


class DefenseSink(Protocol):
    """Where defended models and their reports go as they are made (a run directory)."""

    def save_model(self, name: str, state: StateDict) -> object: ...

    def post_defense(self, name: str, result: dict[str, Any]) -> None: ...


def apply_defenses(inp: PostTrainingInput, defenses: Mapping[str, PostTrainingDefense],
                   evaluate_fn: Scores | None = None, sink: DefenseSink | None = None
                   ) -> tuple[dict[str, StateDict], dict[str, dict[str, Any]]]:
    """Every defense on the same trained model, side by side: (defended state_dicts, reports).
    A defense that raises gets {"error": ...} as its report and no model; the others go on."""
    states: dict[str, StateDict] = {}
    reports: dict[str, dict[str, Any]] = {}
    for name, defense in defenses.items():
        started = time.perf_counter()
        try:
            state, info = defense.apply(inp)
        except Exception as exc:
            log(ERROR, "[flain] post-defense %s FAILED:\n%s", name, traceback.format_exc())
            reports[name] = {"error": f"{type(exc).__name__}: {exc}"}
            if sink is not None:
                sink.post_defense(name, reports[name])
            continue
        seconds = time.perf_counter() - started
        states[name] = state
        reports[name] = {**(dict(evaluate_fn(state)) if evaluate_fn else {}), "seconds": seconds, **info}
        if sink is not None:
            sink.save_model(name, state)
            sink.post_defense(name, reports[name])
        log(INFO, "[flain] post-defense %s (%.1fs): %s", name, seconds,  # numbers only: no curves in the log
            {k: v for k, v in reports[name].items() if k != "seconds" and not isinstance(v, (dict, list))})
    return states, reports


class AuxMismatch(ValueError):
    """The aux set cannot serve the defenses on this model (message: one line, why)."""


def one_line(exc: BaseException) -> str:
    """An exception in one line (torch's and PIL's messages run over several)."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:200]}"


@torch.no_grad()
def check_fit(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, what: str = "aux") -> None:
    """The model takes these images (channels, size) and their labels are among its classes
    (runs it on a few of them)."""
    probe = slice(0, min(len(labels), 8))
    device = next(model.parameters()).device
    try:
        logits = model.eval()(images[probe].to(device))
    except (RuntimeError, ValueError, TypeError) as exc:
        shape = "x".join(str(d) for d in images.shape[1:])
        raise AuxMismatch(f"the model cannot take the {what} images (each {shape}): {one_line(exc)}") from None
    if logits.dim() != 2:
        raise AuxMismatch(f"the model returns {tuple(logits.shape)} per batch: it must return logits (N x classes)")
    if int(labels.max()) >= logits.shape[1]:
        raise AuxMismatch(f"{what} label {int(labels.max())} is not a class of the model ({logits.shape[1]} outputs)")


@torch.no_grad()
def preflight(model: nn.Module, defenses: Mapping[str, PostTrainingDefense], images: torch.Tensor,
              labels: torch.Tensor) -> None:
    """Refuse now what would fail or wreck the model after training: an aux set the model cannot
    take, labels outside its classes, an aux set of one class, a tau that is not usable,
    FLAIN-CV on a model it cannot split at tau."""
    if len(labels.unique()) < 2:
        raise AuxMismatch(f"the aux set has {len(labels)} image(s) of {len(labels.unique())} class: FLAIN needs a "
                          "clean aux set of several classes to see a clean-accuracy drop (the paper: 200 images)")
    check_fit(model, images, labels)
    probe = slice(0, min(len(labels), 8))
    views: dict[str, TauView] = {}
    for name, defense in defenses.items():
        layer = getattr(defense, "layer", None)
        if layer is None:
            continue
        if layer not in views:
            try:
                views[layer] = TauView.of(model, layer, images[probe], labels[probe])
            except ValueError as exc:  # a layer that is not a Linear, or TauNotUsable
                raise AuxMismatch(f"{name}: {exc}") from None
        if getattr(type(defense), "needs_split", False) and views[layer].rest is None:
            raise AuxMismatch(f"{name} needs a model whose output after layer {views[layer].name!r} is a function of "
                              "that layer's output alone (torch.fx-traceable, no skip around it); use flain")


@torch.no_grad()
def aux_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(the model's accuracy on the aux set, its number of classes)."""
    logits = torch.cat([z.cpu() for z in inference_batches(model.eval(), images)])
    return (logits.argmax(1) == labels).float().mean().item(), logits.shape[1]


def trained_fits_aux(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> str | None:
    """Why the trained model and the aux set do not go together (None: they do). A model no
    better than chance on its clean aux set means the labels, the normalisation or the images
    are not what it was trained on, and Algorithm 1 would flip every input (its drop never
    reaches rho) and return a ruined model."""
    acc, classes = aux_accuracy(model, images, labels)
    if acc <= 1.0 / classes:
        return (f"the trained model classifies {acc:.1%} of the aux images correctly, no better than chance "
                f"(1/{classes}): the aux set does not match the model (labels, normalisation, channels)")
    return None


def build_defenses(names: Sequence[str], **settings: Any) -> dict[str, PostTrainingDefense]:
    """Registry defenses by name, each given the `settings` it has a field for (step, rho,
    layer, start, ...); the rest keep their defaults (experiment/config.py)."""
    built = {}
    for name in names:
        if name not in POST_DEFENSES:
            raise ValueError(f"unknown post-training defense {name!r}: choose from {sorted(POST_DEFENSES)}")
        cls = POST_DEFENSES[name]
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        built[name] = cls(**{k: v for k, v in settings.items() if k in known})
    return built


def _aux(aux: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        images, labels = aux
    except (TypeError, ValueError):
        raise ValueError("aux must be a pair (images N x C x H x W, labels N)") from None
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if len(images) == 0 or len(images) != len(labels) or labels.dim() != 1:
        raise ValueError(f"aux images {tuple(images.shape)} and labels {tuple(labels.shape)}: "
                         "need N >= 1 images and N labels")
    if labels.is_floating_point() or labels.is_complex() or bool((labels < 0).any()):
        raise ValueError("aux labels must be non-negative integer class indices")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise ValueError("aux images hold NaN or infinite values")
    if not images.is_floating_point() and images.dtype != torch.uint8:
        raise ValueError(f"aux images must be float (as the model takes them) or uint8 (divided by 255), got {images.dtype}")
    return to_float(images), labels.long()


@dataclass
class DefendedResult(Result):
    """Flower's `Result` whose `arrays` are the defended model (the first defense that
    succeeded; the trained model itself if none did), with the rest kept beside it."""

    undefended: ArrayRecord = field(default_factory=ArrayRecord)  # the wrapped strategy's final model
    defended: dict[str, ArrayRecord] = field(default_factory=dict)  # every defense that succeeded
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # every defense, "error" if it failed


class FlainDefense(StrategyWrapper):
    """Wrap `strategy` so that its final model is defended after the last round.

    Parameters
    ----------
    strategy: the Flower strategy that trains (run unchanged).
    model_fn: builds the model the arrays belong to (any `torch.nn.Module`).
    aux: the server's clean auxiliary set, (images, labels): images as the model takes them
        (float; uint8 is divided by 255), labels as class indices.
    layer: tau, the Linear layer whose input columns are flipped, by name; "auto": the first
        Linear after the last convolution in module order.
    defenses: registry names (`flain`, `flain-cv`, `pruning`, `fedpruning`), or name -> defense
        (empty: the trained model is returned as it is).
    step, rho, start: Algorithm 1's threshold step, accuracy-drop tolerance and first
        threshold (None: the minimum activation + step, as the paper).
    evaluate_fn: metrics of a state_dict (e.g. ACC and ASR on your test set), in each report.
    sink: receives the final model and every defended model and report as they are made.
    device: where the defenses compute (default: the model's own device).
    """

    def __init__(self, strategy: Strategy, *, model_fn: Callable[[], nn.Module],
                 aux: tuple[torch.Tensor, torch.Tensor], layer: str = ExperimentConfig.flain_layer,
                 defenses: Sequence[str] | Mapping[str, PostTrainingDefense] = ("flain",),
                 step: float = ExperimentConfig.flain_step, rho: float = ExperimentConfig.flain_rho,
                 start: float | None = None, evaluate_fn: Scores | None = None, sink: DefenseSink | None = None,
                 device: torch.device | str | None = None) -> None:
        if isinstance(strategy, FlainDefense):
            raise TypeError("strategy is already a FlainDefense: wrap it once, with every defense")
        super().__init__(strategy)
        self.model_fn = model_fn
        self.aux_images, self.aux_labels = _aux(aux)
        if not step > 0 or not 0 < rho <= 1 or (start is not None and not np.isfinite(start)):
            raise ValueError(f"step={step}, rho={rho}, start={start}: need step > 0, 0 < rho <= 1 and a finite start")
        self.defenses = (dict(defenses) if isinstance(defenses, Mapping)
                         else build_defenses(defenses, layer=layer, step=step, rho=rho, start=start))
        self.evaluate_fn, self.sink, self.device = evaluate_fn, sink, device

    def __repr__(self) -> str:
        return f"FlainDefense({self.strategy!r}, defenses={list(self.defenses)})"

    def summary(self) -> None:
        log(INFO, "\t├── post-training defenses: %s on %d aux images", ", ".join(self.defenses), len(self.aux_labels))
        self.strategy.summary()

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              start_round: int = 1, w0: ArrayRecord | None = None) -> DefendedResult:
        """The wrapped strategy's `start()`, then every defense on its final arrays. What would
        make the defenses fail (the aux set, tau) is refused before the first round.

        To resume: `initial_arrays` are the model after round start_round - 1, `w0` the
        training's true initial model (FLAIN's W0); rounds start_round..num_rounds are run and
        `evaluate_fn` is told their true numbers (its round 0 call is start_round - 1);
        start_round = num_rounds + 1 only defends `initial_arrays`."""
        if not 1 <= start_round <= num_rounds + 1:
            raise ValueError(f"start_round={start_round} must be in 1..num_rounds + 1 = {num_rounds + 1}")
        if (w0 is None) != (start_round == 1):
            raise ValueError("give w0 (the initial model) exactly when resuming (start_round > 1)")
        w0 = {k: v.clone() for k, v in (w0 or initial_arrays).to_torch_state_dict().items()}
        preflight(self._model(w0), self.defenses, self.aux_images, self.aux_labels)
        loop = self.strategy if start_round == 1 else Offset(self.strategy, start_round - 1)
        result = Result()  # (start_round = num_rounds + 1: nothing left to train)
        if start_round <= num_rounds:
            result = loop.start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds - start_round + 1,
                                timeout=timeout, train_config=train_config, evaluate_config=evaluate_config,
                                evaluate_fn=evaluate_fn if start_round == 1 else loop.shifted(evaluate_fn))
        if not result.arrays and start_round > 1:
            result.arrays = initial_arrays  # resumed from a trained model: it stays if no round changed it
        kept = {f.name: getattr(result, f.name) for f in dataclasses.fields(Result)}
        if not result.arrays:  # no round aggregated anything: nothing to defend
            return DefendedResult(**kept, undefended=result.arrays)
        final = result.arrays.to_torch_state_dict()
        if self.sink is not None:
            self.sink.save_model("final", final)
        states, reports = self.defend(final, w0, grid=grid, last_round=num_rounds)
        first = next(iter(states), None)
        kept["arrays"] = ArrayRecord(states[first]) if first else result.arrays
        return DefendedResult(**kept, undefended=result.arrays,
                              defended={n: ArrayRecord(s) for n, s in states.items()}, reports=reports)

    def defend(self, final: StateDict, initial: StateDict, grid: Grid | None = None, last_round: int = 0
               ) -> tuple[dict[str, StateDict], dict[str, dict[str, Any]]]:
        """The defenses on a trained model (final) with its W0 (initial), without training. A
        trained model no better than chance on the aux set gets no defense (each report says why)."""
        model = self._model(final)
        problem = trained_fits_aux(model, self.aux_images, self.aux_labels) if self.defenses else None
        if problem is not None:
            log(WARNING, "[flain] no post-training defense applied: %s", problem)
            reports = {name: {"error": problem} for name in self.defenses}
            if self.sink is not None:
                for name, report in reports.items():
                    self.sink.post_defense(name, report)
            return {}, reports
        inp = PostTrainingInput(model=model, initial_state=initial, aux_images=self.aux_images,
                                aux_labels=self.aux_labels, grid=grid, strategy=self.strategy, last_round=last_round)
        return apply_defenses(inp, self.defenses, self.evaluate_fn, self.sink)

    def _model(self, state: StateDict) -> nn.Module:
        model = self.model_fn()
        if self.device is not None:
            model = model.to(self.device)
        model.load_state_dict(state)
        return model
