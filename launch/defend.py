"""`flain defend`: apply post-training defenses to a finished run's saved models, or to any
model saved outside a run directory (`defend_model`: a model factory, W0 and the trained
state_dict, an aux set, optionally a clean and a triggered test set).

Reads RUN_DIR's config.json, initial.pt (W0) and final.pt, rebuilds the run's own aux set
and evaluation set, applies the named defenses (the ServerApp's own code path) and writes
RUN_DIR/defended/<label>/: config.json (what was applied), summary.json (the same
`post_defenses` fields as the run's) and <defense>.pt. `flain table RUN_DIR` lists them.
Only post-training settings (`flain-*`) may change; federated pruning needs the clients
and is refused.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from experiment.config import ConfigError, ExperimentConfig, default_run_config
from experiment.data import aux_size, aux_split, load, root_split, split_test, to_float
from experiment.hardware import pick_device
from launch.tables import read_run
from launch.external import ImageSet, image_set, model_factory, state_dict
from models import build_model, inference_batches, resolve_tau
from strategies import POST_DEFENSES
from strategies.flain_defense import AuxMismatch, apply_defenses, check_fit, preflight, trained_fits_aux
from strategies.post_training import PostTrainingInput
from strategies.post_training import check as check_post_training
from server.evaluation import Evaluator
from server.post_training import apply_post_defenses, make_evaluator, post_defenses, post_training_input
from server.checks import check_experiment
from server.results import DefendRecorder, RunDir, clear, end_status



AUX_KEYS = ("aux-draw", "aux-size")  # the server's aux set: drawn again when either is given


def changeable(key: str) -> bool:
    """Settings a saved model can be re-defended with: the post-training ones, the aux set, and
    where the data are."""
    return key.startswith("flain-") or key in ("post-defenses", "data-dir", *AUX_KEYS)


def _check_changes(defenses: list[str], overrides: dict[str, Any]) -> None:
    if not defenses:
        raise ConfigError("--post-defenses is empty: name at least one defense")
    for key in overrides:
        if not changeable(key) and key in default_run_config():
            raise ConfigError(f"{key} is a training setting: it cannot change for a finished run "
                              "(only the flain-* settings, post-defenses, aux-draw, aux-size and data-dir can); "
                              "train again with `flain run`")
    for name in defenses:
        if name in POST_DEFENSES and POST_DEFENSES[name].needs_clients:
            raise ConfigError(f"post-defenses={name!r} asks the clients for their activation rankings in an "
                              "extra federated round: it cannot run on a saved model; run it with "
                              f"`flain run --set post-defenses={name}`")


def defend_config(run_config: dict[str, Any], defenses: list[str], overrides: dict[str, Any]) -> ExperimentConfig:
    """The run's configuration with other post-training settings (checked)."""
    _check_changes(defenses, overrides)
    base = {k: v for k, v in run_config.items() if k in default_run_config() and k != "run-dir"}
    cfg = ExperimentConfig.from_run_config(base | overrides | {"post-defenses": ",".join(defenses)})
    check_experiment(cfg)
    return cfg


def aux_indices(run: RunDir, run_config: dict[str, Any], cfg: ExperimentConfig, labels: np.ndarray,
                overrides: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The aux indices in the test split, and where they came from: drawn as `aux-draw` and
    `aux-size` say when either is overridden, else the run's own."""
    test_size = len(labels)
    if any(key in overrides for key in AUX_KEYS):
        return aux_split(cfg, labels)[0], f"aux-draw={cfg.aux_draw}, aux-size={aux_size(cfg)}"
    if run.aux_file.is_file():
        return run.aux(test_size), run.aux_file.name
    size = aux_size(cfg)
    if "aux-size" in run_config.get("resolved", {}):  # runs of the SeedSequence code, before aux.npy
        return split_test(test_size, size, cfg.seed)[0], "seeds.rng(seed, 'aux-split')"
    # runs of the first releases drew the split with np.random.default_rng(seed)
    return np.sort(np.random.default_rng(cfg.seed).permutation(test_size)[:size]), "np.random.default_rng(seed)"


@dataclass(frozen=True, eq=False)
class SavedRun:
    """A finished run read back for its post-training stage, as the ServerApp had it: the
    configuration (with the post-training changes), the test split, the aux indices, the
    images ACC/ASR are scored on, W0 and the trained model (the final one or a checkpoint)."""

    run: RunDir
    config: ExperimentConfig
    images: torch.Tensor  # the whole test split
    labels: torch.Tensor
    aux: np.ndarray  # indices of the aux set in the test split
    aux_source: str  # where they came from (the run's aux.npy, or a new draw)
    scored: np.ndarray  # boolean mask: the images ACC/ASR are measured on
    initial: dict[str, torch.Tensor]
    trained: dict[str, torch.Tensor]
    trained_name: str  # "final" or "round-R"

    def evaluator(self, device: torch.device | str) -> Evaluator:
        return make_evaluator(self.config, self.images[self.scored], self.labels[self.scored], device)

    def post_training_input(self, device: torch.device | str) -> PostTrainingInput:
        return post_training_input(self.config, self.trained, self.initial, self.images[self.aux],
                                   self.labels[self.aux], device)


def load_saved_run(run_dir: Path, defenses: list[str], overrides: dict[str, Any], rnd: int | None = None,
                   device: torch.device | str = "cpu") -> SavedRun:
    """RUN_DIR's final model, or its checkpoint of round `rnd`, with everything its post-training
    stage needs (ConfigError: a change that is not allowed, or a missing model)."""
    run_config, _ = read_run(run_dir)
    run = RunDir(run_dir)
    cfg = defend_config(run_config, defenses, overrides)
    if rnd is not None:
        saved = run.checkpoint_rounds()
        if rnd not in saved:
            raise ConfigError(f"{run_dir} has no checkpoint of round {rnd}: it saved rounds {saved or 'none'} "
                              "(train with --set checkpoint-every=K)")
    for name in ("initial", "final") if rnd is None else ("initial",):  # a checkpoint needs no finished run
        if not run.model_file(name).is_file():
            why = ("its models were not kept (only config.json, summary.json and rounds.csv are here)"
                   if run.finished() else "the run did not finish training")
            raise ConfigError(f"{run_dir} has no {name}.pt: {why}")
    images, labels = load(cfg.dataset, cfg.data_dir, train=False)
    aux_idx, source = aux_indices(run, run_config, cfg, labels.numpy(), overrides)
    scored = np.zeros(len(labels), dtype=bool)
    scored[root_split(cfg, labels.numpy(), aux_idx)[1]] = True  # outside the aux set (and FLTrust's root set)
    like = build_model(cfg.dataset, cfg.network).state_dict()
    return SavedRun(run, cfg, images, labels, aux_idx, source, scored, run.load_model("initial", like, device),
                    run.load_model("final", like, device, rnd=rnd), "final" if rnd is None else f"round-{rnd}")


def automatic_label(defenses: list[str], overrides: dict[str, Any], rnd: int | None) -> str:
    """The result's directory name without --name: the defenses and the changed settings (not
    where the data live), as one safe path component."""
    label = "+".join(defenses) + "".join(f",{k}={v}" for k, v in sorted(overrides.items()) if k != "data-dir")
    label = re.sub(r"[^A-Za-z0-9_.,=+@-]", "_", label) + (f"@round-{rnd}" if rnd is not None else "")
    if len(label) > 120:  # still one name per setting: a digest of the whole stands for the tail
        label = label[:100] + "~" + hashlib.sha256(label.encode()).hexdigest()[:12]
    return label


def defend(run_dir: Path, defenses: list[str], overrides: dict[str, Any], label: str | None,
           overwrite: bool = False, rnd: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Apply `defenses` to RUN_DIR's final model, or to its checkpoint of round `rnd`;
    (output directory, its summary)."""
    _check_changes(defenses, overrides)
    if label is None:
        label = automatic_label(defenses, overrides, rnd)
    out = RunDir(run_dir).defended(label).path  # a bad label is refused here, before anything is read
    held = out.exists() and any(out.iterdir())
    if held and not overwrite:
        raise ConfigError(f"{out} already holds results: choose another --name or pass --overwrite")
    device = pick_device()
    saved = load_saved_run(run_dir, defenses, overrides, rnd, device)
    cfg = saved.config
    if held:
        clear(out)  # all of it (refused if it is not ours); only once everything needed is loaded
    evaluator = saved.evaluator(device)
    check = evaluator(saved.trained)  # the run's own no-Defense numbers, re-measured on the same images
    recorder = DefendRecorder(out, {
        "run": str(run_dir.resolve()), "model": saved.trained_name, "defenses": defenses, "overrides": overrides,
        "aux_source": saved.aux_source,
        "no_defense": check, "device": str(device),
        "config": {k: v for k, v in cfg.to_run_config().items() if changeable(k) or k == "seed"},
    })
    inp = saved.post_training_input(device)
    started = time.perf_counter()
    try:
        failed = apply_post_defenses(cfg, inp, evaluator, recorder)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (launch.cli): the results so far stay, marked
        end_status(out, "interrupted", "stopped by a signal (Ctrl-C or SIGTERM)")
        raise
    recorder.summary["seconds_total"] = time.perf_counter() - started
    return out, recorder.finish(failed)


def _scores(model_fn: Callable[[], nn.Module], test: ImageSet | None, triggered: ImageSet | None,
            device: torch.device) -> Callable[[dict[str, torch.Tensor]], dict[str, float]]:
    """ACC on the clean test set, ASR = the share of triggered images classified as their label
    (the attacker's target); each only where its set is given."""

    def share(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        predicted = torch.cat([z.argmax(1).cpu() for z in inference_batches(model, images)])
        return (predicted == labels).float().mean().item()

    @torch.no_grad()
    def evaluate(state: dict[str, torch.Tensor]) -> dict[str, float]:
        model = model_fn().to(device)
        model.load_state_dict(state)
        model.eval()
        return ({"acc": share(model, *test)} if test else {}) | ({"asr": share(model, *triggered)} if triggered else {})

    return evaluate


def defend_model(factory: str, initial_path: Path, final_path: Path, aux_path: Path, out: Path,
                 defenses: list[str], overrides: dict[str, Any], test_path: Path | None = None,
                 triggered_path: Path | None = None, overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Apply `defenses` to a model saved anywhere: `factory` (module:function) builds it,
    `initial_path` holds W0 and `final_path` the trained weights (state_dicts); results to `out`."""
    _check_changes(defenses, overrides)
    cfg = ExperimentConfig.from_run_config(default_run_config() | overrides | {"post-defenses": ",".join(defenses)})
    check_post_training(cfg)
    model = model_factory(factory)
    try:
        resolve_tau(model, cfg.flain_layer)
    except ValueError as exc:
        raise ConfigError(f"--model {factory}: {exc}") from None
    initial = state_dict(initial_path, model_factory(factory), "--initial")
    final = state_dict(final_path, model, "--final")
    aux = image_set(aux_path, "--aux")
    test = image_set(test_path, "--test") if test_path else None
    triggered = image_set(triggered_path, "--triggered") if triggered_path else None
    chosen = post_defenses(cfg)
    try:  # everything that would fail later, before anything is written
        preflight(model, chosen, to_float(aux[0]), aux[1])
        problem = trained_fits_aux(model, to_float(aux[0]), aux[1])
    except AuxMismatch as exc:
        raise ConfigError(f"--aux {aux_path}: {exc}") from None
    if problem is not None:
        raise ConfigError(f"--aux {aux_path}: {problem}")
    for option, path, images in (("--test", test_path, test), ("--triggered", triggered_path, triggered)):
        try:
            if images is not None:
                check_fit(model, to_float(images[0]), images[1], option.lstrip("-"))
        except AuxMismatch as exc:
            raise ConfigError(f"{option} {path}: {exc}") from None
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} already holds results: choose another --out or pass --overwrite")
        clear(out)  # all of it (refused if it is not ours)
    device = pick_device()
    evaluate = _scores(lambda: model_factory(factory), test, triggered, device)
    recorder = DefendRecorder(out, {
        "model": factory, "initial": str(initial_path.resolve()), "final": str(final_path.resolve()),
        "aux": str(aux_path.resolve()), "test": str(test_path.resolve()) if test_path else None,
        "triggered": str(triggered_path.resolve()) if triggered_path else None,
        "defenses": defenses, "overrides": overrides, "no_defense": evaluate(final), "device": str(device),
        "config": {k: v for k, v in cfg.to_run_config().items() if changeable(k) and k != "data-dir"},
    })
    inp = PostTrainingInput(model=model.to(device), initial_state=initial, aux_images=to_float(aux[0]), aux_labels=aux[1])
    started = time.perf_counter()
    try:
        _, reports = apply_defenses(inp, chosen, evaluate, recorder)
    except KeyboardInterrupt:
        end_status(out, "interrupted", "stopped by a signal (Ctrl-C or SIGTERM)")
        raise
    recorder.summary["seconds_total"] = time.perf_counter() - started
    return out, recorder.finish([name for name, report in reports.items() if "error" in report])
