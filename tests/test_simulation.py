"""Integration: the real Flower app in simulation (Ray), small real Fashion-MNIST subset.

Needs Fashion-MNIST in the project's data directory (`make setup` puts it there)."""

import csv
import json
from pathlib import Path

import pytest
import torch

from launch.superlink import SOURCE_ROOT as PROJECT_ROOT

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


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, flain_cli):
    run_dir = tmp_path_factory.mktemp("sim") / "small"
    proc = flain_cli(
        "run", "--set", "num-clients=3", "--set", "num-rounds=2", "--set", "train-fraction=0.05",
        "--set", "mcr=0.34", "--set", "post-defenses='flain,pruning,fedpruning'",
        "--set", "fedpruning-finetune-rounds=1",
        "--set", f"run-dir='{run_dir}'", "--set", f"data-dir='{DATA}'",
    )
    return proc, run_dir


def test_run_succeeds_and_prints_table(small_run):
    proc, _ = small_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[flain] round 2/2" in proc.stdout
    assert "no-Defense" in proc.stdout and "flain" in proc.stdout.split("no-Defense")[-1]


def test_artifacts(small_run):
    _, run_dir = small_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "rounds.csv", "summary.json", "initial.pt", "final.pt", "flain.pt",
            "pruning.pt", "fedpruning.pt", "plot.png"} <= names

    config = json.loads((run_dir / "config.json").read_text())
    assert config["num-clients"] == 3 and config["seed"] == 42 and len(config["malicious_clients"]) == 1
    assert config["aux-size"] == 200 and config["resolved"]["min-clients"] == 2 and config["resolved"]["rlr-theta"] == 2

    rows = list(csv.DictReader((run_dir / "rounds.csv").open()))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0.0 <= float(r["acc"]) <= 1.0 and 0.0 <= float(r["asr"]) <= 1.0
    assert float(rows[2]["acc"]) > float(rows[0]["acc"])  # it learned something

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["final"]["acc"] == pytest.approx(float(rows[-1]["acc"]), abs=1e-6)
    flain = summary["post_defenses"]["flain"]
    for key in ("acc", "asr", "seconds", "threshold", "flipped", "aux_acc_before", "aux_acc_after"):
        assert key in flain, key
    assert 0 <= flain["acc"] <= 1 and 0 <= flain["asr"] <= 1 and flain["flipped"] >= 1

    pruning, fedpruning = summary["post_defenses"]["pruning"], summary["post_defenses"]["fedpruning"]
    assert pruning["pruned"] >= 1 and "error" not in fedpruning
    assert fedpruning["clients"] == 3 and fedpruning["finetune_rounds"] == 1  # the extra Flower rounds ran

    initial, final, defended = (torch.load(run_dir / f"{n}.pt") for n in ("initial", "final", "flain"))
    assert set(initial) == set(final) == set(defended)
    assert not torch.equal(initial["fc1.weight"], final["fc1.weight"])
    for k in final:  # FLAIN changes tau's weight only
        assert torch.equal(final[k], defended[k]) == (k != "fc1.weight"), k
    pruned = torch.load(run_dir / "pruning.pt")["fc1.weight"]
    assert int((pruned == 0).all(0).sum()) == pruning["pruned"]  # whole input columns zeroed
    tuned = torch.load(run_dir / "fedpruning.pt")
    assert int((tuned["fc1.weight"] == 0).all(0).sum()) >= fedpruning["pruned"]  # still pruned after fine-tuning
    assert not torch.equal(tuned["fc2.weight"], final["fc2.weight"])  # fine-tuning trained the rest


def test_no_process_left_behind(small_run):
    assert _orphans() == set()


def test_failed_run_exits_nonzero(tmp_path, monkeypatch, capsys):
    """A run that fails inside the ServerApp (a bad value slipped past the CLI) must
    make `flain run` exit non-zero, unlike `flwr run --stream`."""
    from experiment import cli
    from experiment.config import ExperimentConfig

    original = ExperimentConfig.to_run_config
    monkeypatch.setattr(ExperimentConfig, "to_run_config", lambda self: original(self) | {"mcr": 5.0})
    code = cli.main(["run", "--set", "num-clients=2", "--set", "num-rounds=1",
                     "--set", f"run-dir='{tmp_path / 'r'}'", "--set", f"data-dir='{DATA}'"])
    assert code == 1
    assert "finished:failed" in capsys.readouterr().err
