"""Every wait has a deadline and watches what it depends on; SIGTERM and SIGINT stop everything
a command started. Real SuperLinks and real `flain` processes."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from launch.superlink import SOURCE_ROOT, RunFailed, private_superlink, processes_with_env, write_run_config, app_directory

DATA = SOURCE_ROOT / "data"


def _submit_unserved_run(link) -> int:
    """A run on a SuperLink whose ServerApp runner is someone else's (`--isolation process`)
    and never comes: the run stays pending."""
    config = write_run_config({"num-rounds": 1}, link.workdir / "run.toml")
    return link.submit(app_directory(link.workdir), config, {})


def test_a_run_nobody_takes_fails_at_the_start_deadline():
    with private_superlink(simulation=False, isolation="process") as link:
        run_id = _submit_unserved_run(link)
        started = time.monotonic()
        with pytest.raises(RunFailed, match=r"still 'pending' after 20s|still 'starting' after 20s"):
            link.follow(run_id, lambda line: None, poll=5, start_timeout=20)
        assert 20 <= time.monotonic() - started < 60


def test_a_dead_dependency_ends_the_wait_at_once():
    with private_superlink(simulation=False, isolation="process") as link:
        run_id = _submit_unserved_run(link)
        started = time.monotonic()
        with pytest.raises(RunFailed, match="the serverapp container exited with code 606"):
            link.follow(run_id, lambda line: None, poll=30, start_timeout=600,
                        watch=lambda: "the serverapp container exited with code 606")
        assert time.monotonic() - started < 15


def test_a_superlink_that_dies_ends_the_wait_with_its_log():
    with private_superlink(simulation=False, isolation="process") as link:
        run_id = _submit_unserved_run(link)
        link.proc.send_signal(signal.SIGKILL)
        with pytest.raises(RunFailed, match=r"flower-superlink exited with code -9"):
            link.follow(run_id, lambda line: None, poll=30, start_timeout=600)


def test_the_whole_run_has_a_deadline():
    with private_superlink(simulation=False, isolation="process") as link:
        run_id = _submit_unserved_run(link)
        with pytest.raises(RunFailed, match="did not finish in 8s"):
            link.follow(run_id, lambda line: None, poll=30, start_timeout=600, timeout=8)


def test_a_status_poll_that_times_out_is_asked_again_under_the_same_deadline():
    """On a loaded machine `flwr ls` can miss its timeout (a run died of it); the wait asks
    again and still ends at its own deadline, with RunFailed, not a traceback."""
    with private_superlink(simulation=False, isolation="process") as link:
        run_id = _submit_unserved_run(link)
        real, calls = link.status, []

        def slow_then_real(rid):
            calls.append(rid)
            if len(calls) <= 2:
                raise subprocess.TimeoutExpired(["flwr", "ls"], 120)
            return real(rid)

        link.status = slow_then_real
        with pytest.raises(RunFailed, match=r"still 'pending' after 20s|still 'starting' after 20s"):
            link.follow(run_id, lambda line: None, poll=5, start_timeout=20)
        assert len(calls) > 2


def _marked_processes(marker: str) -> list[int]:
    return processes_with_env("FLAIN_TEST_MARKER", marker)


@pytest.mark.parametrize("command, sig", [("run", signal.SIGTERM), ("run", signal.SIGINT), ("deploy", signal.SIGTERM)])
def test_a_signal_stops_everything_the_command_started(tmp_path, command, sig):
    """`flain run` (or `flain deploy`) gets SIGTERM (what timeout, systemd and docker stop send)
    or SIGINT once it is training: it exits 130 with one line, summary.json says
    `interrupted`, and no process it started lives on (SuperLink, SuperExec, flwr-simulation,
    Ray's daemons and actors, SuperNodes: all inherit the marker)."""
    if not (DATA / "FashionMNIST").is_dir():
        pytest.skip("Fashion-MNIST is not in data/ (make setup)")
    marker = uuid.uuid4().hex
    env = dict(os.environ, FLAIN_TEST_MARKER=marker)
    clients = ["--nodes", "2"] if command == "deploy" else ["--set", "num-clients=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", command, *clients, "--set", "num-rounds=3",
         "--set", "train-fraction=0.02", "--set", "post-defenses=''", "--set", "mcr=0.0",
         "--set", f"run-dir='{tmp_path / 'run'}'", "--set", f"data-dir='{DATA}'"],
        cwd=SOURCE_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # until the simulation is up and a round is on
            lines.append(line)
            if "[ROUND 1/3]" in line or "[flain] round 1/3" in line:
                break
        assert len(_marked_processes(marker)) > 3, "".join(lines)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "flain: interrupted; every process started was stopped" in rest
    assert "Traceback" not in rest
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    deadline = time.monotonic() + 10
    while _marked_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _marked_processes(marker)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in left if Path(f"/proc/{p}").exists()]


def test_a_data_directory_that_cannot_be_made_is_one_line(flain_cli):
    out = flain_cli("data", "fetch", "fmnist", "--data-dir", "/proc/flain-x")
    assert out.returncode == 3
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "flain: data error: fmnist cannot be prepared in /proc/flain-x: No such file or directory (/proc/flain-x)"]
