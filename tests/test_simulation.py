"""Integration: the real Flower app in simulation (Ray), small real Fashion-MNIST subset.

Needs Fashion-MNIST in the project's data directory (`make setup` puts it there)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.superlink import SOURCE_ROOT as PROJECT_ROOT
from server.results import ROUNDS_HEADER, RunDir

DATA = PROJECT_ROOT / "data"


def _orphans() -> set[int]:
    """Processes of finished `flain` commands: each command runs everything with its own
    FLWR_HOME in a temporary directory that it deletes at the end; a live process whose
    FLWR_HOME is gone was left behind (other runs going on at the same time are fine)."""
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            for item in environ.read_bytes().split(b"\0"):
                if item.startswith(b"FLWR_HOME=") and b"/flain-" in item and not Path(item[10:].decode()).exists():
                    found.add(int(environ.parent.name))
        except (OSError, ValueError):
            continue
    return found


# Loaded into every Python process of the run (PYTHONPATH): once a module is imported, a patch
# changes it. Pruning.apply breaks, so one real run shows a failed post-training defense end to
# end; partition 0 (a benign client) lies about its example count: infinity in every training
# reply, a billion in the ranking query (federated pruning).
BREAK_PRUNING = """
import importlib.abc, sys

class _Patch(importlib.abc.MetaPathFinder):
    def __init__(self, target, patch):
        self.target, self.patch = target, patch

    def find_spec(self, name, path, target=None):
        if name != self.target:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


def break_pruning(module):
    def broken(self, inp):
        raise RuntimeError("pruning broken on purpose by the test")

    module.Pruning.apply = broken


def lie_about_examples(module):
    real = module.MetricRecord

    def lying(values):
        values = dict(values)
        if values.get("partition-id") == 0:
            values["num-examples"] = float("inf") if "train-loss" in values else 10**9
        return real(values)

    module.MetricRecord = lying


sys.meta_path.insert(0, _Patch("strategies.post_training.pruning", break_pruning))
sys.meta_path.insert(0, _Patch("client.app", lie_about_examples))
"""


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """3 clients, 2 rounds, 5% of the data; FLAIN, Pruning (broken on purpose) and
    federated pruning with one fine-tuning round; partition 0 lies about its example count."""
    tmp = tmp_path_factory.mktemp("sim")
    (tmp / "hook").mkdir()
    (tmp / "hook" / "sitecustomize.py").write_text(BREAK_PRUNING)
    run_dir = tmp / "small"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp / "hook"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli",
         "run", "--set", "num-clients=3", "--set", "num-rounds=2", "--set", "train-fraction=0.05",
         "--set", "mcr=0.34", "--set", "post-defenses='flain,pruning,fedpruning'",
         "--set", "fedpruning-finetune-rounds=1", "--set", "attack='neurotoxin'", "--set", "tracker='tensorboard'",
         "--set", f"run-dir='{run_dir}'", "--set", f"data-dir='{DATA}'"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900, env=env,
    )
    return proc, run_dir


def test_failed_defense_is_reported_with_its_own_exit_code(small_run):
    proc, run_dir = small_run
    assert proc.returncode == 4, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[flain] round 2/2" in proc.stdout
    assert "post-training defense(s) FAILED: pruning" in proc.stderr
    assert "FAILED: RuntimeError: pruning broken on purpose" in proc.stdout  # its row in the table
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "defense-failed" and summary["failed_defenses"] == ["pruning"]
    assert set(summary["post_defenses"]) == {"flain", "pruning", "fedpruning"}
    assert "acc" in summary["post_defenses"]["flain"] and "acc" in summary["post_defenses"]["fedpruning"]
    assert not (run_dir / "pruning.pt").exists() and (run_dir / "flain.pt").exists()


def test_tensorboard_events_are_the_runs_own_numbers(small_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = small_run
    events = EventAccumulator(str(RunDir(run_dir).tracking_dir))
    events.Reload()
    rows = list(csv.DictReader((run_dir / "rounds.csv").open()))
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("round/acc")] == \
        [(int(r["round"]), pytest.approx(float(r["acc"]), abs=1e-6)) for r in rows]
    flain = json.loads((run_dir / "summary.json").read_text())["post_defenses"]["flain"]
    assert events.Scalars("defense/flain/flipped")[0].value == flain["flipped"]
    curve = events.Scalars("search/flain/aux_acc")
    assert [e.step for e in curve] == flain["search_curve"]["flipped"] and len(curve) == flain["evaluations"]


def test_artifacts(small_run):
    _, run_dir = small_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "rounds.csv", "summary.json", "initial.pt", "final.pt", "flain.pt",
            "fedpruning.pt", "plot.png"} <= names

    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-clients"] == 3 and config["seed"] == 42 and len(config["malicious_clients"]) == 1
    resolved = config["resolved"]
    assert resolved["aux-size"] == 200 and resolved["min-clients"] == 2 and resolved["num-malicious"] == 1
    assert resolved["precision"] in ("fp32", "bf16") and resolved["precision-choice"].startswith(("measured", "cached"))

    rows = list(csv.DictReader((run_dir / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert list(rows[0]) == ROUNDS_HEADER  # round, acc, asr, seconds, eval_seconds (timings: benchmarks/speed.py)
    assert float(rows[2]["acc"]) > float(rows[0]["acc"]) + 0.1  # it learned (10 classes: ~0.1 at round 0)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["acc"] == pytest.approx(float(rows[-1]["acc"]), abs=1e-6)
    # the liar (partition 0): refused in round 1 and in the ranking query, named, nothing poisoned
    failures = summary["client_failures"]  # rounds 1, 2, the ranking query, fine-tuning round 3
    assert [(f["round"], f["partition"], f["kind"]) for f in failures] == [(r, 0, "rejected") for r in (1, 2, 2, 3)]
    assert all("num-examples=inf" in failures[i]["reason"] for i in (0, 1, 3))
    assert "ranking query" in failures[2]["reason"] and "num-examples=1000000000" in failures[2]["reason"]
    assert len({f["node"] for f in failures}) == 1
    # Neurotoxin through real Flower: round 1 from its clean gradient, round 2 from the
    # global change it kept in the node's context.state
    log = {e["round"]: e for e in summary["attack_log"]}
    assert len(summary["attack_log"]) >= 2 and log[1]["node"] == log[2]["node"]
    assert (log[1]["attack-direction"], log[2]["attack-direction"]) == (0.0, 1.0)
    assert all(e["masked-share"] == pytest.approx(0.05, abs=0.005) and e["update-norm"] > 0 for e in log.values())
    flain = summary["post_defenses"]["flain"]
    assert flain["inputs"] == 9216 and 1 <= flain["flipped"] < 9216

    fedpruning = summary["post_defenses"]["fedpruning"]
    assert fedpruning["clients"] == 2 and fedpruning["finetune_rounds"] == 1  # the liar's ranking did not count

    initial, final, defended = (torch.load(run_dir / f"{n}.pt", weights_only=True) for n in ("initial", "final", "flain"))
    assert set(initial) == set(final) == set(defended)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    assert not torch.equal(initial["fc1.weight"], final["fc1.weight"])
    for k in final:  # FLAIN changes tau's weight only
        assert torch.equal(final[k], defended[k]) == (k != "fc1.weight"), k
    # each column of the defended fc1 is c (w0 + dW) or c (w0 - dW), with ONE factor c that gives
    # back the trained norm (c is not 1: flipping changes the norm, by 3e-4 on a barely trained
    # model); columns whose dW is zero cannot tell which
    w0, w, got = (m["fc1.weight"].double() for m in (initial, final, defended))
    mirrored = 2 * w0 - w
    fit = lambda target: (got * target).sum(0) / (target * target).sum(0).clamp_min(1e-30)  # noqa: E731
    keep_c, flip_c = fit(w), fit(mirrored)
    flipped = (got - flip_c * mirrored).norm(dim=0) < (got - keep_c * w).norm(dim=0)
    ambiguous = (w == mirrored).all(0)
    c = torch.where(flipped, flip_c, keep_c).median()
    w_star = torch.where(flipped, mirrored, w)
    assert torch.allclose(got, c * w_star, rtol=1e-4, atol=1e-7)  # no column is anything else
    assert (c * torch.linalg.matrix_norm(w_star)).item() == pytest.approx(torch.linalg.matrix_norm(w).item(), rel=1e-6)
    assert int(flipped.sum()) <= flain["flipped"] <= int((flipped | ambiguous).sum())
    tuned = torch.load(run_dir / "fedpruning.pt", weights_only=True)
    assert int((tuned["fc1.weight"] == 0).all(0).sum()) >= fedpruning["pruned"]  # still pruned after fine-tuning
    assert not torch.equal(tuned["fc2.weight"], final["fc2.weight"])  # fine-tuning trained the rest


def test_defend_reapplies_defenses_to_the_saved_models(small_run, capsys):
    """`flain defend` rebuilds the run's aux and evaluation sets from aux.npy: the final model
    scores as in the run, and FLAIN re-applied gives the run's own FLAIN result."""
    from launch.cli import main

    _, run_dir = small_run
    assert main(["defend", str(run_dir), "--post-defenses", "flain,flain-cv"]) == 0
    out = run_dir / "defended" / "flain+flain-cv"
    summary, run = (json.loads((d / "summary.json").read_text()) for d in (out, run_dir))
    assert summary["status"] == "completed" and summary["aux_source"] == "aux.npy"
    assert summary["no_defense"]["acc"] == pytest.approx(run["final"]["acc"], abs=1e-9)
    assert summary["post_defenses"]["flain"]["flipped"] == run["post_defenses"]["flain"]["flipped"]
    assert summary["post_defenses"]["flain"]["acc"] == pytest.approx(run["post_defenses"]["flain"]["acc"], abs=1e-9)
    cv = summary["post_defenses"]["flain-cv"]
    assert 0 <= cv["flipped"] <= cv["inputs"]
    assert (out / "flain-cv.pt").is_file()
    capsys.readouterr()
    assert main(["table", str(run_dir)]) == 0
    assert "| FLAIN-CV [defend flain+flain-cv] |" in capsys.readouterr().out

    for argv, fragment in [
        (["--post-defenses", "flain,flain-cv"], "already holds results"),
        (["--post-defenses", "fedpruning"], "cannot run on a saved model"),
        (["--set", "num-rounds=5"], "num-rounds is a training setting"),
        (["--set", "flain-cv-tol=0"], "flain-cv-tol=0.0 is not allowed"),
    ]:
        assert main(["defend", str(run_dir), *argv]) == 2
        assert fragment in capsys.readouterr().err, fragment


def test_reproduce_adopts_a_finished_training_and_adds_missing_defenses(small_run, tmp_path):
    """A finished run of the same training is reused whatever defenses it ran; the missing
    ones are applied to its saved models, never by training again."""
    import shutil

    from launch import reproduce as rep

    _, run_dir = small_run
    config = json.loads((run_dir / "config.json").read_text())
    keys = set(rep.default_run_config()) - {"run-dir", "data-dir"}
    training = rep.Training("adopted", {k: config[k] for k in keys} | {"post-defenses": "flain,flain-cv,pruning"})
    cfg = rep.resolved(training)
    copy = tmp_path / "runs" / "adopted"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("defended"))
    assert rep.finished(copy, cfg) and not rep.finished(copy, cfg.replace(num_rounds=3))
    assert sorted(rep.complete_defenses(copy, cfg)) == ["flain-cv", "pruning"]  # pruning failed in the run
    merged = rep.results(copy)["post_defenses"]
    assert {"flain", "flain-cv", "pruning"} <= {k for k, v in merged.items() if "acc" in v}
    assert rep.complete_defenses(copy, cfg) == []  # nothing left to add
    own = json.loads((run_dir / "summary.json").read_text())["post_defenses"]
    assert merged["flain"] == own["flain"]  # the run's own FLAIN is kept, not computed again


def test_no_process_left_behind(small_run):
    assert _orphans() == set()


def test_failed_run_exits_nonzero(tmp_path, monkeypatch, capsys):
    """A run that fails inside the ServerApp (a bad value slipped past the CLI) must
    make `flain run` exit non-zero, unlike `flwr run --stream`."""
    from launch import cli, superlink

    original = superlink.write_run_config
    monkeypatch.setattr(superlink, "write_run_config", lambda rc, path: original(rc | {"mcr": 5.0}, path))
    code = cli.main(["run", "--set", "num-clients=2", "--set", "num-rounds=1",
                     "--set", f"run-dir='{tmp_path / 'r'}'", "--set", f"data-dir='{DATA}'"])
    assert code == 1
    assert "finished:failed" in capsys.readouterr().err
