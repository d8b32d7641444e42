"""Configuration: typed defaults equal Flower's table; every bad value fails before training
with one line naming the key, the value and what is allowed."""

import dataclasses
import json
import subprocess
import sys
import tomllib

import pytest

from experiment.config import ConfigError, ExperimentConfig, default_run_config, parse_overrides
from experiment.data import aux_size
from launch.cli import main
from launch.superlink import SOURCE_ROOT
from server.checks import check_experiment


def test_pyproject_table_equals_the_typed_defaults():
    with (SOURCE_ROOT / "pyproject.toml").open("rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert table == default_run_config()  # Flower's defaults are the dataclass's
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(ExperimentConfig)}
    assert set(table) == fields
    cfg = ExperimentConfig.defaults()
    check_experiment(cfg)
    assert cfg.dataset == "fmnist" and cfg.post_defense_names == ["flain", "flain-cv"]
    assert cfg.to_run_config() == table


def test_readme_lists_every_key_with_its_default():
    """The documented configuration table (docs/configuration.md, linked from the README) is
    what the code does: every key, its default."""
    import re

    page = SOURCE_ROOT / "docs" / "configuration.md"
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)` \| ([^|]+) \|", page.read_text(), re.M))
    for key, default in default_run_config().items():
        assert key in rows, f"{page.name}'s configuration table has no row for {key}"
        shown = rows[key].strip().strip("`")
        expected = '""' if default == "" else str(default)
        assert shown == expected, f"{page.name} shows {key} = {shown}, the default is {expected}"
    assert "docs/configuration.md" in (SOURCE_ROOT / "README.md").read_text()  # the README points to it


def test_the_configuration_page_names_every_registered_choice():
    """Each registry's names are on the row of the key that chooses them (a new rule or defense
    without its line on the page fails here)."""
    import re

    from strategies import POST_DEFENSES
    from strategies.aggregation import AGGREGATIONS

    page = (SOURCE_ROOT / "docs" / "configuration.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9-]+)` \| [^|]+ \| (.+) \|$", page, re.M))
    for key, names in (("aggregation", AGGREGATIONS), ("post-defenses", POST_DEFENSES)):
        missing = [n for n in names if f"`{n}`" not in rows[key]]
        assert not missing, f"configuration.md's {key} row does not name {missing}"


def test_aux_size_default_per_dataset():
    assert aux_size(ExperimentConfig.defaults(dataset="mnist")) == 200
    assert aux_size(ExperimentConfig.defaults(dataset="cifar10")) == 600
    assert aux_size(ExperimentConfig.defaults(dataset="emnist", source_label=10, target_label=20)) == 200
    assert aux_size(ExperimentConfig.defaults(aux_size=50)) == 50


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("dataset", "svhn", "dataset='svhn'"),
        ("partition", "pathological", "choose one of ['dirichlet', 'iid', 'iid-stratified']"),
        ("trigger", "blend", "trigger='blend'"),
        ("aggregation", "magic", "aggregation='magic'"),
        ("post-defenses", "flain,nope", "post-defenses='nope'"),
        ("post-defenses", "flain,flain", "twice"),
        ("num-clients", 0, "num-clients=0"),
        ("num-rounds", 2.5, "num-rounds=2.5 is not allowed: must be an integer"),
        ("mcr", 1.5, "mcr=1.5"),
        ("pdr", -0.1, "pdr=-0.1"),
        ("lr", 0, "lr=0"),
        ("source-label", 10, "allowed 0..9"),
        ("target-label", 0, "equals"),
        ("flain-step", 0.0, "flain-step=0.0"),
        ("flain-rho", 0.0, "flain-rho=0.0"),
        ("flain-layer", "conv1", "flain-layer='conv1'"),
        ("aux-size", 10000, "aux-size=10000"),
        ("trigger-pixels", 4, "trigger-pixels=4"),
        ("trigger-corner", "centre", "trigger-corner='centre'"),
        ("trigger-margin", 30, "does not fit"),
        ("trigger-value", 0.0, "trigger-value=0.0"),
        ("train-fraction", 0.0, "train-fraction=0.0"),
        ("train-fraction", 1.5, "train-fraction=1.5"),
        ("batch-size", "big", "batch-size='big' is not allowed: must be an integer"),
        ("aux-size", -1, "aux-size=-1 is not allowed: 0 (the paper's size)"),
        ("seed", -1, "seed=-1"),
        ("precision", "fp16", "precision='fp16'"),
        ("num-clients", 70000, "num-clients=70000"),
        ("rlr-theta", 11, "rlr-theta=11"),
        ("min-clients", 11, "min-clients=11"),
        ("flain-cv-scores", "bogus", "flain-cv-scores='bogus' is not allowed: choose one of"),
        ("flain-cv-select", "bogus", "flain-cv-select='bogus' is not allowed: choose one of"),
        ("flain-cv-accuracy", "bogus", "flain-cv-accuracy='bogus' is not allowed: choose one of"),
        ("flain-subspace-augment", "bogus", "flain-subspace-augment='bogus' is not allowed: choose one of"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key, value, fragment):
    rc = default_run_config() | {"aggregation": "rlr"}  # so that rlr-theta is checked
    rc[key] = value
    with pytest.raises(ConfigError) as err:
        check_experiment(ExperimentConfig.from_run_config(rc))
    assert fragment in str(err.value)


def test_unknown_keys_fail_and_missing_keys_take_defaults():
    with pytest.raises(ConfigError, match="unknown run-config key 'num-round' .did you mean 'num-rounds'"):
        ExperimentConfig.from_run_config(default_run_config() | {"num-round": 3})
    assert ExperimentConfig.from_run_config({"seed": 7}) == ExperimentConfig(seed=7)


def test_parse_overrides_uses_toml_types_and_refuses_a_key_twice():
    assert parse_overrides(["num-rounds=3", "lr=0.01", "trigger=cba", "run-dir='x y'"]) == {
        "num-rounds": 3, "lr": 0.01, "trigger": "cba", "run-dir": "x y"}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="num-rounds is given twice .3 and 5."):
        parse_overrides(["num-rounds=3", "seed=1", "num-rounds=5"])


def test_cli_rejects_bad_config_before_anything_starts(capsys, tmp_path):
    code = main(["run", "--set", "mcr=2", "--set", f"run-dir='{tmp_path / 'r'}'"])
    assert code == 2
    assert "mcr=2" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["run", "--set", "nmu-clients=3"]) == 2


def test_cli_dry_run_prints_resolved_config(capsys, tmp_path):
    assert main(["run", "--dry-run", "--set", "num-rounds=3", "--set", f"data-dir='{tmp_path}'"]) == 0
    out = capsys.readouterr().out
    assert '"num-rounds": 3' in out and str(tmp_path) in out


def test_table_command_puts_runs_side_by_side(tmp_path, capsys):
    for name, rule, final, post in [
        ("fedavg", "fedavg", (0.88, 0.95), {"flain": (0.875, 0.0), "pruning": (0.86, 0.1)}),
        ("rlr", "rlr", (0.85, 0.02), {}),
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"dataset": "fmnist", "aggregation": rule}))
        (d / "summary.json").write_text(json.dumps({
            "status": "completed", "final": {"acc": final[0], "asr": final[1]},
            "post_defenses": {k: {"acc": a, "asr": r} for k, (a, r) in post.items()} | {"x": {"error": "boom"}},
        }))
    assert main(["table", str(tmp_path / "fedavg"), str(tmp_path / "rlr")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2:] == [
        "| fedavg | no-Defense | 0.950 | 0.880 |",
        "| fedavg | FLAIN | 0.000 | 0.875 |",
        "| fedavg | Pruning | 0.100 | 0.860 |",
        "| rlr | RLR | 0.020 | 0.850 |",
    ]
    assert main(["table", str(tmp_path / "nothing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["table", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "config.json: no such file" in err and len(err.strip().splitlines()) == 1


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("sets,fragment", [
    (["source-label=12"], "source-label=12 is not a class of fmnist"),
    (["source-label=5"], "equals target-label=5"),
    (["trigger-margin=24"], "does not fit 28x28"),
    (["trigger-pixels=4"], "trigger-pixels=4"),
    (["aux-size=10000"], "aux-size=10000 leaves no test images"),
    (["aux-size=-3"], "aux-size=-3"),
    (["flain-layer='conv2'"], "flain-layer='conv2' is not a Linear layer"),
    (["flain-layer=fc9"], "flain-layer='fc9'"),
    (["post-defenses='flain,flain'"], "names ['flain'] twice"),
    (["post-defenses='flain,magic'"], "post-defenses='magic'"),
    (["train-fraction=0"], "train-fraction=0.0"),
    (["train-fraction=1.01"], "train-fraction=1.01"),
    (["num-rounds=3", "num-rounds=4"], "num-rounds is given twice"),
    (["nmu-clients=3"], "unknown run-config key 'nmu-clients'"),
    (["num-clients=three"], "num-clients='three' is not allowed: must be an integer"),
    (["dataset=svhn"], "dataset='svhn' is not allowed: choose one of"),
    (["aggregation=bulyan"], "needs clients per round >= 4*krum-f + 3"),
])
def test_cli_bad_settings_give_one_clear_line(capsys, tmp_path, sets, fragment):
    argv = ["run", "--dry-run", "--set", f"run-dir='{tmp_path / 'r'}'"]
    for pair in sets:
        argv += ["--set", pair]
    assert fragment in _one_line_error(capsys, argv)
    assert not (tmp_path / "r").exists()


def test_cli_refuses_unwritable_dirs_and_a_finished_run(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = _one_line_error(capsys, ["run", "--dry-run", "--set", f"data-dir='{blocker / 'data'}'"])
    assert "data-dir=" in err and "is a file, not a directory" in err
    assert "cannot be written" in _one_line_error(capsys, ["run", "--dry-run", "--set", "data-dir='/proc/flain-data'"])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not __import__("os").access(locked, __import__("os").W_OK):  # root can write anywhere
        assert "cannot be written" in _one_line_error(capsys, ["run", "--dry-run", "--set", f"run-dir='{locked / 'r'}'"])
    done = tmp_path / "done"
    done.mkdir()
    (done / ".flain-run").write_text('{"kind": "run"}')  # the marker: a run of ours
    (done / "summary.json").write_text(json.dumps({"status": "completed"}))
    err = _one_line_error(capsys, ["run", "--dry-run", "--set", f"run-dir='{done}'"])
    assert "already holds a run (status 'completed')" in err and "--overwrite" in err
    assert main(["run", "--dry-run", "--overwrite", "--set", f"run-dir='{done}'"]) == 0


def test_cli_error_from_a_fresh_process_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "run", "--set", "target-label=10"],
                          capture_output=True, text=True, cwd=SOURCE_ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("flain: configuration error: target-label=10 is not a class of fmnist: "
                                   "allowed 0..9")


@pytest.mark.slow
@pytest.mark.process  # real Flower or a subprocess: mutation runs skip it
def test_installed_wheel_runs_without_a_source_tree(tmp_path):
    """`pip install --no-deps` of the built wheel, used from a directory with no
    pyproject.toml: the defaults come from the code, `flain run --dry-run` works."""
    wheels, site, cwd = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(SOURCE_ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("flain-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert not (site / "pyproject.toml").exists() and (site / "launch" / "paper_results.csv").is_file()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(site / "bin" / "flain"), "run", "--dry-run", "--set", "num-rounds=3"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert resolved["num-rounds"] == 3 and resolved["data-dir"] == str(cwd / "data")
    code = "import launch.cli as c, pathlib; print(pathlib.Path(c.__file__).parent.parent)"
    where = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(site)  # the installed copy ran, not the source tree


FLOAT_KEYS = [f.name for f in dataclasses.fields(ExperimentConfig) if f.type in (float, "float")]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", FLOAT_KEYS)
def test_every_float_setting_refuses_nan_and_infinity_even_built_in_code(name, value):
    """The run-config path refuses them on entry; a configuration built in Python must too."""
    with pytest.raises(ConfigError, match=f"{name.replace('_', '-')}=.* must be a finite number"):
        dataclasses.replace(ExperimentConfig(), **{name: value}).validate()


def test_the_cli_maps_errors_to_exit_codes_in_one_table(monkeypatch, capsys):
    """Each error kind a command raises gives its exit code and a one-line message from the
    one table in launch/cli.py; no command prints and returns an error code itself."""
    from experiment.data import DataUnavailable
    from launch import cli
    from launch.superlink import RunFailed
    from launch.tables import NotARunDirectory
    from server.results import RunFileError

    source = (cli.Path(cli.__file__)).read_text()
    assert "return EXIT_CONFIG" not in source and "return EXIT_DATA" not in source
    expected = {ConfigError: (2, "configuration error"), NotARunDirectory: (2, "configuration error"),
                RunFileError: (2, "configuration error"), DataUnavailable: (3, "data error"), RunFailed: (1, "run failed")}
    for kind, (code, what) in expected.items():
        def boom(args, kind=kind):
            raise kind("the reason")
        parser = cli.parser()
        monkeypatch.setattr(cli, "parser", lambda p=parser: p)
        for action in parser._subparsers._group_actions[0].choices.values():
            if action.get_default("func") is not None and action.prog.endswith(" table"):
                action.set_defaults(func=boom)
        assert cli.main(["table", "x"]) == code, kind
        assert capsys.readouterr().err == f"flain: {what}: the reason\n"
