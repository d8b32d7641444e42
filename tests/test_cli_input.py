"""Bad paths and options on the command line: one line saying what is wrong, exit code 2, and
nothing written (each case found by trying to break the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.cli import main
from launch.defend import automatic_label
from server.results import RunFileError, check_name


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A working directory with a file, an empty directory and a finished run without its models."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "emptydir").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "fmnist", "aggregation": "fedavg"}))
    (run / "summary.json").write_text(json.dumps({"status": "completed", "final": {"acc": 0.9, "asr": 0.9}}))
    return tmp_path


CASES = [
    (["reproduce", "table1", "--report-only", "--out", "afile"], "afile is a file, not a directory"),
    (["reproduce", "table1", "--dry-run", "--out", "afile/sub"], "afile is a file, not a directory"),
    (["reproduce", "table1", "--dry-run", "--report-only"], "give one"),
    (["reproduce", "--list", "table1"], "--list prints every NAME: it takes none"),
    (["reproduce", "table1", "--seeds", "1000000", "--dry-run"], "--seeds 1000000 is not allowed: must be 1..100"),
    (["compose", "--out", "emptydir"], "--out 'emptydir' is a directory"),
    (["compose", "--out", "nodir/c.yml"], "nodir is not a directory"),
    (["compose", "--out", "afile"], "holds a file that `flain compose` did not write"),
    (["compose", "--certs", "afile", "--out", "c.yml"], "--certs='afile' cannot be used: afile is a file"),
    (["compose", "--certs", ".", "--out", "c.yml"], "holds files `flain compose` does not write (afile, emptydir, run)"),
    (["compose", "--certs", "certs", "--out", "emptydir"], "--out 'emptydir' is a directory"),
    (["compose", "--nodes", "10000", "--out", "c.yml"], "--nodes 10000 is not allowed: must be 1..1000"),
    (["compose", "--nodes", "2", "--superlink", "host:99999", "--out", "c.yml"], "is not HOST:PORT"),
    (["compose", "--nodes", "2", "--superlink", "host:0", "--out", "c.yml"], "is not HOST:PORT"),
    (["compose", "--nodes", "2", "--superlink", "...:9092", "--out", "c.yml"], "is not HOST:PORT"),
    (["compose", "--nodes", "2", "--superlink", "::1:9092", "--out", "c.yml"], "is not HOST:PORT"),
    (["compose", "--nodes", "2", "--superlink", "[example.org]:9092", "--out", "c.yml"], "is not HOST:PORT"),
    (["deploy", "--nodes", "0", "--dry-run"], "--nodes 0 is not allowed: must be 1..1000"),
    (["deploy", "--tls", "--superlink-host", "", "--dry-run"], "--superlink-host is empty"),
    (["deploy", "--tls", "--superlink-host", "999.1.1.1", "--dry-run"], "'999.1.1.1' is not a host name"),
    (["compose", "--nodes", "3", "--superlink", "h:9092", "--num-partitions", "-5", "--out", "c.yml"],
     "cannot be negative"),
    (["run", "--set", "checkpoint-every=31", "--dry-run"], "checkpoint-every=31 is more than the run's 30 rounds"),
    (["run", "--gpu-share", "0.5", "--dry-run"], "--gpu-share is the share of the GPU each client gets: it needs --gpu"),
    (["run", "--name", "foo", "--set", "run-dir=elsewhere", "--dry-run"], "--name and --set run-dir"),
    (["run", "--name", "é" * 150, "--dry-run"], "at most 200 bytes"),
    (["defend", "run", "--post-defenses", ""], "--post-defenses is empty"),
    (["defend", "run", "--post-defenses", ",,"], "--post-defenses is empty"),
    (["defend", "run", "--set", "post-defenses=flain"], "from --post-defenses, not from --set post-defenses"),
    (["defend", "run"], "has no initial.pt: its models were not kept"),
]
if Path("/proc/self").is_dir():  # Linux: a directory nobody can create files in, even root
    CASES += [(["reproduce", "table1", "--dry-run", "--out", "/proc/foo"], "cannot be written"),
              (["compose", "--out", "/proc/c.yml"], "--out '/proc/c.yml' cannot be written"),
              (["triggers", "--dataset", "mnist", "--out", "/proc/t.png"], "--out '/proc/t.png' cannot be written")]


@pytest.mark.parametrize("argv, fragment", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_a_bad_command_line_is_one_line_and_writes_nothing(scratch, capsys, argv, fragment):
    before = _files(scratch)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert _files(scratch) == before and not (scratch / "certs").exists() and not (scratch / "data").exists()


def test_compose_rewrites_its_own_file_and_nothing_else(scratch, capsys):
    assert main(["compose", "--nodes", "2", "--out", "c.yml"]) == 0
    assert main(["compose", "--nodes", "3", "--out", "c.yml"]) == 0  # regenerating is the point of it
    assert "supernode-2:" in (scratch / "c.yml").read_text()
    assert (scratch / "c.yml").stat().st_mode & 0o777 == 0o644  # read on, and copied to, other machines
    assert main(["compose", "--nodes", "2", "--out", "afile"]) == 2
    assert (scratch / "afile").read_text() == "mine\n"


def test_compose_certs_rewrites_its_own_directory(scratch, capsys):
    assert main(["compose", "--nodes", "2", "--certs", "certs", "--out", "c.yml"]) == 0
    assert sorted(p.name for p in (scratch / "certs").iterdir()) == [
        "ca.crt", "node0", "node0.pub", "node1", "node1.pub", "server.key", "server.pem"]
    assert main(["compose", "--nodes", "2", "--certs", "certs", "--out", "c.yml"]) == 0


def test_triggers_says_the_file_it_wrote(scratch, capsys):
    assert main(["triggers", "--dataset", "mnist", "--out", "emptydir", "--data-dir", "nowhere"]) == 0
    assert capsys.readouterr().out.strip() == "flain: wrote emptydir.png"
    assert (scratch / "emptydir.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_name_is_measured_in_bytes():
    assert check_name("a" * 200) == "a" * 200
    assert check_name("é" * 100) == "é" * 100  # 200 bytes
    with pytest.raises(RunFileError, match="at most 200 bytes"):
        check_name("é" * 101)


@pytest.mark.parametrize("defenses, overrides, rnd, label", [
    (["flain-cv"], {}, None, "flain-cv"),
    (["flain", "pruning"], {"flain-rho": 0.03}, 20, "flain+pruning,flain-rho=0.03@round-20"),
    (["flain"], {"data-dir": "C:\\data", "aux-draw": "per-class"}, None, "flain,aux-draw=per-class"),
    (["flain"], {"flain-layer": "a/b c"}, None, "flain,flain-layer=a_b_c"),
])
def test_the_automatic_label_is_one_safe_name(defenses, overrides, rnd, label):
    assert automatic_label(defenses, overrides, rnd) == label


def test_a_long_automatic_label_keeps_its_settings_apart():
    one = automatic_label(["flain"], {"flain-layer": "x" * 200}, None)
    two = automatic_label(["flain"], {"flain-layer": "x" * 199 + "y"}, None)
    assert len(one) == 113 and one[:100] == two[:100] and one != two and check_name(one) == one

