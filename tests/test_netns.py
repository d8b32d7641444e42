"""SuperNodes on other hosts, for real: the SuperLink and each SuperNode in its own Linux network
namespace, joined by veth pairs on a bridge, with TLS and node authentication; a node that
dials an address missing from the certificate is refused. Needs root (the namespaces and links
are created and removed here; the addresses exist only inside them)."""

import os
import random
import shutil
import subprocess
import time
import uuid

import pytest

from experiment.config import ExperimentConfig
from launch.deploy import Federation, supernode_command
from launch.superlink import (CONNECTION, SOURCE_ROOT, app_directory, free_port, private_superlink, stop_tree,
                              write_run_config)
from launch.tls import make_node_key
from server.results import RunDir

pytestmark = pytest.mark.slow

LINK, OTHER, ROOT = 1, 99, 2  # host numbers in the test's /24; OTHER: the SuperLink's too, not in the certificate


def _unused_net() -> str:
    """A 10.231.X /24 that no address or route of this host uses (a namespace left behind by a
    killed run keeps its root-side link, and with it the route, until someone deletes it)."""
    used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
    used += subprocess.run(["ip", "route"], capture_output=True, text=True, timeout=30).stdout
    free = [f"10.231.{x}" for x in range(256) if f"10.231.{x}." not in used]
    return random.Random(uuid.uuid4().int).choice(free)


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (ip)"
    name = f"fl-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    _ip("netns", "del", name)
    return None


@pytest.fixture
def namespaces():
    """(link namespace, [node namespaces], /24 prefix): a bridge in the link's, one veth to each
    node's and one to the root namespace (so the flwr CLI here reaches the SuperLink). Removed
    afterwards."""
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:5]
    link, nodes = f"fl-link-{tag}", [f"fl-n{i}-{tag}" for i in range(2)]
    root_veth = f"flr{tag}"
    net = _unused_net()
    try:
        for ns in (link, *nodes):
            _ip("netns", "add", ns)
            _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", "br0", "type", "bridge", ns=link)
        _ip("addr", "add", f"{net}.{LINK}/24", "dev", "br0", ns=link)
        _ip("addr", "add", f"{net}.{OTHER}/24", "dev", "br0", ns=link)
        _ip("link", "set", "br0", "up", ns=link)
        _ip("link", "add", root_veth, "type", "veth", "peer", "name", "up0", "netns", link)
        _ip("addr", "add", f"{net}.{ROOT}/24", "dev", root_veth)
        _ip("link", "set", root_veth, "up")
        _ip("link", "set", "up0", "master", "br0", "up", ns=link)
        for i, ns in enumerate(nodes):
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"up{i + 1}", "netns", link)
            _ip("addr", "add", f"{net}.{10 + i}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", f"up{i + 1}", "master", "br0", "up", ns=link)
        yield link, nodes, net
    finally:
        for ns in (link, *nodes):  # deleting a namespace deletes its end of each veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", root_veth], capture_output=True, timeout=30)


def test_supernodes_in_other_namespaces_train_with_tls_and_a_wrong_address_is_refused(namespaces, tmp_path):
    link_ns, node_ns, net = namespaces
    in_ns = lambda ns: ["ip", "netns", "exec", ns]  # noqa: E731
    with private_superlink(simulation=False, tls=True, host="0.0.0.0", dial=f"{net}.{LINK}", wrap=in_ns(link_ns)) as link:
        port = link.port
        fed = Federation(link, nodes=2, tls=link.tls, wrap=lambda p: in_ns(node_ns[p]))
        intruder = None
        try:
            fed.start()
            fed.wait_connected(timeout=180)

            # a registered node of the federation dialling the SuperLink's other address
            private, public = make_node_key(link.workdir, "wrong-address")
            link.flwr("supernode", "register", str(public), CONNECTION)
            log = link.workdir / "wrong-address.log"
            with log.open("ab") as out:
                intruder = subprocess.Popen(
                    [*in_ns(node_ns[1]), *supernode_command(f"{net}.{OTHER}:{port}", free_port(), 1, 2, link.tls.ca,
                                                            private)],
                    env=link.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 60
            while "CERTIFICATE_VERIFY_FAILED" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(1)
            text = log.read_text()
            assert "CERTIFICATE_VERIFY_FAILED" in text and f"{net}.{OTHER}" in text, text[-2000:]
            online = [n for n in link.flwr("supernode", "list", CONNECTION)["nodes"] if n["status"] == "online"]
            assert len(online) == 2  # its key is registered, but it never got in
            stop_tree(intruder, grace=5)
            intruder = None

            run_dir = tmp_path / "run"
            cfg = ExperimentConfig.defaults(num_clients=2, num_rounds=2, train_fraction=0.02, post_defenses="",
                                            run_dir=str(run_dir), data_dir=str(SOURCE_ROOT / "data"))
            config_file = write_run_config(cfg.to_run_config(), link.workdir / "run-config.toml")
            run_id = link.submit(app_directory(link.workdir), config_file, {})
            final = link.follow(run_id, lambda line: None, watch=fed.all_gone, timeout=900)
            assert final["status"] == "finished:completed", final
            summary = RunDir(run_dir).summary()
            assert summary["status"] == "completed" and summary["client_failures"] == []
            assert [r["round"] for r in RunDir(run_dir).rounds()] == [0, 1, 2]
        finally:
            if intruder is not None:
                stop_tree(intruder, grace=5)
            fed.stop()
