"""The run directory, its one owner: .flain-run (the marker), config.json, rounds.csv,
aux.npy, models (*.pt), summary.json, plot.png, defended/ (`flain defend`'s results).

Every file is written atomically (a temporary name in the same directory, then a rename), so
a crash or a full disk leaves the old file or the new one, never half of one. Files read back
are checked and a bad one is named in one line (RunFileError).

summary.json's `status`: running -> completed | defense-failed (training finished, a
post-training defense raised: `failed_defenses` names it) | failed (`error` says why) |
interrupted (stopped by a signal; the launcher writes it when the run's processes could not).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from server.tracking import NoTracker, Tracker

# seconds: the round's wall time, from the end of the previous round's evaluation to the end of
# its own (training, aggregation, central evaluation); eval_seconds: that evaluation alone.
# Round 0 is the initial model's evaluation only.
ROUNDS_HEADER = ["round", "acc", "asr", "seconds", "eval_seconds"]
MARKER = ".flain-run"  # what makes a directory one of ours: `--overwrite` deletes nothing else
CONFIG_FILE, ROUNDS_FILE, SUMMARY_FILE, AUX_FILE, PLOT_FILE = "config.json", "rounds.csv", "summary.json", "aux.npy", "plot.png"
DEFENDED_DIR = "defended"
TRACKING_DIR = "tensorboard"  # tracker=tensorboard's event files
CHECKPOINT_DIR = "checkpoints"  # checkpoints/round-R.pt: the global model after round R (checkpoint-every)
ENDED = ("completed", "defense-failed", "failed", "interrupted")


class RunFileError(ValueError):
    """A file of a run directory cannot be used (message: one line naming it and why)."""


def check_name(name: str, what: str = "--name") -> str:
    """`name` if it is one safe path component: not empty, no `/` or `\\`, not `.` or `..`,
    no control characters, at most 200 bytes in UTF-8 (file systems count bytes; RunFileError otherwise)."""
    bad = (not name or name in (".", "..") or "/" in name or "\\" in name or len(name.encode("utf-8", "replace")) > 200
           or any(ord(c) < 32 or ord(c) == 127 for c in name) or name != name.strip())
    if bad:
        raise RunFileError(f"{what} {name!r} is not allowed: one directory name, without '/', '\\', "
                           "control characters or surrounding spaces, not '.' or '..', at most 200 bytes")
    return name


def model_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pt"


def checkpoint_file(run_dir: Path, rnd: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"round-{rnd}.pt"


def resume_file(run_dir: Path, rnd: int) -> Path:
    """What the strategy kept after round R (checkpoint-every), beside that round's model."""
    return run_dir / CHECKPOINT_DIR / f"round-{rnd}.state.pt"


def checkpoint_rounds(run_dir: Path) -> list[int]:
    """The rounds a run saved checkpoints of, ascending."""
    found = []
    for path in (run_dir / CHECKPOINT_DIR).glob("round-*.pt"):
        suffix = path.stem.removeprefix("round-")
        if suffix.isdigit():
            found.append(int(suffix))
    return sorted(found)


def is_run_dir(path: Path) -> bool:
    """`path` holds a run (or `flain defend` results) written by this project."""
    return (path / MARKER).is_file()


# ---- atomic writes -------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """`write(file)` into a temporary file beside `path`, flushed to disk, then renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def _legacy_defended(path: Path) -> bool:
    """`flain defend` results from before the marker: a summary.json and models, nothing else."""
    names = [p.name for p in path.iterdir()]
    return SUMMARY_FILE in names and all(p.is_file() and (p.name == SUMMARY_FILE or p.suffix == ".pt")
                                         for p in path.iterdir())


def _legacy_run(path: Path) -> bool:
    """A run from before the marker (e.g. the reproduction's committed runs): config.json and a
    summary.json of ours, and nothing but the files and folders a run writes."""
    known_files = {CONFIG_FILE, ROUNDS_FILE, SUMMARY_FILE, AUX_FILE, PLOT_FILE}
    known_dirs = {DEFENDED_DIR, CHECKPOINT_DIR, TRACKING_DIR}
    for p in path.iterdir():
        if not ((p.is_file() and (p.name in known_files or p.suffix == ".pt")) or (p.is_dir() and p.name in known_dirs)):
            return False
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text())
        json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and "status" in summary


def ours(path: Path) -> bool:
    """`path` holds a run or `flain defend` results of this project (marked, or from before the marker)."""
    return is_run_dir(path) or _legacy_run(path) or (path.parent.name == DEFENDED_DIR and _legacy_defended(path))


def clear(run_dir: Path) -> None:
    """Delete an earlier run (or `flain defend` result) in `run_dir`, all of it, for
    --overwrite; a directory that is not ours is refused, never touched."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return
    if not ours(run_dir):
        raise RunFileError(f"{run_dir} holds files that are not a flain run (no {MARKER}): "
                           "refusing to delete them; choose another directory")
    import shutil

    shutil.rmtree(run_dir)


def mark(run_dir: Path, kind: str) -> None:
    """Make `run_dir` and its marker (`kind`: run or defended)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_text(run_dir / MARKER, json.dumps({"kind": kind}) + "\n")


class RunRecorder:
    """Writes one run's artifacts as they happen (a crash still leaves the rounds)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], extra: dict[str, Any],
                 tracker: Tracker | None = None) -> None:
        self.dir = run_dir
        self.tracker = tracker or NoTracker()
        mark(self.dir, "run")
        self.started = time.perf_counter()
        self.rounds: list[dict[str, float]] = []
        self.summary: dict[str, Any] = {"status": "running", **extra, "post_defenses": {}}
        atomic_text(self.dir / CONFIG_FILE, json.dumps({**config, **extra}, indent=2) + "\n")
        self._write_rounds()
        self._write_summary()

    def round(self, rnd: int, acc: float, asr: float, seconds: float, eval_seconds: float) -> None:
        row = {"round": rnd, "acc": acc, "asr": asr, "seconds": seconds, "eval_seconds": eval_seconds}
        self.rounds.append(row)
        self._write_rounds()
        self.summary["final"] = {"acc": acc, "asr": asr, "round": rnd}
        self._write_summary()
        self.tracker.round(rnd, acc, asr, seconds)

    def _write_rounds(self) -> None:  # rewritten whole each round: small, and atomic
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(ROUNDS_HEADER)
        for r in self.rounds:
            writer.writerow([r["round"], f"{r['acc']:.6f}", f"{r['asr']:.6f}", f"{r['seconds']:.3f}",
                             f"{r['eval_seconds']:.3f}"])
        atomic_text(self.dir / ROUNDS_FILE, out.getvalue())

    def save_model(self, name: str, state: dict[str, torch.Tensor]) -> Path:
        return save_state(model_file(self.dir, name), state)

    def save_checkpoint(self, rnd: int, state: dict[str, torch.Tensor], kept: dict[str, Any] | None = None) -> Path:
        """The global model after round `rnd`, and (`kept`) what the strategy needs to go on
        from there (strategies/resume.py), written after the model: a resume point has both."""
        path = checkpoint_file(self.dir, rnd)
        path.parent.mkdir(exist_ok=True)
        save_state(path, state)
        if kept is not None:
            atomic_write(resume_file(self.dir, rnd), lambda f: torch.save({"round": rnd, "strategy": kept}, f))
            for older in checkpoint_rounds(self.dir):  # only the newest is ever resumed from (FoolsGold's
                if older < rnd:  # histories make each one as large as a model per client)
                    resume_file(self.dir, older).unlink(missing_ok=True)
        return path

    @classmethod
    def resume(cls, run_dir: Path, rnd: int, tracker: Tracker | None = None) -> RunRecorder:
        """Go on writing the run in `run_dir` after round `rnd`: its config, aux set and initial
        model stay; the rounds after `rnd`, the final model's results and the defenses' go."""
        self = cls.__new__(cls)
        self.dir, self.tracker, self.started = run_dir, tracker or NoTracker(), time.perf_counter()
        run = RunDir(run_dir)
        self.rounds = [r for r in run.rounds() if r["round"] <= rnd]
        old = run.summary()
        keep = {k: v for k, v in old.items() if k not in ("status", "error", "final", "post_defenses", "client_failures",
                                                          "failed_defenses", "attack_log", "defense_log",
                                                          "participation", "seconds_total")}
        last = self.rounds[-1] if self.rounds else None
        self.summary = {**keep, "status": "running", "post_defenses": {},
                        "resumed": [*old.get("resumed", []), {"after_round": rnd, "was": old.get("status")}]}
        if last is not None:
            self.summary["final"] = {"acc": last["acc"], "asr": last["asr"], "round": rnd}
        self._write_rounds()
        self._write_summary()
        return self

    def save_aux(self, indices: np.ndarray) -> Path:
        """The aux set's indices in the test split (the rest is the evaluation set)."""
        return atomic_write(self.dir / AUX_FILE, lambda f: np.save(f, np.asarray(indices, dtype=np.int64)))

    def post_defense(self, name: str, result: dict[str, Any]) -> None:
        self.summary["post_defenses"][name] = result
        self._write_summary()
        self.tracker.defense(name, result)

    def finish(self, client_failures: list[dict[str, Any]], failed_defenses: list[str],
               attack_log: list[dict[str, Any]] = (), defense_log: list[dict[str, Any]] = (),
               participation: list[dict[str, Any]] = ()) -> dict[str, Any]:
        """Training completed; `defense-failed` if a post-training defense raised.
        `attack_log`: what each malicious reply reported (round, node, update norms...);
        `defense_log`: what the aggregation rule did each round (admitted, weights, clip factors);
        `participation`: with clients-per-round, the partitions each round sampled."""
        self.summary.update(client_failures=client_failures, failed_defenses=failed_defenses,
                            attack_log=list(attack_log), defense_log=list(defense_log))
        if participation:
            self.summary["participation"] = list(participation)
        self.summary["status"] = "defense-failed" if failed_defenses else "completed"
        self.summary["seconds_total"] = time.perf_counter() - self.started
        self._write_summary()
        self.tracker.close()
        plot(self.rounds, self.summary["post_defenses"], self.dir / PLOT_FILE)
        return self.summary

    def fail(self, error: str) -> None:
        self.summary.update(status="failed", error=error)
        self._write_summary()
        self.tracker.close()

    def _write_summary(self) -> None:
        write_summary(self.dir, self.summary)


class DefendRecorder:
    """RUN_DIR/defended/<label>/: summary.json and the defended models."""

    def __init__(self, out: Path, info: dict[str, Any]) -> None:
        self.dir = out
        mark(self.dir, "defended")
        self.summary: dict[str, Any] = {"status": "running", **info, "post_defenses": {}}
        self._write()

    def save_model(self, name: str, state: dict[str, torch.Tensor]) -> Path:
        return save_state(model_file(self.dir, name), state)

    def post_defense(self, name: str, result: dict[str, Any]) -> None:
        self.summary["post_defenses"][name] = result
        self._write()

    def finish(self, failed: list[str]) -> dict[str, Any]:
        self.summary.update(status="defense-failed" if failed else "completed", failed_defenses=failed)
        self._write()
        return self.summary

    def _write(self) -> None:
        write_summary(self.dir, self.summary)


def save_state(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A state_dict on the CPU (loadable anywhere) at `path`."""
    return atomic_write(path, lambda f: torch.save({k: v.detach().cpu() for k, v in state.items()}, f))


def _json_safe(value: Any) -> Any:
    """NaN and infinity become null: JSON has no such numbers (json.dumps would write NaN)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """folder/summary.json, replaced atomically: readers never see half a file; valid JSON
    (no NaN)."""
    atomic_text(folder / SUMMARY_FILE, json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n")


def end_status(run_dir: Path, status: str, error: str, over: tuple[str, ...] = ("running",)) -> None:
    """A run whose processes were stopped before they could say how it ended: where
    summary.json says one of `over` (`running`; also `failed` when the launcher knows it
    stopped the run itself, and the ServerApp saw only its own termination), say `status`
    (interrupted or failed) and why; what the ServerApp said stays as `server_error`."""
    path = run_dir / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(summary, dict) and summary.get("status") in over:
        earlier = {"server_error": summary["error"]} if "error" in summary else {}
        try:
            write_summary(run_dir, summary | earlier | {"status": status, "error": error})
        except OSError:  # a full disk: the old summary stays whole; the command's exit code tells
            pass


# ---- reading back ---------------------------------------------------------------------------
def read_json(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object file with at least the `required` keys; RunFileError (one line) otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunFileError(f"{path}: not readable JSON ({exc})") from None
    except RecursionError:  # nesting deeper than the decoder's stack: nothing we wrote
        raise RunFileError(f"{path}: not readable JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: expected a JSON object, found {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise RunFileError(f"{path}: not one of ours (no {', '.join(missing)})")
    return data


def load_state(path: Path, like: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A saved state_dict with exactly `like`'s keys, shapes and dtypes (a model's own
    state_dict); only tensors are unpickled (weights_only, whatever the environment says)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - truncated, not a checkpoint, or a pickle that is not just tensors
        first = (str(exc).splitlines() or [""])[0][:200]
        raise RunFileError(f"{path}: not a readable model file ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunFileError(f"{path}: not a state_dict of tensors")
    if set(state) != set(like):
        missing, extra = sorted(set(like) - set(state)), sorted(set(state) - set(like))
        raise RunFileError(f"{path}: does not fit the run's model (missing {missing[:5]}, unexpected {extra[:5]})")
    for key, value in state.items():
        if value.shape != like[key].shape or value.dtype != like[key].dtype:
            raise RunFileError(f"{path}: {key} is {value.dtype} {tuple(value.shape)}, the run's model has "
                               f"{like[key].dtype} {tuple(like[key].shape)}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise RunFileError(f"{path}: {key} holds NaN or Inf")
    return state


def read_aux(path: Path, test_size: int) -> np.ndarray:
    """The aux indices of a run: distinct integers in 0..test_size-1, leaving some to score on."""
    try:
        indices = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RunFileError(f"{path}: not a readable .npy file ({exc})") from None
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or len(indices) == 0:
        raise RunFileError(f"{path}: expected a non-empty 1-D integer array, found {indices.dtype} {indices.shape}")
    if indices.min() < 0 or indices.max() >= test_size or len(np.unique(indices)) != len(indices):
        raise RunFileError(f"{path}: indices must be distinct and within 0..{test_size - 1}")
    if len(indices) >= test_size:
        raise RunFileError(f"{path}: the aux set takes every test image, none is left to score on")
    return np.sort(indices)


class RunDir:
    """One run directory (or one `flain defend` result under its defended/): the only code
    outside this module that needs a file of it asks here, by meaning, never by file name."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ---- where things are ----
    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def rounds_file(self) -> Path:
        return self.path / ROUNDS_FILE

    @property
    def aux_file(self) -> Path:
        return self.path / AUX_FILE

    def model_file(self, name: str) -> Path:
        """initial, final, or a post-training defense's name."""
        return model_file(self.path, name)

    @property
    def tracking_dir(self) -> Path:
        """tracker=tensorboard's event files."""
        return self.path / TRACKING_DIR

    def checkpoint_file(self, rnd: int) -> Path:
        return checkpoint_file(self.path, rnd)

    def checkpoint_rounds(self) -> list[int]:
        return checkpoint_rounds(self.path)

    def resume_rounds(self) -> list[int]:
        """Rounds a run can be resumed after: their model and their strategy state were saved."""
        return [r for r in self.checkpoint_rounds() if resume_file(self.path, r).is_file()]

    def resume_point(self, rounds: int) -> int:
        """The round an unfinished run of `rounds` rounds goes on after: its last round whose
        model and strategy state were saved (RunFileError, saying why, if there is none)."""
        status = self.status()
        if status in ("completed", "defense-failed", "missing"):
            why = "it holds no run" if status == "missing" else f"it has finished (status {status!r})"
            raise RunFileError(f"{self.path} cannot be resumed: {why}")
        points = [r for r in self.resume_rounds() if r <= rounds]
        if not points:
            raise RunFileError(f"{self.path} cannot be resumed: it saved no checkpoint with its strategy state "
                               "(only a run with checkpoint-every > 0 can be resumed)")
        return points[-1]

    def resume_state(self, rnd: int) -> dict[str, Any]:
        """What the strategy kept after round `rnd` (RunFileError if unreadable or of another round)."""
        path = resume_file(self.path, rnd)
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, it cannot be resumed from
            raise RunFileError(f"{path}: not a readable strategy state ({type(exc).__name__}: {exc})") from None
        if not isinstance(saved, dict) or saved.get("round") != rnd or not isinstance(saved.get("strategy"), dict):
            raise RunFileError(f"{path}: not the strategy state of round {rnd}")
        return saved["strategy"]

    def defended(self, label: str) -> RunDir:
        """`flain defend --name LABEL`'s result directory (label checked as one path component)."""
        return RunDir(self.path / DEFENDED_DIR / check_name(label))

    def defended_results(self) -> list[RunDir]:
        """Every `flain defend` result that holds a summary, by label."""
        folder = self.path / DEFENDED_DIR
        found = sorted(folder.iterdir()) if folder.is_dir() else []
        return [RunDir(p) for p in found if (p / SUMMARY_FILE).is_file()]

    # ---- what is in them ----
    def exists(self) -> bool:
        return self.summary_file.is_file()

    def is_ours(self) -> bool:
        return is_run_dir(self.path)

    def summary(self, required: tuple[str, ...] = ()) -> dict[str, Any]:
        return read_json(self.summary_file, required)

    def config(self, required: tuple[str, ...] = ()) -> dict[str, Any]:
        return read_json(self.config_file, required)

    def status(self) -> str:
        """summary.json's status; `missing` where there is no readable summary."""
        try:
            return str(self.summary().get("status", "unknown"))
        except RunFileError:
            return "missing"

    def finished(self) -> bool:
        """Training completed (a failed post-training defense does not undo it)."""
        return self.status() in ("completed", "defense-failed")

    def rounds(self) -> list[dict[str, float]]:
        """rounds.csv as numbers, one dict per round (RunFileError if unreadable)."""
        try:
            with self.rounds_file.open() as f:
                rows = list(csv.DictReader(f))
            return [{k: (int(v) if k == "round" else float(v)) for k, v in row.items()} for row in rows]
        except (OSError, ValueError, TypeError) as exc:
            raise RunFileError(f"{self.rounds_file}: not a readable rounds file ({exc})") from None

    def aux(self, test_size: int) -> np.ndarray:
        return read_aux(self.aux_file, test_size)

    def load_model(self, name: str, like: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                   rnd: int | None = None) -> dict[str, torch.Tensor]:
        """A saved model checked against `like` (`rnd`: the checkpoint of that round instead)."""
        return load_state(self.checkpoint_file(rnd) if rnd is not None else self.model_file(name), like, device)


def plot(rounds: list[dict[str, float]], defenses: dict[str, dict[str, Any]], path: Path) -> None:
    """ACC and ASR per round; each post-training defense as a marked point after the last round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["acc"] for r in rounds], "-o", color="tab:blue", ms=3, label="ACC")
    ax.plot(xs, [r["asr"] for r in rounds], "-o", color="tab:red", ms=3, label="ASR")
    last = xs[-1] if xs else 0
    markers = "*Ds^vP"
    defended = {name: res for name, res in defenses.items() if "acc" in res}
    for i, (name, res) in enumerate(defended.items()):
        x, m = last + 0.5 * (i + 1), markers[i % len(markers)]
        ax.plot([x], [res["acc"]], m, color="tab:blue", ms=11, mec="k")
        ax.plot([x], [res["asr"]], m, color="tab:red", ms=11, mec="k")
        ax.annotate(name, (x, max(res["acc"], res["asr"])), textcoords="offset points",
                    xytext=(0, 8), ha="center", fontsize=8)
    ax.set(xlabel="round (markers after the last round: post-training defenses)",
           ylabel="rate", ylim=(-0.02, 1.05), title="Clean accuracy and attack success rate")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
