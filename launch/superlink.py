"""A private Flower SuperLink for one `flain` command, and the `flwr` calls against it.

`flwr run .` with the built-in `local` connection starts a SuperLink on fixed ports and
leaves it running; `flwr run --stream` exits 0 even when the run failed. Instead each
`flain` command starts its own SuperLink on a free port with its own FLWR_HOME, submits
the run, follows the logs, reads the real final status, and stops every process it
started (also on Ctrl-C or error).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from experiment.config import ExperimentConfig
from experiment.data import num_rounds
from launch.tls import Tls, certificate_hosts, make_tls

CONNECTION = "flain"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the Flower app's directory in a source tree


def app_directory(workdir: Path) -> Path:
    """The Flower app to submit, staged in `workdir/app`.

    From a source tree: pyproject.toml, .gitignore and the packages its `fab-include`
    names, copied. `flwr run` walks (and resolves) every file under the directory it is
    given before filtering, .venv and data included: 45,000 files and ~4 s of every start-up
    on the source tree itself, 0.1 s on the staged copy; the FAB is the same.
    Installed from a wheel (no pyproject.toml beside the packages): a generated pyproject
    naming the same components; Flower then imports them from the installed packages."""
    app = workdir / "app"
    if app.exists():
        shutil.rmtree(app)
    app.mkdir(parents=True)
    if (SOURCE_ROOT / "pyproject.toml").is_file():
        for name in ("pyproject.toml", ".gitignore"):
            if (SOURCE_ROOT / name).is_file():
                shutil.copy2(SOURCE_ROOT / name, app / name)
        for package in fab_packages(SOURCE_ROOT / "pyproject.toml"):
            shutil.copytree(SOURCE_ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
        return app
    from experiment.config import default_run_config

    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "flain"\nversion = "0.1.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "flain"\n\n'
        '[tool.flwr.app.components]\nserverapp = "server.app:app"\nclientapp = "client.app:app"\n\n'
        "[tool.flwr.app.config]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in default_run_config().items())
    )
    return app


def fab_packages(pyproject: Path) -> list[str]:
    """The top-level directories named by `[tool.flwr.app] fab-include` ("server/**" -> server)."""
    patterns = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["fab-include"]
    return sorted({p.split("/", 1)[0] for p in patterns if "/" in p})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A Flower command from this interpreter's environment (or PATH)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def processes_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment has key=value (finds daemons that left the tree)."""
    needle = f"{key}={value}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue
    return [pid for pid in found if pid != os.getpid()]


def stop_tree(proc: subprocess.Popen, grace: float = 10.0, extra: list[int] = ()) -> None:
    """Stop `proc`, everything it started and `extra`: SIGTERM, then SIGKILL after `grace` s."""
    pids = [proc.pid, *descendants(proc.pid), *extra]
    _terminate(pids, grace)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _terminate(pids: list[int], grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            break


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def superlink_args(tls: Tls | None) -> list[str]:
    """SuperLink flags beyond host/port: TLS files and SuperNode authentication, or --insecure."""
    if tls is None:
        return ["--insecure"]
    return ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
            "--enable-supernode-auth"]


class RunFailed(RuntimeError):
    """The Flower run ended in a state other than finished:completed."""


class SuperLink:
    """One SuperLink process on 127.0.0.1 and a `flwr` CLI configured to reach it."""

    def __init__(self, workdir: Path, simulation: bool = True, tls: Tls | None = None, port: int | None = None,
                 isolation: str = "subprocess", host: str = "127.0.0.1", dial: str | None = None,
                 wrap: Sequence[str] = ()):
        self.workdir = workdir
        # host: the address it listens on (0.0.0.0: every interface); dial: the one the flwr
        # CLI and local SuperNodes use; wrap: a command prefix (the tests' `ip netns exec NS`)
        self.host, self.wrap = host, list(wrap)
        self.dial = dial or ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
        self.simulation = simulation
        self.isolation = isolation  # "process": the ServerApp runner is someone else's (a container)
        self.tls = tls  # None: --insecure
        self.port = port or free_port()
        self.home = workdir / "flwr-home"
        self.log_path = workdir / "superlink.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"[{self.dial}]:{self.port}" if ":" in self.dial else f"{self.dial}:{self.port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Flower's processes start each other by name (flower-superexec, flwr-serverapp...):
        # this environment's bin/ must come first even when the venv is not activated.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        )
        return env

    def write_connection(self) -> None:
        """The `flwr` CLI's connection to this SuperLink (also one started elsewhere, e.g.
        in a container whose port is published on 127.0.0.1)."""
        self.home.mkdir(parents=True, exist_ok=True)
        trust = f'root-certificates = "{self.tls.ca}"' if self.tls else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{trust}\n'
        )

    def start(self, timeout: float = 60.0) -> None:
        self.write_connection()
        cmd = [*self.wrap, _bin("flower-superlink"), *superlink_args(self.tls), "--host", self.host, "--port", str(self.port),
               "--disable-runtime-dependency-installation", "--isolation", self.isolation]
        if self.simulation:
            cmd.append("--simulation")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.proc.returncode}; its log ends:\n"
                                   f"{log_tail(self.log_path)}")
            try:
                with socket.create_connection((self.dial, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"flower-superlink did not open {self.dial}:{self.port} in {timeout:.0f}s; its log ends:\n"
                           f"{log_tail(self.log_path)}")

    def stop(self) -> None:
        """Stop the SuperLink and every process of this run, also those that left the
        process tree (Ray's daemons re-parent themselves): they all carry our FLWR_HOME."""
        if self.proc is not None:
            stop_tree(self.proc, extra=processes_with_env("FLWR_HOME", str(self.home)))
            self.proc = None
        _terminate(processes_with_env("FLWR_HOME", str(self.home)), grace=5)

    # ---- flwr CLI ---------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run a `flwr ... --format json` command; its JSON reply."""
        out = subprocess.run([_bin("flwr"), *args, "--format", "json"], env=self.env(),
                             capture_output=True, text=True, timeout=timeout)
        try:
            reply = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            raise RuntimeError(f"flwr {' '.join(args)} gave no JSON:\n{out.stdout}\n{out.stderr}") from None
        if not reply.get("success", False):
            raise RuntimeError(f"flwr {args[0]} failed: {reply.get('error-message', reply)}")
        return reply

    def submit(self, app: Path, run_config_file: Path, federation_config: dict[str, Any]) -> int:
        fed = " ".join(f"{k}={_toml(v)}" for k, v in federation_config.items())
        args = ["run", str(app), CONNECTION, "--run-config", str(run_config_file)]
        if fed:
            args += ["--federation-config", fed]
        return int(self.flwr(*args)["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        return self.flwr("ls", CONNECTION, "--run-id", str(run_id))["runs"][0]

    def follow(self, run_id: int, on_line: Callable[[str], None], poll: float = 30.0, *,
               watch: Callable[[], str | None] | None = None, start_timeout: float = 300.0,
               timeout: float | None = None) -> dict[str, Any]:
        """Stream the run's logs to `on_line` until it finishes; its final status.

        The log stream ends when the run ends. Each `flwr ls` costs a second of CPU (a fresh
        Python), so the status is polled every `poll` s once the run is running. Every wait has
        a deadline: RunFailed as soon as `watch` names a problem (a process or container this
        run depends on is gone; checked every few seconds), when the run is still pending or
        starting after `start_timeout` s (nothing picked it up), or after `timeout` s in all."""
        started = time.monotonic()
        streamer = subprocess.Popen([_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                                    env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
        reader = threading.Thread(target=_pump, args=(streamer.stdout, on_line), daemon=True)
        reader.start()
        tick, last_status, running = min(5.0, poll), started, False
        try:
            while True:
                try:
                    streamer.wait(timeout=tick)
                    break
                except subprocess.TimeoutExpired:
                    pass
                problem = (watch() if watch else None) or self._dead()
                if problem:
                    raise RunFailed(problem)
                now = time.monotonic()
                if timeout is not None and now - started > timeout:
                    raise RunFailed(f"run {run_id} did not finish in {timeout:.0f}s (the deadline for this run)")
                if now - last_status < (poll if running else min(15.0, poll)):
                    continue
                last_status = now
                run = self._poll(run_id)
                if run is None:  # `flwr ls` timed out (a loaded machine): ask again; the deadlines hold
                    continue
                status = run["status"]
                if status.startswith("finished"):
                    break
                running = status.startswith("running")
                if not running and now - started > start_timeout:
                    raise RunFailed(f"run {run_id} is still {status!r} after {start_timeout:.0f}s: "
                                    "no ServerApp runner took it (is the SuperExec up, at the SuperLink's version?)")
            reader.join(timeout=5)  # let the last lines through
            problem = self._dead()  # the log stream also ends when the SuperLink dies
            if problem:
                raise RunFailed(problem)
            run = None
            for _ in range(60):  # the status can trail the end of the logs briefly
                run = self._poll(run_id) or run
                if run is not None and run["status"].startswith("finished"):
                    return run
                time.sleep(1)
            if run is None:
                raise RunFailed(f"run {run_id}'s logs ended but `flwr ls` never answered with its status")
            return run
        finally:
            stop_tree(streamer, grace=2)

    def _poll(self, run_id: int) -> dict[str, Any] | None:
        """The run's status, or None when `flwr ls` did not answer within its timeout."""
        try:
            return self.status(run_id)
        except subprocess.TimeoutExpired:
            return None

    def _dead(self) -> str | None:
        """Why this SuperLink can no longer serve the run, if its process (when ours) exited."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"flower-superlink exited with code {self.proc.returncode}:\n{log_tail(self.log_path)}"


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc.strerror})"


def _pump(stream: Iterator[str], on_line: Callable[[str], None]) -> None:
    for line in stream:
        on_line(line.rstrip("\n"))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def write_run_config(run_config: dict[str, Any], path: Path) -> Path:
    """A TOML file for `flwr run --run-config FILE` (no shell quoting to get wrong)."""
    path.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in run_config.items()))
    return path


@contextmanager
def private_superlink(simulation: bool = True, tls: bool = False, isolation: str = "subprocess",
                      host: str = "127.0.0.1", dial: str | None = None, sans: Sequence[str] = (),
                      wrap: Sequence[str] = ()) -> Iterator[SuperLink]:
    """A started SuperLink in a temporary FLWR_HOME; everything is stopped on exit.

    With `tls`: a throwaway CA and a certificate for this machine, `host`, `dial` and `sans`
    (what SuperNodes elsewhere dial), TLS on every API, SuperNode authentication on (only
    registered node keys get in)."""
    workdir = Path(tempfile.mkdtemp(prefix="flain-"))
    certificate = make_tls(workdir / "tls", certificate_hosts(host, dial or "", *sans)) if tls else None
    link = SuperLink(workdir, simulation=simulation, tls=certificate, isolation=isolation, host=host, dial=dial,
                     wrap=wrap)
    try:
        link.start()
        yield link
    finally:
        link.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def run_deadline(cfg: ExperimentConfig) -> float:
    """Seconds after which a run is given up: start-up, every round waiting its full
    `round-timeout` plus a central evaluation, and the post-training defenses."""
    return 600 + num_rounds(cfg) * (cfg.round_timeout + 300) + 7200
