"""The run directory: config.json, rounds.csv, models (*.pt), summary.json, plot.png.

summary.json's `status`: running -> completed | defense-failed (training finished, a
post-training defense raised: `failed_defenses` names it) | failed (`error` says why)."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# seconds: the round's wall time, from the end of the previous round's evaluation to the end of
# its own (training, aggregation, central evaluation); eval_seconds: that evaluation alone.
# Round 0 is the initial model's evaluation only.
ROUNDS_HEADER = ["round", "acc", "asr", "seconds", "eval_seconds"]
AUX_FILE = "aux.npy"


class RunRecorder:
    """Writes one run's artifacts as they happen (a crash still leaves the rounds)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], extra: dict[str, Any]) -> None:
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.rounds: list[dict[str, float]] = []
        self.summary: dict[str, Any] = {"status": "running", **extra, "post_defenses": {}}
        (self.dir / "config.json").write_text(json.dumps({**config, **extra}, indent=2) + "\n")
        with (self.dir / "rounds.csv").open("w", newline="") as f:
            csv.writer(f).writerow(ROUNDS_HEADER)
        self._write_summary()

    def round(self, rnd: int, acc: float, asr: float, seconds: float, eval_seconds: float) -> None:
        row = {"round": rnd, "acc": acc, "asr": asr, "seconds": seconds, "eval_seconds": eval_seconds}
        self.rounds.append(row)
        with (self.dir / "rounds.csv").open("a", newline="") as f:
            csv.writer(f).writerow([rnd, f"{acc:.6f}", f"{asr:.6f}", f"{seconds:.3f}", f"{eval_seconds:.3f}"])
        self.summary["final"] = {"acc": acc, "asr": asr, "round": rnd}
        self._write_summary()

    def save_model(self, name: str, state: dict[str, torch.Tensor]) -> Path:
        return save_state(self.dir / f"{name}.pt", state)

    def save_aux(self, indices: np.ndarray) -> Path:
        """The aux set's indices in the test split (the rest is the evaluation set)."""
        path = self.dir / AUX_FILE
        np.save(path, np.asarray(indices, dtype=np.int64))
        return path

    def post_defense(self, name: str, result: dict[str, Any]) -> None:
        self.summary["post_defenses"][name] = result
        self._write_summary()

    def finish(self, client_failures: list[dict[str, Any]], failed_defenses: list[str],
               attack_log: list[dict[str, Any]] = ()) -> dict[str, Any]:
        """Training completed; `defense-failed` if a post-training defense raised.
        `attack_log`: what each malicious reply reported (round, node, update norms...)."""
        self.summary.update(client_failures=client_failures, failed_defenses=failed_defenses,
                            attack_log=list(attack_log))
        self.summary["status"] = "defense-failed" if failed_defenses else "completed"
        self.summary["seconds_total"] = time.perf_counter() - self.started
        self._write_summary()
        plot(self.rounds, self.summary["post_defenses"], self.dir / "plot.png")
        return self.summary

    def fail(self, error: str) -> None:
        self.summary.update(status="failed", error=error)
        self._write_summary()

    def _write_summary(self) -> None:
        write_summary(self.dir, self.summary)


def save_state(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """A state_dict on the CPU (loadable anywhere) at `path`."""
    torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
    return path


def write_summary(folder: Path, summary: dict[str, Any]) -> None:
    """folder/summary.json, replaced atomically: readers never see half a file."""
    tmp = folder / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(folder / "summary.json")


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
