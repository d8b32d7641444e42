"""scripts/fidelity_study.py keeps the study's record: rows measured in a later session (the run
directories are not committed) are added to the committed ones, a row measured again replaces
its old value, and nothing else is lost."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fidelity_study.py"
spec = importlib.util.spec_from_file_location("fidelity_study", SCRIPT)
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def _row(run, rnd, protocol, asr):
    return {"run": run, "round": rnd, "protocol": protocol, "defense": "flain", "flain_asr": asr}


def test_merge_adds_new_rows_and_replaces_a_row_measured_again():
    kept = [_row("b", 10, "ours", 0.1), _row("b", 10, "authors", 0.2), _row("d", 20, "ours", 0.3)]
    measured = [_row("a", 10, "ours", 0.4), _row("b", 10, "authors", 0.5)]
    assert study.merge(kept, measured) == [
        _row("a", 10, "ours", 0.4), _row("b", 10, "ours", 0.1), _row("b", 10, "authors", 0.5), _row("d", 20, "ours", 0.3)]


def test_report_without_run_directories_keeps_the_committed_rows(tmp_path):
    rows = [_row("b", 10, "ours", 0.1) | {"task": "0-5", "network": "paper", "partition": "iid", "seed": 42,
                                          "acc": 0.9, "asr": 0.95, "flain_acc": 0.88, "cost": 0.02, "flipped": 7}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    args = type("Args", (), {"out": str(tmp_path / "no-runs"), "md": str(tmp_path)})
    assert study.report(args) == 0
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert "| 0-5 | paper | iid | ours | flain | 10 | 42 | 0.900 | 0.950 | 0.100 | 0.020 | 7 |" in (tmp_path / "table.md").read_text()
