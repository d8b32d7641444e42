"""Flower's simulation on a Ray cluster of two nodes (both on this machine, one CPU each, as
`ray start --head` and `ray start --address` on two hosts would make it): `flain run` with
RAY_ADDRESS joins the cluster and places one ClientApp actor on each node (docs/deployment.md)."""

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launch.superlink import SOURCE_ROOT, _terminate, free_port, processes_with_env

pytestmark = pytest.mark.slow


def _ray(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ray"), *args]


def _actor_nodes(logs: Path, actor: str) -> list[str]:
    """The Ray node of each worker that ran `actor`: a worker's stdout log names its actor, and
    its core-worker log names its node."""
    nodes = []
    for out in logs.glob("worker-*.out"):
        if f":actor_name:{actor}" in out.read_text():
            worker_id = out.name.split("-")[1]
            core = next(logs.glob(f"python-core-worker-{worker_id}_*.log")).read_text()
            nodes.append(re.search(r"node_id=([0-9a-f]+)", core).group(1))
    return sorted(nodes)


def test_a_simulation_spreads_its_clients_over_two_ray_nodes(tmp_path):
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = dict(os.environ, RAY_TMPDIR=temp)
    head = subprocess.Popen(_ray("start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard",
                                 "false", "--block"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(1)
        worker = subprocess.Popen(_ray("start", "--address", f"127.0.0.1:{port}", "--num-cpus", "1", "--block"),
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while subprocess.run(_ray("status", "--address", f"127.0.0.1:{port}"), env=env, capture_output=True,
                             text=True, timeout=60).stdout.count(" node_") < 2:
            assert worker.poll() is None and time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(2)

        run_dir = tmp_path / "run"
        proc = subprocess.run(
            [sys.executable, "-m", "launch.cli", "run", "--set", "num-clients=2", "--set", "num-rounds=1",
             "--set", "train-fraction=0.05", "--set", "post-defenses=''", "--set", f"run-dir='{run_dir}'",
             "--set", f"data-dir='{SOURCE_ROOT / 'data'}'"],
            cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=900,
            env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        nodes = _actor_nodes(Path(temp) / "ray" / "session_latest" / "logs", "ClientAppActor")
        assert len(nodes) == 2 and len(set(nodes)) == 2, nodes  # one ClientApp actor on each node
    finally:
        _terminate(processes_with_env("RAY_TMPDIR", temp), grace=10)
        for proc in (head, worker):
            if proc is not None and proc.poll() is None:
                proc.kill()
