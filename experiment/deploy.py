"""Real deployment on one machine: a SuperLink and N SuperNodes as separate processes on
127.0.0.1, talking over the network, optionally with TLS and SuperNode authentication.

The commands and flags are the ones docker-compose.yml runs in containers
(`superlink_command`, `supernode_command` are shared with the compose test).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from experiment.superlink import CONNECTION, SuperLink, Tls, _bin, free_port, stop_tree, superlink_args


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC key pair in OpenSSH format (what SuperNode authentication takes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    private.chmod(0o600)
    return private, public


def supernode_command(superlink: str, port: int, partition: int, partitions: int,
                      ca: Path | None = None, private_key: Path | None = None) -> list[str]:
    """One SuperNode serving partition `partition` of `partitions`."""
    cmd = [_bin("flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", f"partition-id={partition} num-partitions={partitions}"]
    cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if private_key:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    return cmd


class Federation:
    """A SuperLink and its SuperNodes, all processes of this machine."""

    def __init__(self, link: SuperLink, nodes: int, tls: Tls | None) -> None:
        self.link, self.count, self.tls = link, nodes, tls
        self.nodes: list[subprocess.Popen] = []

    def start_node(self, partition: int, register: bool = True) -> subprocess.Popen:
        private = None
        if self.tls is not None:
            private, public = make_node_key(self.link.workdir, f"node{partition}")
            if register:
                self.link.flwr("supernode", "register", str(public), CONNECTION)
        log = (self.link.workdir / f"node{partition}.log").open("ab")
        proc = subprocess.Popen(
            supernode_command(self.link.address, free_port(), partition, self.count,
                              self.tls.ca if self.tls else None, private),
            env=self.link.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.nodes.append(proc)
        return proc

    def start(self) -> None:
        for i in range(self.count):
            self.start_node(i)

    def connected(self) -> int:
        return len(self.link.flwr("supernode", "list", CONNECTION).get("nodes", []))

    def wait_connected(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.connected() < self.count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.connected()} of {self.count} SuperNodes connected in {timeout:.0f}s")
            time.sleep(2)

    def stop(self) -> None:
        for proc in self.nodes:
            stop_tree(proc, grace=5)
        self.nodes.clear()


# ---- docker compose ------------------------------------------------------------------
COMPOSE_PORT = 9090  # the SuperLink's one HTTP port (Fleet, Control and Runtime APIs)
NODE_PORT = 9094  # each SuperNode's Runtime API, where its ClientApp runner connects


def compose_services(nodes: int, flwr_version: str) -> dict:
    """docker-compose.yml for a SuperLink, its ServerApp runner and `nodes` SuperNodes with
    their ClientApp runners, TLS and SuperNode authentication on. The SuperLink and
    SuperNode commands are built by the same functions `flain deploy` uses."""
    certs = Tls(Path("/certs/ca.crt"), Path("/certs/server.pem"), Path("/certs/server.key"))

    def flags(cmd: list[str]) -> list[str]:
        return cmd[1:]  # drop the program: the image's entrypoint is it

    app = {"build": {"context": ".", "args": {"FLWR_VERSION": flwr_version}}, "image": f"flain-app:{flwr_version}",
           "volumes": ["./data:/app/data", "./runs:/app/runs", "./certs:/certs:ro"]}
    services: dict = {
        "superlink": {
            "image": f"flwr/superlink:{flwr_version}",
            "command": superlink_args(certs) + ["--host", "0.0.0.0", "--port", str(COMPOSE_PORT),
                                                "--isolation", "process"],
            "ports": [f"{COMPOSE_PORT}:{COMPOSE_PORT}"],
            "volumes": ["./certs:/certs:ro"],
        },
        "serverapp": {
            **app,
            "command": ["--runtime-api-address", f"superlink:{COMPOSE_PORT}", "--root-certificates", str(certs.ca)],
            "depends_on": ["superlink"],
        },
    }
    for i in range(nodes):
        node = supernode_command(f"superlink:{COMPOSE_PORT}", NODE_PORT, i, nodes, certs.ca, Path(f"/certs/node{i}"))
        services[f"supernode-{i}"] = {
            "image": f"flwr/supernode:{flwr_version}",
            "command": flags(node)[:2] + ["--host", "0.0.0.0"] + flags(node)[2:] + ["--isolation", "process"],
            "volumes": ["./certs:/certs:ro"],
            "depends_on": ["superlink"],
        }
        runner = {**app, "command": ["--runtime-api-address", f"supernode-{i}:{NODE_PORT}", "--insecure"],
                  "depends_on": [f"supernode-{i}"]}
        # profile "cpu" (the default, set in .env) or "gpu": every runner shares the one GPU
        services[f"clientapp-{i}"] = {**runner, "profiles": ["cpu"]}
        services[f"clientapp-{i}-gpu"] = {
            **runner, "profiles": ["gpu"],
            "deploy": {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}},
        }
    return {"name": "flain", "services": services}
