"""`flain defend`: apply post-training defenses to a finished run's saved models.

Reads RUN_DIR's config.json, initial.pt (W0) and final.pt, rebuilds the run's own aux set
and evaluation set, applies the named defenses (the ServerApp's own code path) and writes
RUN_DIR/defended/<label>/: config.json (what was applied), summary.json (the same
`post_defenses` fields as the run's) and <defense>.pt. `flain table RUN_DIR` lists them.
Only post-training settings (`flain-*`) may change; federated pruning needs the clients
and is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks import trigger_scheme
from experiment.config import ConfigError, ExperimentConfig, default_run_config
from experiment.data import aux_size, aux_split, load, split_test, to_float
from experiment.hardware import pick_device
from launch.tables import read_run
from models import build_model
from server.app import apply_post_defenses
from server.checks import check_experiment
from server.evaluation import Evaluator
from server.results import (AUX_FILE, DEFENDED_DIR, check_name, checkpoint_file, checkpoint_rounds, clear,
                            end_status, load_state, mark, model_file, read_aux, save_state, write_summary)
from strategies.post_training import PostTrainingInput

NEEDS_CLIENTS = ("fedpruning",)


AUX_KEYS = ("aux-draw", "aux-size")  # the server's aux set: drawn again when either is given


def changeable(key: str) -> bool:
    """Settings a saved model can be re-defended with: the post-training ones, the aux set, and
    where the data are."""
    return key.startswith("flain-") or key in ("post-defenses", "data-dir", *AUX_KEYS)


def defend_config(run_config: dict[str, Any], defenses: list[str], overrides: dict[str, Any]) -> ExperimentConfig:
    """The run's configuration with other post-training settings (checked)."""
    if not defenses:
        raise ConfigError("--post-defenses is empty: name at least one defense")
    for key in overrides:
        if not changeable(key) and key in default_run_config():
            raise ConfigError(f"{key} is a training setting: it cannot change for a finished run "
                              "(only flain-* settings and data-dir can); train again with `flain run`")
    for name in defenses:
        if name in NEEDS_CLIENTS:
            raise ConfigError(f"post-defenses={name!r} asks the clients for their activation rankings in an "
                              "extra federated round: it cannot run on a saved model; run it with "
                              f"`flain run --set post-defenses={name}`")
    base = {k: v for k, v in run_config.items() if k in default_run_config() and k != "run-dir"}
    cfg = ExperimentConfig.from_run_config(base | overrides | {"post-defenses": ",".join(defenses)})
    check_experiment(cfg)
    return cfg


def aux_indices(run_dir: Path, run_config: dict[str, Any], cfg: ExperimentConfig, labels: np.ndarray,
                overrides: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The aux indices in the test split, and where they came from: drawn as `aux-draw` and
    `aux-size` say when either is overridden, else the run's own."""
    test_size = len(labels)
    if any(key in overrides for key in AUX_KEYS):
        return aux_split(cfg, labels)[0], f"aux-draw={cfg.aux_draw}, aux-size={aux_size(cfg)}"
    if (run_dir / AUX_FILE).is_file():
        return read_aux(run_dir / AUX_FILE, test_size), AUX_FILE
    size = aux_size(cfg)
    if "aux-size" in run_config.get("resolved", {}):  # runs of the SeedSequence code, before aux.npy
        return split_test(test_size, size, cfg.seed)[0], "seeds.rng(seed, 'aux-split')"
    # runs of the first releases drew the split with np.random.default_rng(seed)
    return np.sort(np.random.default_rng(cfg.seed).permutation(test_size)[:size]), "np.random.default_rng(seed)"


class DefendRecorder:
    """RUN_DIR/defended/<label>/: summary.json and the defended models."""

    def __init__(self, out: Path, info: dict[str, Any]) -> None:
        self.dir = out
        mark(self.dir, "defended")
        self.summary: dict[str, Any] = {"status": "running", **info, "post_defenses": {}}
        self._write()

    def save_model(self, name: str, state: dict[str, torch.Tensor]) -> Path:
        return save_state(self.dir / f"{name}.pt", state)

    def post_defense(self, name: str, result: dict[str, Any]) -> None:
        self.summary["post_defenses"][name] = result
        self._write()

    def finish(self, failed: list[str]) -> dict[str, Any]:
        self.summary.update(status="defense-failed" if failed else "completed", failed_defenses=failed)
        self._write()
        return self.summary

    def _write(self) -> None:
        write_summary(self.dir, self.summary)


def defend(run_dir: Path, defenses: list[str], overrides: dict[str, Any], label: str | None,
           overwrite: bool = False, rnd: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Apply `defenses` to RUN_DIR's final model, or to its checkpoint of round `rnd`;
    (output directory, its summary)."""
    run_config, summary = read_run(run_dir)
    cfg = defend_config(run_config, defenses, overrides)
    trained = "final"
    if rnd is not None:
        saved = checkpoint_rounds(run_dir)
        if rnd not in saved:
            raise ConfigError(f"{run_dir} has no checkpoint of round {rnd}: it saved rounds {saved or 'none'} "
                              "(train with --set checkpoint-every=K)")
        trained = f"round-{rnd}"
    if label is None:
        label = ("+".join(defenses) + "".join(f",{k}={v}" for k, v in sorted(overrides.items()))).replace("/", "_")
        label += f"@{trained}" if rnd is not None else ""
    out = run_dir / DEFENDED_DIR / check_name(label)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} already holds results: choose another --name or pass --overwrite")
        clear(out)  # all of it (refused if it is not ours)
    for name in ("initial", "final") if rnd is None else ("initial",):  # a checkpoint needs no finished run
        if not model_file(run_dir, name).is_file():
            raise ConfigError(f"{run_dir} has no {name}.pt: the run did not finish training")

    device = pick_device()
    images, labels = load(cfg.dataset, cfg.data_dir, train=False)
    aux_idx, source = aux_indices(run_dir, run_config, cfg, labels.numpy(), overrides)
    eval_mask = np.ones(len(labels), dtype=bool)
    eval_mask[aux_idx] = False
    evaluator = Evaluator(build_model(cfg.dataset, cfg.network).to(device), images[eval_mask], labels[eval_mask],
                          trigger_scheme(cfg).full, cfg.source_label, cfg.target_label)
    model = build_model(cfg.dataset, cfg.network).to(device)
    like = model.state_dict()
    initial = load_state(model_file(run_dir, "initial"), like, device)
    final = load_state(checkpoint_file(run_dir, rnd) if rnd is not None else model_file(run_dir, "final"), like, device)
    model.load_state_dict(final)
    check = evaluator(final)  # the run's own no-Defense numbers, re-measured on the same images
    recorder = DefendRecorder(out, {
        "run": str(run_dir.resolve()), "model": trained, "defenses": defenses, "overrides": overrides,
        "aux_source": source,
        "no_defense": check, "device": str(device),
        "config": {k: v for k, v in cfg.to_run_config().items() if changeable(k) or k == "seed"},
    })
    inp = PostTrainingInput(model=model, initial_state=initial, aux_images=to_float(images[aux_idx]),
                            aux_labels=labels[aux_idx])
    started = time.perf_counter()
    try:
        failed = apply_post_defenses(cfg, inp, evaluator, recorder)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (launch.cli): the results so far stay, marked
        end_status(out, "interrupted", "stopped by a signal (Ctrl-C or SIGTERM)")
        raise
    recorder.summary["seconds_total"] = time.perf_counter() - started
    return out, recorder.finish(failed)
