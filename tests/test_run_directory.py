"""The run directory as untrusted ground: names that stay inside it, --overwrite that deletes
only what is ours, writes that are whole or absent, and files read back that are checked and
named in one line when bad."""

import errno
import json
import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from experiment.config import ConfigError, ExperimentConfig
from launch.tables import NotARunDirectory, comparison_rows, markdown_table, read_run
from server.results import (RunFileError, atomic_text, atomic_write, check_name, clear, end_status,
                            load_state, mark, read_aux, read_json, save_state, write_summary)


# ---- names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../../etc/x", "a\\b", "x\ny", "tab\there", " lead",
                                  "trail ", "x" * 201, "bell\x07"])
def test_a_name_is_one_safe_path_component(name):
    with pytest.raises(RunFileError, match="not allowed"):
        check_name(name)


@pytest.mark.parametrize("name", ["fmnist-s42", "my run", "a.b", "..x", "flain+flain-cv,flain-rho=0.01", "é"])
def test_ordinary_names_pass(name):
    assert check_name(name) == name


@pytest.mark.parametrize("argv, fragment", [
    (["run", "--name", "..", "--overwrite"], "--name '..' is not allowed"),
    (["run", "--name", "../../etc/x"], "--name '../../etc/x' is not allowed"),
    (["deploy", "--name", "a/b"], "--name 'a/b' is not allowed"),
])
def test_the_cli_refuses_a_name_that_leaves_runs(flain_cli, argv, fragment):
    out = flain_cli(*argv, "--dry-run")
    assert out.returncode == 2 and fragment in out.stderr and "Traceback" not in out.stderr


# ---- --overwrite --------------------------------------------------------------------------------
def test_overwrite_never_touches_a_directory_that_is_not_a_run(tmp_path, flain_cli):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "my_weights.pt").write_bytes(b"precious")
    (precious / "config.json").write_text('{"mine": true}')
    out = flain_cli("run", "--overwrite", "--set", f"run-dir='{precious}'", "--dry-run")
    assert out.returncode == 2 and "not a flain run" in out.stderr
    assert (precious / "my_weights.pt").read_bytes() == b"precious"
    assert json.loads((precious / "config.json").read_text()) == {"mine": True}
    with pytest.raises(RunFileError, match="not a flain run"):
        clear(precious)
    assert sorted(p.name for p in precious.iterdir()) == ["config.json", "my_weights.pt"]


def test_overwrite_deletes_a_run_of_ours_whole(tmp_path):
    run = tmp_path / "run"
    mark(run, "run")
    (run / "defended" / "old").mkdir(parents=True)
    (run / "defended" / "old" / "summary.json").write_text("{}")
    (run / "final.pt").write_bytes(b"x")
    clear(run)
    assert not run.exists()  # stale defended/ results included


def test_a_run_from_before_the_marker_is_ours_and_a_foreign_file_makes_it_not(tmp_path):
    """The reproduction's committed runs (config.json, rounds.csv, summary.json, defended/) have
    no marker: `flain reproduce` must be able to replace them; one file a run never writes
    makes the directory someone else's."""
    def legacy(name):
        run = tmp_path / name
        (run / "defended" / "reproduce").mkdir(parents=True)
        (run / "config.json").write_text('{"seed": 42}')
        (run / "rounds.csv").write_text("round,acc\n")
        (run / "summary.json").write_text('{"status": "completed"}')
        (run / "defended" / "reproduce" / "summary.json").write_text("{}")
        return run

    clear(legacy("old"))
    assert not (tmp_path / "old").exists()
    foreign = legacy("foreign")
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunFileError, match="not a flain run"):
        clear(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_run_of_ours_needs_overwrite(tmp_path, flain_cli):
    run = tmp_path / "run"
    mark(run, "run")
    write_summary(run, {"status": "completed"})
    out = flain_cli("run", "--set", f"run-dir='{run}'", "--dry-run")
    assert out.returncode == 2 and "already holds a run (status 'completed')" in out.stderr
    assert flain_cli("run", "--overwrite", "--set", f"run-dir='{run}'", "--dry-run").returncode == 0


# ---- atomic writes -----------------------------------------------------------------------------
def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "summary.json"
    atomic_text(target, "old\n")

    def disk_full(f):
        f.write(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, disk_full)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_model_write_that_fails_leaves_the_old_model(tmp_path, monkeypatch):
    path = tmp_path / "final.pt"
    save_state(path, {"w": torch.ones(2)})

    def failing_save(obj, f):
        f.write(b"\x80")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        save_state(path, {"w": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))


def test_a_run_left_running_is_marked_interrupted(tmp_path):
    write_summary(tmp_path, {"status": "running", "final": {"acc": 0.5, "asr": 0.1}})
    end_status(tmp_path, "interrupted", "stopped by a signal")
    summary = read_json(tmp_path / "summary.json")
    assert summary["status"] == "interrupted" and summary["error"] == "stopped by a signal"
    assert summary["final"] == {"acc": 0.5, "asr": 0.1}
    write_summary(tmp_path, {"status": "completed"})
    end_status(tmp_path, "failed", "late")  # an ended run keeps its own status
    assert read_json(tmp_path / "summary.json")["status"] == "completed"
    write_summary(tmp_path, {"status": "failed", "error": "SystemExit: 0"})  # the ServerApp saw its own end
    end_status(tmp_path, "interrupted", "stopped by a signal", over=("running", "failed"))
    summary = read_json(tmp_path / "summary.json")
    assert (summary["status"], summary["server_error"]) == ("interrupted", "SystemExit: 0")


# ---- files read back ------------------------------------------------------------------------------
def _like() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2)).state_dict()


def test_a_good_state_loads(tmp_path):
    save_state(tmp_path / "m.pt", _like())
    state = load_state(tmp_path / "m.pt", _like())
    assert all(torch.equal(state[k], v) for k, v in _like().items())


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "not a readable model file"),  # truncated
    (lambda p: p.write_bytes(b""), "not a readable model file"),
    (lambda p: torch.save({"0.weight": torch.zeros(5, 5), "0.bias": torch.zeros(2)}, p), "0.weight is torch.float32 (5, 5)"),
    (lambda p: torch.save({"0.weight": torch.zeros(2, 3)}, p), "missing ['0.bias']"),
    (lambda p: torch.save({"0.weight": torch.zeros(2, 3, dtype=torch.float64), "0.bias": torch.zeros(2)}, p),
     "torch.float64"),
    (lambda p: torch.save({"0.weight": torch.full((2, 3), math.nan), "0.bias": torch.zeros(2)}, p), "NaN or Inf"),
    (lambda p: torch.save({"0.weight": nn.Linear(3, 2)}, p), "not a readable model file"),  # a module, not tensors
    (lambda p: torch.save([1, 2], p), "not a state_dict of tensors"),
])
def test_a_bad_model_file_is_named_in_one_line(tmp_path, make, fragment):
    path = tmp_path / "final.pt"
    save_state(path, _like())
    make(path)
    with pytest.raises(RunFileError) as caught:
        load_state(path, _like())
    message = str(caught.value)
    assert message.startswith(str(path)) and fragment in message and "\n" not in message


def test_weights_only_is_explicit_whatever_the_environment_says(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD makes torch.load's default unpickle anything: our
    loader still refuses a pickle that is not only tensors."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "final.pt"
    torch.save({"0.weight": torch.zeros(2, 3), "0.bias": torch.zeros(2), "x": Path("/")}, path)
    with pytest.raises(RunFileError, match="not a readable model file"):
        load_state(path, _like())


@pytest.mark.parametrize("array, fragment", [
    (np.array([1.5, 2.0]), "1-D integer array"),
    (np.array([[1, 2]]), "1-D integer array"),
    (np.array([], dtype=np.int64), "non-empty"),
    (np.array([1, 1]), "distinct"),
    (np.array([-1, 2]), "within 0..9"),
    (np.array([3, 10]), "within 0..9"),
    (np.arange(10), "none is left"),
])
def test_a_bad_aux_file_is_named(tmp_path, array, fragment):
    np.save(tmp_path / "aux.npy", array)
    with pytest.raises(RunFileError, match=fragment):
        read_aux(tmp_path / "aux.npy", 10)


def test_a_pickled_aux_file_is_refused(tmp_path):
    np.save(tmp_path / "aux.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RunFileError, match="aux.npy: not a readable .npy file"):
        read_aux(tmp_path / "aux.npy", 10)


@pytest.mark.parametrize("summary, fragment", [
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "not readable JSON"),
    ('{"status": "completed", "final": {"acc": "high", "asr": 0}}', "final ACC/ASR are not numbers in"),
    ('{"status": "completed", "final": {"acc": NaN, "asr": 0}}', "final ACC/ASR are not numbers in"),
    ('{"status": "running"}', "holds no finished training"),
    ("[" * 100_000, "nested too deeply"),
    ('{"status": "completed", "final": {"acc": 0.9, "asr": 0.1}, "post_defenses": [1]}',
     "post_defenses is a list"),
    ('{"status": "completed", "final": {"acc": 0.9, "asr": 0.1}, "post_defenses": {"flain": {"acc": 0.5}}}',
     "are not results of ours"),
    ('{"status": "completed", "final": {"acc": 0.9, "asr": 0.1}, "post_defenses": {"| x\\n| y": {"acc": 0.5, "asr": 0}}}',
     "are not results of ours"),
    ('{"status": "completed", "final": {"acc": 0.9, "asr": 0.1}, "post_defenses": {"flain": 3}}',
     "are not results of ours"),
    ('{"final": {"acc": 0.9, "asr": 0.1}}', "no status"),
])
def test_flain_table_on_a_summary_that_is_not_ours_is_one_line(tmp_path, flain_cli, summary, fragment):
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "fmnist", "aggregation": "fedavg"}))
    (tmp_path / "summary.json").write_text(summary)
    with pytest.raises(NotARunDirectory, match=fragment):
        read_run(tmp_path)
    out = flain_cli("table", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _finished_run(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"dataset": "fmnist", "aggregation": "fedavg"}))
    (path / "summary.json").write_text(json.dumps({"status": "completed", "final": {"acc": 0.9, "asr": 0.8},
                                                   "post_defenses": {"flain": {"acc": 0.85, "asr": 0.0}}}))
    return path


@pytest.mark.parametrize("config, fragment", [
    ({"dataset": "fmnist", "aggregation": ["x"]}, "aggregation not a name of ours"),
    ({"dataset": 1, "aggregation": "fedavg"}, "dataset not a name of ours"),
])
def test_a_config_that_is_not_ours_is_refused_by_name(tmp_path, config, fragment):
    _finished_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotARunDirectory, match=fragment):
        comparison_rows([tmp_path])


@pytest.mark.parametrize("defended, fragment", [
    ({"post_defenses": {"flain": {"acc": "a", "asr": 2}}}, "are not results of ours"),
    ({"post_defenses": [1]}, "post_defenses is a list"),
    ({"post_defenses": {"flain": {"acc": 0.5}}}, "are not results of ours"),
    ({"nothing": 1}, "no post_defenses"),
])
def test_a_corrupt_flain_defend_result_is_refused_by_name(tmp_path, defended, fragment):
    run = _finished_run(tmp_path / "run")
    (run / "defended" / "x").mkdir(parents=True)
    (run / "defended" / "x" / "summary.json").write_text(json.dumps(defended))
    with pytest.raises(NotARunDirectory, match=fragment):
        comparison_rows([run])


def test_a_run_directory_name_cannot_break_the_markdown_table(tmp_path):
    run = _finished_run(tmp_path / "a|b c")
    table = markdown_table(comparison_rows([run]))
    assert table.splitlines()[2:] == ["| a\\|b c | no-Defense | 0.800 | 0.900 |",
                                      "| a\\|b c | FLAIN | 0.000 | 0.850 |"]


# ---- settings ----------------------------------------------------------------------------------------
FLOAT_KEYS = [f.name for f in fields(ExperimentConfig) if f.type in ("float", float)]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_number_refuses_nan_and_infinity(key, value):
    with pytest.raises(ConfigError, match="must be a finite number"):
        ExperimentConfig.defaults(**{key: value})


@pytest.mark.parametrize("overrides, fragment", [
    ({"seed": 2**32}, "seed=4294967296 is not allowed"),
    ({"seed": 2**70}, "out of range"),
    ({"flain_step": 1e-9}, "flain-step=1e-09 is not allowed"),
    ({"flain_step": 2.0}, "flain-step=2.0 is not allowed"),
    ({"max_examples": -1}, "max-examples=-1 is not allowed"),
])
def test_settings_that_used_to_pass_and_break_the_run(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        ExperimentConfig.defaults(**overrides)


def test_a_complete_data_directory_need_not_be_writable(tmp_path, monkeypatch):
    """A data directory that holds the whole data set is used as it is: no write test (a
    read-only mount would fail it); one that lacks the data set must be writable."""
    from launch import cli
    from launch.superlink import SOURCE_ROOT

    data = SOURCE_ROOT / "data"
    if not (data / "FashionMNIST").is_dir():
        pytest.skip("Fashion-MNIST is not in data/ (make setup)")
    probed = []

    def read_only(key, path):
        probed.append(key)
        if key == "data-dir":
            raise ConfigError(f"data-dir='{path}' cannot be written: Read-only file system")

    monkeypatch.setattr(cli, "_writable", read_only)
    cfg = ExperimentConfig.defaults(data_dir=str(data), run_dir=str(tmp_path / "run"))
    cli.check_paths(cfg, overwrite=False)
    assert probed == ["run-dir"]
    with pytest.raises(ConfigError, match="Read-only"):
        cli.check_paths(cfg.replace(data_dir=str(tmp_path / "empty")), overwrite=False)


def test_run_dir_reads_back_what_the_recorder_wrote(tmp_path):
    """RunDir is the one reader of the layout RunRecorder writes: the same rounds, summary,
    models, checkpoints and defended results, found by meaning."""
    import torch

    from server.results import DefendRecorder, RunDir, RunRecorder

    rec = RunRecorder(tmp_path / "r", {"dataset": "fmnist"}, {"seed": 1})
    rec.round(0, 0.1, 0.0, 1.5, 0.5)
    rec.round(1, 0.75, 0.25, 2.0, 0.25)
    state = {"w": torch.tensor([1.0, 2.0])}
    rec.save_model("initial", state)
    rec.save_checkpoint(5, state)
    rec.finish([], [])
    run = RunDir(tmp_path / "r")
    assert run.is_ours() and run.finished() and run.status() == "completed"
    assert run.rounds() == [{"round": 0, "acc": 0.1, "asr": 0.0, "seconds": 1.5, "eval_seconds": 0.5},
                            {"round": 1, "acc": 0.75, "asr": 0.25, "seconds": 2.0, "eval_seconds": 0.25}]
    assert run.config() == {"dataset": "fmnist", "seed": 1} and run.summary()["final"]["acc"] == 0.75
    assert run.checkpoint_rounds() == [5] and torch.equal(run.load_model("x", state, rnd=5)["w"], state["w"])
    assert run.defended_results() == [] and not run.defended("later").exists()
    DefendRecorder(run.defended("later").path, {"run": "r"}).finish([])
    assert [d.name for d in run.defended_results()] == ["later"] and run.defended("later").status() == "completed"
    assert RunDir(tmp_path / "nothing").status() == "missing"
    with pytest.raises(RunFileError, match="no such file"):
        RunDir(tmp_path / "nothing").summary()


def test_defend_refuses_before_it_reads_or_clears_anything(tmp_path):
    """`flain defend` on a run with an earlier result: without --overwrite the refusal comes first
    (the data directory is empty, so any loading would fail differently); with --overwrite a missing
    initial.pt is refused and the earlier result is still there."""
    from launch.defend import defend

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = ExperimentConfig.defaults(data_dir=str(tmp_path / "no-data"))
    (run_dir / "config.json").write_text(json.dumps(cfg.to_run_config() | {"run-dir": str(run_dir)}))
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "final": {"acc": 0.9, "asr": 0.9}}))
    earlier = run_dir / "defended" / "flain-cv" / "summary.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    with pytest.raises(ConfigError, match="already holds results"):
        defend(run_dir, ["flain-cv"], {}, None)
    with pytest.raises(ConfigError, match="has no initial.pt"):
        defend(run_dir, ["flain-cv"], {}, None, overwrite=True)
    assert earlier.read_text() == "{}"
