"""`flain reproduce`: the paper's numbers as data, the plan, reuse of finished runs, the report."""

import json

import pytest

from experiment.config import ExperimentConfig
from launch import reproduce as rep
from launch.cli import main


def _cell(table, dataset, task, defense, **kw):
    (cell,) = [c for c in rep.paper_cells() if c.table == table and c.dataset == dataset and c.task == task
               and c.defense == defense and all(getattr(c, k) == v for k, v in kw.items())]
    return cell


@pytest.mark.parametrize("table,dataset,task,defense,kw,asr,acc", [
    ("table1", "fmnist", "0-5", "FLAIN", {}, 0.0, 0.900),
    ("table1", "fmnist", "0-5", "no-Defense", {}, 0.991, 0.901),
    ("table1", "mnist", "0-6", "RLR", {}, 0.0, 0.980),
    ("table1", "cifar10", "0-7", "Pruning", {}, 0.606, 0.705),
    ("table2", "fmnist", "0-6", "Pruning", {}, 0.178, 0.887),
    ("table2", "cifar10", "0-5", "FLAIN", {}, 0.0, 0.781),
    ("table3", "mnist", "3-6", "RLR", {"clients": 20, "mcr": 0.6}, 0.0, 0.953),
    ("table4", "emnist", "10-20", "no-Defense", {"clients": 10, "mcr": 0.5}, 0.992, 0.854),
    ("table5", "fmnist", "6-8", "FLAIN", {"clients": 20, "mcr": 0.4}, 0.001, 0.888),
    ("table6", "cifar10", "4-5", "RLR", {"clients": 20, "mcr": 0.6}, 0.798, 0.670),
])
def test_paper_cells_match_the_paper_text(table, dataset, task, defense, kw, asr, acc):
    cell = _cell(table, dataset, task, defense, **kw)
    assert (cell.asr, cell.acc) == (asr, acc)


def test_paper_settings():
    assert _cell("table1", "cifar10", "0-5", "FLAIN").trigger == "dba"  # Table 1's CIFAR-10 column is DBA
    assert _cell("table2", "cifar10", "0-5", "FLAIN").partition == "dirichlet"
    assert _cell("table6", "cifar10", "4-5", "FLAIN", clients=20, mcr=0.4).trigger == "dba"
    fig5 = [c for c in rep.paper_cells() if c.table == "fig5"]
    assert {c.trigger for c in fig5} == {"cba-3px", "cba-5px", "cba-7px", "cba-9px"} and all(c.pdr == 0.5 for c in fig5)
    fig6 = [c for c in rep.paper_cells() if c.table == "fig6"]
    assert {c.pdr for c in fig6} == {0.2, 0.3, 0.4, 0.5, 0.6} and {c.clients for c in fig6} == {15}
    assert {c.task for c in fig6} == {"5-8", "8-5", "4-7", "7-4"} and all(c.asr is None for c in fig6)
    assert len([c for c in rep.paper_cells() if c.table in ("table1", "table2")]) == 96


def test_one_fedavg_training_serves_three_rows_and_rlr_its_own():
    cells = rep.select(rep.paper_cells(), "table1", ["fmnist"], ["0-5", "0-6"])
    trainings = rep.plan(cells, seeds=2, extra={"num-rounds": 3})
    assert len(cells) == 8 and len(trainings) == 2 * 2 * 2  # tasks x (fedavg, rlr) x seeds
    fedavg = [t for t in trainings if t.overrides["aggregation"] == "fedavg"]
    assert all(sorted(c.defense for c in t.cells) == ["FLAIN", "FLAIN-CV (ours)", "Pruning", "no-Defense"]
               for t in fedavg)
    assert {t.overrides["seed"] for t in trainings} == {42, 43}
    pixels = rep.plan(rep.select(rep.paper_cells(), "fig5", ["fmnist"], None), 1, {})
    assert sorted(t.overrides["trigger-pixels"] for t in pixels) == [3, 5, 7, 9]
    for t in trainings + pixels:
        rep.resolved(t)  # every planned training is a valid configuration
    both = rep.check_selection("table1,table2", ["fmnist"], ["0-5"])  # a comma list: the union
    assert {c.table for c in both} == {"table1", "table2"} and len(both) == 8


def _fake_run(run_dir, cfg: ExperimentConfig, final, post):
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_run_config() | {"run-dir": str(run_dir),
                                                                           "resolved": {"precision": "fp32"}}))
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "final": final, "post_defenses": post}))


def test_finished_runs_are_reused_and_the_report_compares(tmp_path, capsys):
    cells = rep.select(rep.paper_cells(), "table1", ["fmnist"], ["0-5"])
    trainings = rep.plan(cells, seeds=1, extra={})
    fedavg = next(t for t in trainings if t.overrides["aggregation"] == "fedavg")
    cfg = rep.resolved(fedavg)
    assert not rep.finished(tmp_path / "runs" / fedavg.name, cfg)
    _fake_run(tmp_path / "runs" / fedavg.name, cfg, {"acc": 0.88, "asr": 0.95},
              {"flain": {"acc": 0.895, "asr": 0.01}, "pruning": {"acc": 0.86, "asr": 0.1},
               "flain-cv": {"acc": 0.87, "asr": 0.0}})
    assert rep.finished(tmp_path / "runs" / fedavg.name, cfg)
    assert not rep.finished(tmp_path / "runs" / fedavg.name, cfg.replace(num_rounds=11))  # other settings: rerun

    data = rep.report(trainings, tmp_path)
    by_defense = {c["defense"]: c for c in data["cells"]}
    flain = by_defense["FLAIN"]
    assert flain["paper"] == {"asr": 0.0, "acc": 0.9} and flain["ours"]["acc"] == 0.895 and flain["ours"]["seeds"] == 1
    assert flain["within_tolerance"] and not by_defense["Pruning"]["within_tolerance"]  # ASR 0.1 > 0.021 + 0.02
    assert by_defense["RLR"]["ours"] is None  # its training did not run
    assert data["trainings"][0]["gap"] == pytest.approx(0.88 - 0.901)
    md = rep.markdown(data)
    assert f"| runs/{fedavg.name} | 30 | 42 | fp32 | 0.880 | 0.901 | -0.021 |" in md
    assert "Measured: 3 of 4 published cells, 1 of them within tolerance." in md  # FLAIN; no-Defense ACC 0.88 < 0.891
    assert "| fmnist | (0,5) | iid | 10 | 0.4 | 0.3 | cba | RLR | 0.003 | 0.870 | not run |" in md
    assert "| fmnist | (0,5) | iid | 10 | 0.4 | 0.3 | cba | Pruning | 0.021 | 0.890 |" in md and "**no**" in md
    assert "| FLAIN-CV (ours) | — | — | 0.000 ± 0.000 (n=1) | 0.870 ± 0.000 (n=1) |" in md

    assert [p.name for p in rep.plots(data, tmp_path)] == ["table1.png"]

    # the command reuses the finished training: the dry run says so
    assert main(["reproduce", "table1", "--datasets", "fmnist", "--tasks", "0-5", "--out", str(tmp_path),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{fedavg.name}  [reused; 4 cells]" in out and "[to run; 1 cells]" in out
    # --report-only writes the report from what has finished and starts nothing
    assert main(["reproduce", "table1", "--datasets", "fmnist", "--tasks", "0-5", "--out", str(tmp_path),
                 "--report-only"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert "Trainings finished: 1 of 2." in (tmp_path / "report.md").read_text()
    assert report["status"] == {fedavg.name: "reused", next(t.name for t in trainings if t is not fedavg): "not run"}
    assert "not run" in (tmp_path / "report.md").read_text() and (tmp_path / "table1.png").is_file()


def test_a_run_of_another_configuration_is_not_reported_as_this_one(tmp_path):
    """A directory left by an earlier sweep (10 rounds where the data set's default is now longer)
    must not fill the cells: they say "not run" and the report names the run and the difference."""
    cells = rep.select(rep.paper_cells(), "table1", ["fmnist"], ["0-5"])
    trainings = rep.plan(cells, seeds=1, extra={})
    fedavg = next(t for t in trainings if t.overrides["aggregation"] == "fedavg")
    cfg = rep.resolved(fedavg)
    assert cfg.num_rounds != 10
    _fake_run(tmp_path / "runs" / fedavg.name, cfg.replace(num_rounds=10), {"acc": 0.88, "asr": 0.95},
              {"flain": {"acc": 0.895, "asr": 0.01}})
    data = rep.report(trainings, tmp_path)
    assert all(c["ours"] is None for c in data["cells"]) and data["trainings"] == []
    (entry,) = data["not_counted"]
    assert entry["run"] == f"runs/{fedavg.name}"
    assert entry["why"].startswith(f"another configuration: num-rounds 10, not {cfg.num_rounds} (")
    md = rep.markdown(data)
    assert f"- runs/{fedavg.name}: another configuration: num-rounds 10, not {cfg.num_rounds}" in md
    # a training of the right configuration that has not finished is not counted either
    (tmp_path / "runs" / fedavg.name / "summary.json").write_text(json.dumps({"status": "running"}))
    (tmp_path / "runs" / fedavg.name / "config.json").write_text(json.dumps(cfg.to_run_config()))
    data = rep.report(trainings, tmp_path)
    assert all(c["ours"] is None for c in data["cells"])
    assert data["not_counted"][0]["why"].startswith("not finished (status 'running')")
    assert "| fmnist | (0,5) | iid | 10 | 0.4 | 0.3 | cba | FLAIN | 0.000 | 0.900 | not run |" in md


def test_reproduce_bad_input_is_one_line(capsys):
    for argv, fragment in [(["reproduce", "table9"], "NAME='table9'"),
                           (["reproduce", "table1,fig9"], "NAME='fig9'"),
                           (["reproduce", "table1", "--tasks", "1-2"], "--tasks '1-2' is not in table1"),
                           (["reproduce", "table1", "--seeds", "0"], "--seeds 0"),
                           (["reproduce", "table1", "--set", "seed=3"], "seed is set by flain reproduce"),
                           (["reproduce"], "give NAME")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert main(["reproduce", "--list"]) == 0
    assert "table1     48 cells" in capsys.readouterr().out


def test_a_run_of_a_paper_setting_is_put_beside_the_paper_cells():
    """The default experiment is Table 1's FMNIST (0,5) cell: no-Defense 0.991/0.901, FLAIN
    0.000/0.900 (ASR/ACC); FLAIN-CV goes beside the paper's FLAIN; another setting: nothing."""
    from experiment.config import ExperimentConfig
    from launch.reproduce import paper_comparison

    summary = {"final": {"acc": 0.905, "asr": 0.985},
               "post_defenses": {"flain": {"acc": 0.859, "asr": 0.0}, "flain-cv": {"acc": 0.895, "asr": 0.019}}}
    lines = paper_comparison(ExperimentConfig(), summary)
    assert [line.split()[0] for line in lines] == ["no-Defense", "FLAIN", "FLAIN-CV"]
    assert lines[0].endswith(" within tolerance") and "ASR 0.991 ACC 0.901" in lines[0]
    assert lines[1].endswith("NOT within tolerance") and "ASR 0.000 ACC 0.900" in lines[1]  # 0.859 < 0.900 - 0.01
    assert lines[2].endswith(" within tolerance")  # 0.019 <= 0.02 and 0.895 >= 0.89
    assert paper_comparison(ExperimentConfig.defaults(source_label=1), summary) == []


@pytest.mark.parametrize("defense, asr, acc, paper_asr, paper_acc, expected", [
    ("FLAIN", 0.000, 0.900, 0.000, 0.900, True),
    ("FLAIN", 0.020, 0.890, 0.000, 0.900, True),    # both at the edge
    ("FLAIN", 0.021, 0.900, 0.000, 0.900, False),   # ASR 0.001 over
    ("FLAIN", 0.000, 0.889, 0.000, 0.900, False),   # ACC 0.001 under
    ("Pruning", 0.000, 0.950, 0.217, 0.861, True),  # better than published on both
    ("no-Defense", 0.978, 0.904, 0.989, 0.904, True),
    ("no-Defense", 1.000, 0.988, 0.949, 0.992, False),  # a stronger backdoor than the paper's
    ("no-Defense", 0.900, 0.904, 0.989, 0.904, False),  # a weaker one: every defense would look good
])
def test_within_tolerance_by_hand(defense, asr, acc, paper_asr, paper_acc, expected):
    assert rep.within_tolerance(defense, asr, acc, paper_asr, paper_acc) is expected
