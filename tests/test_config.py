"""Configuration: pyproject defaults are the fields; bad values fail before training."""

import dataclasses

import pytest

from experiment.cli import main
from experiment.config import ConfigError, ExperimentConfig, default_run_config, parse_overrides


def test_pyproject_defaults_match_fields_and_validate():
    keys = set(default_run_config())
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(ExperimentConfig)}
    assert keys == fields
    cfg = ExperimentConfig.defaults()
    assert cfg.dataset == "fmnist" and cfg.post_defense_names == ["flain"]
    assert cfg.to_run_config() == default_run_config() | {"aux-size": 200}  # 0 = the paper's size


def test_aux_size_default_per_dataset():
    assert ExperimentConfig.defaults(dataset="mnist").aux_size == 200
    assert ExperimentConfig.defaults(dataset="cifar10").aux_size == 600
    assert ExperimentConfig.defaults(dataset="emnist", source_label=10, target_label=20).aux_size == 200
    assert ExperimentConfig.defaults(aux_size=50).aux_size == 50


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("dataset", "svhn", "dataset='svhn'"),
        ("partition", "pathological", "choose one of ['dirichlet', 'iid']"),
        ("trigger", "blend", "trigger='blend'"),
        ("aggregation", "magic", "aggregation='magic'"),
        ("post-defenses", "flain,nope", "post-defenses='nope'"),
        ("post-defenses", "flain,flain", "twice"),
        ("num-clients", 0, "num-clients=0"),
        ("num-rounds", 2.5, "num-rounds=2.5 must be an integer"),
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
        ("batch-size", "big", "batch-size='big' must be an integer"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key, value, fragment):
    rc = default_run_config()
    rc[key] = value
    with pytest.raises(ConfigError, match=None) as err:
        ExperimentConfig.from_run_config(rc)
    assert fragment in str(err.value)


def test_unknown_and_missing_keys():
    rc = default_run_config() | {"num-round": 3}
    with pytest.raises(ConfigError, match="unknown run-config key"):
        ExperimentConfig.from_run_config(rc)
    rc = default_run_config()
    del rc["seed"]
    with pytest.raises(ConfigError, match="missing"):
        ExperimentConfig.from_run_config(rc)


def test_parse_overrides_uses_toml_types():
    assert parse_overrides(["num-rounds=3", "lr=0.01", "trigger=cba", "run-dir='x y'"]) == {
        "num-rounds": 3, "lr": 0.01, "trigger": "cba", "run-dir": "x y"}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


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
    import json

    for name, rule, final, post in [
        ("fedavg", "fedavg", (0.88, 0.95), {"flain": (0.875, 0.0), "pruning": (0.86, 0.1)}),
        ("rlr", "rlr", (0.85, 0.02), {}),
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"aggregation": rule}))
        (d / "summary.json").write_text(json.dumps({
            "final": {"acc": final[0], "asr": final[1]},
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
