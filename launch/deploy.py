"""Real deployment on one machine: a SuperLink and N SuperNodes as separate processes on
127.0.0.1, talking over the network, optionally with TLS and SuperNode authentication.

The commands and flags are the ones docker-compose.yml runs in containers
(`superlink_args` and `supernode_command` are shared with `launch.compose`).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from launch.superlink import CONNECTION, SuperLink, _bin, free_port, log_tail, stop_tree
from launch.tls import Tls, make_node_key


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

    def __init__(self, link: SuperLink, nodes: int, tls: Tls | None,
                 wrap: Callable[[int], Sequence[str]] | None = None, dial: str | None = None) -> None:
        """`dial`: the SuperLink address the nodes use (default: the link's own); `wrap`: a
        command prefix per partition (the tests' `ip netns exec NS`)."""
        self.link, self.count, self.tls = link, nodes, tls
        self.wrap, self.dial = wrap or (lambda partition: ()), dial
        self.nodes: list[subprocess.Popen] = []

    def start_node(self, partition: int, register: bool = True) -> subprocess.Popen:
        private = None
        if self.tls is not None:
            private, public = make_node_key(self.link.workdir, f"node{partition}")
            if register:
                self.link.flwr("supernode", "register", str(public), CONNECTION)
        log = self._log(partition).open("ab")
        proc = subprocess.Popen(
            [*self.wrap(partition),
             *supernode_command(self.dial or self.link.address, free_port(), partition, self.count,
                                self.tls.ca if self.tls else None, private)],
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
        """Until every SuperNode is connected; RuntimeError after `timeout` s, or at once when
        a SuperNode process exits (with its last log lines)."""
        deadline = time.monotonic() + timeout
        while self.connected() < self.count:
            for partition, proc in enumerate(self.nodes):
                if proc.poll() is not None:
                    raise RuntimeError(f"SuperNode {partition} exited with code {proc.returncode} before connecting:\n"
                                       f"{log_tail(self._log(partition))}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.connected()} of {self.count} SuperNodes connected in {timeout:.0f}s; "
                                   f"the last lines of node 0's log:\n{log_tail(self._log(0))}")
            time.sleep(2)

    def all_gone(self) -> str | None:
        """Why the run cannot go on, if every SuperNode process has exited (one dead node is a
        client failure the run survives, all of them are not)."""
        if self.nodes and all(proc.poll() is not None for proc in self.nodes):
            return (f"every SuperNode exited (codes {[p.returncode for p in self.nodes]}); node 0's last lines:\n"
                    f"{log_tail(self._log(0))}")
        return None

    def _log(self, partition: int) -> Path:
        return self.link.workdir / f"node{partition}.log"

    def stop(self) -> None:
        for proc in self.nodes:
            stop_tree(proc, grace=5)
        self.nodes.clear()
