"""`flain defend`: apply post-training defenses to a finished run's saved models.

Reads RUN_DIR's config.json, initial.pt (W0) and final.pt, rebuilds the run's own aux set
and evaluation set, applies the named defenses (the ServerApp's own code path) and writes
RUN_DIR/defended/<label>/: config.json (what was applied), summary.json (the same
`post_defenses` fields as the run's) and <defense>.pt. `flain table RUN_DIR` lists them.
Only post-training settings (`flain-*`) may change; federated pruning needs the clients
and is refused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from experiment.config import ConfigError, ExperimentConfig, default_run_config
from experiment.data import aux_size, aux_split, load, split_test
from experiment.hardware import pick_device
from launch.tables import read_run
from models import build_model
from strategies import POST_DEFENSES
from server.post_training import apply_post_defenses, make_evaluator, post_training_input
from server.checks import check_experiment
from server.results import DefendRecorder, RunDir, clear, end_status



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
        if name in POST_DEFENSES and POST_DEFENSES[name].needs_clients:
            raise ConfigError(f"post-defenses={name!r} asks the clients for their activation rankings in an "
                              "extra federated round: it cannot run on a saved model; run it with "
                              f"`flain run --set post-defenses={name}`")
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


def defend(run_dir: Path, defenses: list[str], overrides: dict[str, Any], label: str | None,
           overwrite: bool = False, rnd: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Apply `defenses` to RUN_DIR's final model, or to its checkpoint of round `rnd`;
    (output directory, its summary)."""
    run_config, summary = read_run(run_dir)
    run = RunDir(run_dir)
    cfg = defend_config(run_config, defenses, overrides)
    trained = "final"
    if rnd is not None:
        saved = run.checkpoint_rounds()
        if rnd not in saved:
            raise ConfigError(f"{run_dir} has no checkpoint of round {rnd}: it saved rounds {saved or 'none'} "
                              "(train with --set checkpoint-every=K)")
        trained = f"round-{rnd}"
    if label is None:
        label = ("+".join(defenses) + "".join(f",{k}={v}" for k, v in sorted(overrides.items()))).replace("/", "_")
        label += f"@{trained}" if rnd is not None else ""
    out = run.defended(label).path
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} already holds results: choose another --name or pass --overwrite")
        clear(out)  # all of it (refused if it is not ours)
    for name in ("initial", "final") if rnd is None else ("initial",):  # a checkpoint needs no finished run
        if not run.model_file(name).is_file():
            raise ConfigError(f"{run_dir} has no {name}.pt: the run did not finish training")

    device = pick_device()
    images, labels = load(cfg.dataset, cfg.data_dir, train=False)
    aux_idx, source = aux_indices(run, run_config, cfg, labels.numpy(), overrides)
    eval_mask = np.ones(len(labels), dtype=bool)
    eval_mask[aux_idx] = False
    evaluator = make_evaluator(cfg, images[eval_mask], labels[eval_mask], device)
    like = build_model(cfg.dataset, cfg.network).state_dict()
    initial = run.load_model("initial", like, device)
    final = run.load_model("final", like, device, rnd=rnd)
    check = evaluator(final)  # the run's own no-Defense numbers, re-measured on the same images
    recorder = DefendRecorder(out, {
        "run": str(run_dir.resolve()), "model": trained, "defenses": defenses, "overrides": overrides,
        "aux_source": source,
        "no_defense": check, "device": str(device),
        "config": {k: v for k, v in cfg.to_run_config().items() if changeable(k) or k == "seed"},
    })
    inp = post_training_input(cfg, final, initial, images[aux_idx], labels[aux_idx], device)
    started = time.perf_counter()
    try:
        failed = apply_post_defenses(cfg, inp, evaluator, recorder)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (launch.cli): the results so far stay, marked
        end_status(out, "interrupted", "stopped by a signal (Ctrl-C or SIGTERM)")
        raise
    recorder.summary["seconds_total"] = time.perf_counter() - started
    return out, recorder.finish(failed)
