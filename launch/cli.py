"""`flain`: the command for people.

  flain run [--set key=value ...] [--name NAME] [--overwrite] [--gpu [--gpu-share S]] [--verbose] [--dry-run]
  flain run --resume RUN_DIR [--gpu] [--verbose]
  flain deploy --nodes N [--tls [--superlink-host ADDRESS] [--san NAME ...]] [--set key=value ...]
               [--name NAME] [--overwrite] [--verbose] [--dry-run]
  flain defend RUN_DIR [--post-defenses a,b] [--set key=value ...] [--name LABEL] [--round R] [--overwrite]
  flain defend --model MODULE:FUNCTION --initial W0.pt --final W.pt --aux AUX --out DIR [--test T] [--triggered T]
               [--post-defenses a,b] [--set key=value ...] [--overwrite]
  flain reproduce NAME[,NAME] [--datasets a,b] [--tasks 0-5,0-6] [--seeds N] [--set key=value ...] [--out DIR]
                  [--jobs K] [--gpu] [--dry-run | --report-only] | --list
  flain data fetch NAME [--data-dir DIR]
  flain triggers [--dataset NAME] [--data-dir DIR] [--out FILE.png]
  flain table RUN_DIR [RUN_DIR ...]
  flain compose [--nodes N] [--out docker-compose.yml] [--certs DIR [--san NAME ...]]
  flain compose --nodes N --superlink HOST:PORT [--first-partition K --num-partitions P] [--out FILE]

`flain run` checks the whole configuration, prepares the data, runs the Flower app as a
simulation on a private SuperLink, shows progress per round and prints the results table.
Exit codes: 0 done; 1 the run failed; 2 a setting cannot work (one line says which);
3 the data set is not available; 4 training finished but a post-training defense failed
(the other defenses' results are written); 130 interrupted.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiment.config import ConfigError, ExperimentConfig, default_run_config, parse_overrides
from experiment.data import DATASETS, DataUnavailable, fetch, num_rounds, present
from launch.tables import NotARunDirectory, comparison_rows, format_table, markdown_table, read_run
from server.checks import check_experiment
from launch.superlink import RunFailed
from launch.tls import CERT_FILES, certificate_hosts
from server.results import RunDir, RunFileError, atomic_text, check_name, clear, end_status, ours

EXIT_RUN_FAILED, EXIT_CONFIG, EXIT_DATA, EXIT_DEFENSE_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
# The one place an error becomes an exit code and a one-line message (first match wins).
# Commands raise; they return only outcomes (0, or EXIT_DEFENSE_FAILED: trained, a defense raised).
ERRORS: tuple[tuple[type[BaseException], int, str], ...] = (
    (ConfigError, EXIT_CONFIG, "configuration error"),
    (NotARunDirectory, EXIT_CONFIG, "configuration error"),
    (RunFileError, EXIT_CONFIG, "configuration error"),  # a file the user pointed at
    (DataUnavailable, EXIT_DATA, "data error"),
    (RunFailed, EXIT_RUN_FAILED, "run failed"),
)

# log lines shown without --verbose: our per-round progress, Flower's round headers, problems
_PROGRESS = re.compile(r"\[flain\]|\[ROUND \d+/\d+\]|Run directory|ERROR|Error|Traceback|failures")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def resolve(overrides: dict[str, Any], name: str | None) -> ExperimentConfig:
    """Defaults + overrides, every check run; data-dir and run-dir made absolute."""
    cfg = ExperimentConfig.from_run_config(default_run_config() | overrides)  # unknown keys fail here
    cfg = cfg.replace(data_dir=str(Path(cfg.data_dir).resolve()), run_dir=str(cfg.run_path(name).resolve()))
    check_experiment(cfg)
    return cfg


def _writable(key: str, path: Path) -> None:
    """`path` (or, if it does not exist yet, its nearest existing parent) can be written: a
    throwaway file is made and removed there (permission bits do not tell for root or /proc)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}='{path}' cannot be used: {existing} is a file, not a directory")
    _probe(f"{key}='{path}'", existing)


def _probe(what: str, folder: Path) -> None:
    """A throwaway file can be made in `folder` (where `what`, the setting and its path, would write)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} cannot be written: {exc.strerror or exc} in {folder}") from None


def _output_file(key: str, path: Path) -> None:
    """`path` can be written as a file: not a directory, in a directory that exists and is writable."""
    if path.is_dir():
        raise ConfigError(f"{key} '{path}' is a directory: give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"{key} '{path}' cannot be written: {path.parent} is not a directory")
    _probe(f"{key} '{path}'", path.parent)


MAX_SEEDS = 100  # `flain reproduce --seeds`: each is one more training per cell
MAX_NODES = 1000  # SuperNodes on one machine or in one compose file: beyond it, a typo, not a plan


def _host_port(text: str) -> bool:
    """HOST:PORT: a host the certificate check accepts (tls.certificate_hosts) and a port 1..65535.
    An IPv6 address goes in brackets, as gRPC reads it ([::1]:9092): bare, `::1:9092` is itself an
    address and the port is a guess."""
    host, _, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]") and ":" in host:
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        return False
    try:
        certificate_hosts(host)
    except ValueError:
        return False
    return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


def _check_nodes(nodes: int) -> None:
    if not 1 <= nodes <= MAX_NODES:
        raise ConfigError(f"--nodes {nodes} is not allowed: must be 1..{MAX_NODES}")


def check_paths(cfg: ExperimentConfig, overwrite: bool) -> None:
    """The run directory can be written and holds nothing of anyone else's: an earlier run of
    ours only with `overwrite` (it is then deleted whole), other files never. The data
    directory need not be writable when the data set is complete there (fetch says if not)."""
    if not present(cfg.dataset, cfg.data_dir):  # it will be fetched there
        _writable("data-dir", Path(cfg.data_dir))
    run_dir = Path(cfg.run_dir)
    _writable("run-dir", run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not ours(run_dir):
        raise ConfigError(f"run-dir='{run_dir}' already holds files that are not a flain run: "
                          "choose a new or empty directory (--name or --set run-dir=...)")
    if not overwrite:
        try:
            status = RunDir(run_dir).summary().get("status", "unknown")
        except RunFileError:
            status = "unreadable"
        raise ConfigError(f"run-dir='{run_dir}' already holds a run (status {status!r}): "
                          "choose another --name or run-dir, or pass --overwrite to replace it")


def resumed_config(path: Path) -> ExperimentConfig:
    """The configuration of the unfinished run in `path`, to go on after its last checkpoint."""
    run = RunDir(path)
    if not run.path.is_dir() or not ours(run.path):
        raise RunFileError(f"{path} is not a flain run directory")
    saved = run.config()
    known = default_run_config()
    cfg = resolve({k: v for k, v in saved.items() if k in known} | {"resume": 1, "run-dir": str(path)}, None)
    after = run.resume_point(num_rounds(cfg))
    print(f"flain: resuming {path} after round {after} of {num_rounds(cfg)}", flush=True)
    return cfg


def _prepare(args: argparse.Namespace, **forced: Any) -> ExperimentConfig | int:
    """The checked configuration with its data in place, or 0 after a dry run."""
    if args.name is not None:
        check_name(args.name)
    if getattr(args, "resume", None) is not None:
        if args.set or args.name is not None or args.overwrite:
            raise ConfigError("--resume goes on with the run's own configuration: "
                              "it takes no --set, --name or --overwrite")
        cfg = resumed_config(Path(args.resume))
    else:
        overrides = parse_overrides(args.set) | forced
        if args.name is not None and overrides.get("run-dir"):
            raise ConfigError("--name and --set run-dir both say where the run goes: give one")
        cfg = resolve(overrides, args.name)
        check_paths(cfg, args.overwrite)
    if args.dry_run:
        print(json.dumps(cfg.to_run_config(), indent=2))
        return 0
    print(f"flain: preparing {cfg.dataset} in {cfg.data_dir}", flush=True)
    fetch(cfg.dataset, cfg.data_dir)
    if args.overwrite:
        clear(Path(cfg.run_dir))  # checked above: ours, or empty
    return cfg


def _execute(cfg: ExperimentConfig, args: argparse.Namespace, federation: dict[str, Any],
             nodes: int = 0, tls: bool = False) -> int:
    """Run the app on a private SuperLink: simulation (nodes=0) or `nodes` real SuperNodes."""
    from launch.deploy import Federation
    from launch.superlink import app_directory, private_superlink, run_deadline, write_run_config

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=60)

    def show(line: str) -> None:
        line = _ANSI.sub("", line)
        tail.append(line)
        if args.verbose or _PROGRESS.search(line):
            print(line, flush=True)

    started = time.perf_counter()
    where = f"{nodes} SuperNodes{' with TLS and node authentication' if tls else ''}" if nodes else "simulation"
    print(f"flain: {cfg.num_clients} clients, {num_rounds(cfg)} rounds, {where}; results in {run_dir}", flush=True)
    try:
        with private_superlink(simulation=not nodes, tls=tls, host=getattr(args, "superlink_host", "127.0.0.1"),
                               sans=getattr(args, "san", ())) as link:
            fed = Federation(link, nodes, link.tls) if nodes else None
            try:
                if fed:
                    fed.start()
                    fed.wait_connected()
                config_file = write_run_config(cfg.to_run_config(), link.workdir / "run-config.toml")
                run_id = link.submit(app_directory(link.workdir), config_file, federation)
                final = link.follow(run_id, show, watch=fed.all_gone if fed else None, timeout=run_deadline(cfg))
            finally:
                if fed:
                    fed.stop()
            if final["status"] != "finished:completed":
                raise RunFailed(f"{final['status']}: {final.get('status-details', '')}")
    except KeyboardInterrupt:
        # the ServerApp may have recorded its own termination as `failed`: the signal was ours
        end_status(run_dir, "interrupted", "stopped by a signal (Ctrl-C or SIGTERM)", over=("running", "failed"))
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RunFailed, RuntimeError) as exc:
        end_status(run_dir, "failed", str(exc).splitlines()[0])
        print("\n".join(["", "flain: last log lines:", *tail]), file=sys.stderr)
        raise RunFailed(str(exc)) from None

    try:
        summary = RunDir(run_dir).summary(("status", "final"))
    except RunFileError as exc:
        raise RunFailed(str(exc)) from None
    print(f"\nflain: finished in {time.perf_counter() - started:.0f}s; results in {run_dir}\n")
    print(format_table(summary))
    from launch.reproduce import TOLERANCE, paper_comparison

    beside = paper_comparison(cfg, summary)
    if beside:
        asr, acc = TOLERANCE["asr"], TOLERANCE["acc"]
        print(f"\nthe paper's numbers for this setting (within: ASR <= paper + {asr}, no-Defense's within {asr} "
              f"either way; ACC >= paper - {acc}):")
        print("\n".join(beside))
        print("why our FLAIN costs more accuracy than the paper's, and what is measured: docs/fidelity.md")
    if summary.get("status") == "defense-failed":
        failed = ", ".join(summary.get("failed_defenses", []))
        print(f"flain: training completed but post-training defense(s) FAILED: {failed} "
              f"(see the log above and {RunDir(run_dir).summary_file})", file=sys.stderr)
        return EXIT_DEFENSE_FAILED
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.gpu_share is not None and not 0 < args.gpu_share <= 1:
        raise ConfigError(f"--gpu-share {args.gpu_share} is not allowed: must satisfy 0 < value <= 1")
    if args.gpu_share is not None and not args.gpu:
        raise ConfigError("--gpu-share is the share of the GPU each client gets: it needs --gpu")
    cfg = _prepare(args)
    if isinstance(cfg, int):
        return cfg
    federation: dict[str, Any] = {"num-supernodes": cfg.num_clients, "client-resources-num-cpus": 1,
                                  "client-resources-num-gpus": 0.0}
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--gpu given but no CUDA device is visible")
        if args.gpu_share is None:  # from the GPU's free memory and a measured training step
            import os

            from experiment.hardware import gpu_share
            from models import build_model

            share, how = gpu_share(cfg, build_model, len(os.sched_getaffinity(0)))
            print(f"flain: --gpu: {how}", flush=True)
        else:
            share = args.gpu_share
        federation["client-resources-num-gpus"] = share
    return _execute(cfg, args, federation)


def cmd_deploy(args: argparse.Namespace) -> int:
    _check_nodes(args.nodes)
    if not args.superlink_host.strip():
        raise ConfigError("--superlink-host is empty: give the address the SuperLink listens on (default 127.0.0.1)")
    if args.san and not args.tls:
        raise ConfigError("--san names the certificate's hosts: it needs --tls")
    if args.superlink_host not in ("127.0.0.1", "localhost", "::1") and not args.tls:
        raise ConfigError(f"--superlink-host {args.superlink_host} opens the SuperLink beyond this machine: it needs "
                          "--tls (node authentication); its Control API has no user authentication either, so let "
                          "only your own machines reach the port (docs/deployment.md)")
    try:
        certificate_hosts(args.superlink_host, *args.san)
    except ValueError as exc:
        raise ConfigError(f"--san/--superlink-host: {exc}") from None
    if any(pair.partition("=")[0].strip() == "num-clients" for pair in args.set):
        raise ConfigError("num-clients is --nodes in a deployment (one client per SuperNode)")
    cfg = _prepare(args, **{"num-clients": args.nodes})
    if isinstance(cfg, int):
        return cfg
    return _execute(cfg, args, {}, nodes=args.nodes, tls=args.tls)


def cmd_data_fetch(args: argparse.Namespace) -> int:
    if args.name not in DATASETS:
        raise ConfigError(f"unknown data set {args.name!r}; choose one of {sorted(DATASETS)}")
    fetch(args.name, Path(args.data_dir).resolve())
    print(f"flain: {args.name} is ready in {Path(args.data_dir).resolve()}")
    return 0


def cmd_triggers(args: argparse.Namespace) -> int:
    """Draw a clean test image of the data set, each trigger and each DBA part."""
    import torch

    from attacks.gallery import draw
    from experiment.data import load

    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown data set {args.dataset!r}; choose one of {sorted(DATASETS)}")
    out = Path(args.out)
    out = out if out.suffix else out.with_suffix(".png")  # what matplotlib would write: the message says so
    _output_file("--out", out)
    spec = DATASETS[args.dataset]
    try:
        images, labels = load(args.dataset, str(Path(args.data_dir).resolve()), False)
        image, title = images[0], f"{args.dataset}: test image 0 (label {int(labels[0])})"
    except DataUnavailable:  # still show the geometry, on a mid-grey image
        image = torch.full(spec.shape, 96, dtype=torch.uint8)
        title = f"{args.dataset} (data set not available: patterns on a grey image)"
    out = draw(image, title, out)
    print(f"flain: wrote {out}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    """Markdown table of ACC/ASR for finished runs, side by side."""
    print(markdown_table(comparison_rows([Path(d) for d in args.runs])))
    return 0


EXTERNAL = ("model", "initial", "final", "aux", "out", "test", "triggered")  # `flain defend --model` options


def cmd_defend(args: argparse.Namespace) -> int:
    """Post-training defenses on a finished run's saved models, or on any saved model, without retraining."""
    overrides = parse_overrides(args.set)
    if "post-defenses" in overrides:
        raise ConfigError("flain defend takes its defenses from --post-defenses, not from --set post-defenses")
    defenses = [n.strip() for n in args.post_defenses.split(",") if n.strip()]
    if args.model or args.run_dir is None:
        return _defend_external(args, defenses, overrides)
    given = [f"--{k}" for k in EXTERNAL if getattr(args, k)]
    if given:
        raise ConfigError(f"{', '.join(given)} belong to `flain defend --model ...` (a model outside a run directory), "
                          "not to `flain defend RUN_DIR`")
    from launch.defend import defend

    run_dir = Path(args.run_dir)
    if args.name is not None:
        check_name(args.name)
    out, summary = defend(run_dir, defenses, overrides, args.name, args.overwrite, args.round)
    _, run_summary = read_run(run_dir)
    recheck = summary["no_defense"]
    if args.round is None and abs(recheck["acc"] - run_summary["final"]["acc"]) > 1e-6:
        print(f"flain: warning: the final model scores ACC {recheck['acc']:.4f} here but {run_summary['final']['acc']:.4f} "
              "in the run: the evaluation set differs (aux split or data)", file=sys.stderr)
    return _defended(out, summary, f"aux set: {summary['aux_source']}")


def _defend_external(args: argparse.Namespace, defenses: list[str], overrides: dict[str, Any]) -> int:
    from launch.defend import defend_model

    if args.run_dir is not None:
        raise ConfigError("give RUN_DIR or --model ..., not both")
    missing = [f"--{k}" for k in ("model", "initial", "final", "aux", "out") if not getattr(args, k)]
    if missing:
        raise ConfigError(f"a model outside a run directory needs {', '.join(missing)} "
                          "(or give RUN_DIR, a run directory of `flain run`)")
    if args.round is not None or args.name is not None:
        raise ConfigError("--round and --name are for RUN_DIR; with --model the results go to --out")
    _writable("--out", Path(args.out))
    path = lambda value: Path(value) if value else None  # noqa: E731
    out, summary = defend_model(args.model, Path(args.initial), Path(args.final), Path(args.aux), Path(args.out),
                                defenses, overrides, path(args.test), path(args.triggered), args.overwrite)
    return _defended(out, summary, f"aux set: {args.aux}")


def _defended(out: Path, summary: dict[str, Any], source: str) -> int:
    print(format_table({"final": summary["no_defense"], "post_defenses": summary["post_defenses"]}))
    print(f"\nflain: results in {out} ({source})")
    if summary["status"] == "defense-failed":
        print(f"flain: post-training defense(s) FAILED: {', '.join(summary['failed_defenses'])}", file=sys.stderr)
        return EXIT_DEFENSE_FAILED
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """The paper's tables: plan the trainings, run what is missing, write the report."""
    from launch import reproduce as rep

    if args.list:
        if args.name:
            raise ConfigError("--list prints every NAME: it takes none")
        print(rep.listing())
        return 0
    if not args.name:
        raise ConfigError(f"give NAME (one of {[*rep.NAMES, 'all']}) or --list")
    if args.dry_run and args.report_only:
        raise ConfigError("--dry-run writes nothing, --report-only writes the report: give one")
    split = lambda text: [v.strip() for v in text.split(",") if v.strip()] if text else None  # noqa: E731
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds {args.seeds} is not allowed: must be 1..{MAX_SEEDS} (each seed is a training per cell)")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} is not allowed: must be >= 1")
    extra = parse_overrides(args.set)
    for key in extra:
        if key in ("run-dir", "seed"):
            raise ConfigError(f"{key} is set by flain reproduce (runs under --out, --seeds): do not --set it")
    cells = rep.check_selection(args.name, split(args.datasets), split(args.tasks))
    trainings = rep.plan(cells, args.seeds, extra)
    configs = {t.name: rep.resolved(t) for t in trainings}  # every training checked before any starts
    out = Path(args.out)
    _writable("--out", out)
    if args.dry_run:
        for t in trainings:
            state = "reused" if rep.finished(out / "runs" / t.name, configs[t.name]) else "to run"
            print(f"{t.name}  [{state}; {len(t.cells)} cells]\n  " + json.dumps(t.overrides))
        print(f"{len(cells)} cells, {len(trainings)} trainings")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if trainings and not args.report_only:  # --report-only starts nothing (a missing defense needs the data there)
        fetch(configs[trainings[0].name].dataset, configs[trainings[0].name].data_dir)
    try:
        status = rep.sweep(trainings, out, args.jobs, args.gpu, run=not args.report_only)
        data = rep.report(trainings, out)
    except RunFileError as exc:  # a run of the sweep's own, not a file the user named
        raise RunFailed(str(exc)) from None
    data["status"] = status
    atomic_text(out / "report.json", json.dumps(data, indent=1) + "\n")
    atomic_text(out / "report.md", rep.markdown(data))
    rep.plots(data, out)
    failed = [n for n, s in status.items() if s.startswith("failed")]
    print(f"flain reproduce: report in {out / 'report.md'}" + (f"; {len(failed)} trainings FAILED" if failed else ""))
    return EXIT_RUN_FAILED if failed else 0


def cmd_compose(args: argparse.Namespace) -> int:
    """Write docker-compose.yml (and the certificates and node keys it mounts)."""
    from launch.compose import COMPOSE_HEADER, compose_yaml
    from launch.tls import make_node_key, make_tls
    from launch.versions import flwr_pin

    _check_nodes(args.nodes)
    if args.num_partitions < 0 or args.first_partition < 0:
        raise ConfigError("--num-partitions and --first-partition count partitions: they cannot be negative")
    partitions = args.num_partitions or args.nodes
    if not 0 <= args.first_partition or args.first_partition + args.nodes > partitions:
        raise ConfigError(f"--first-partition {args.first_partition} with --nodes {args.nodes} does not fit "
                          f"--num-partitions {partitions}: partitions are 0..{partitions - 1}")
    if args.superlink is not None and not _host_port(args.superlink):
        raise ConfigError(f"--superlink {args.superlink!r} is not HOST:PORT (a host name or address, an IPv6 address in brackets, a port 1..65535)")
    if args.superlink is None and (args.first_partition or partitions != args.nodes):
        raise ConfigError("--first-partition and --num-partitions share the partitions out between machines: "
                          "they need --superlink (this file's SuperNodes join a SuperLink elsewhere)")
    if args.san and args.superlink is not None:
        raise ConfigError("--san names hosts in the SuperLink's certificate: a SuperNodes-only file (--superlink) "
                          "takes none; give --san to `flain compose --certs DIR` on the SuperLink's machine")
    if args.san and not args.certs:
        raise ConfigError("--san names hosts in the SuperLink's certificate: it needs --certs DIR")
    if args.superlink is not None and args.certs:
        raise ConfigError("--certs makes a new CA, which the SuperLink elsewhere does not trust: copy its ca.crt "
                          "and these partitions' node keys from the SuperLink's certs/ instead")
    try:
        hosts = certificate_hosts(*args.san)
    except ValueError as exc:
        raise ConfigError(f"--san: {exc}") from None
    out = Path(args.out)
    _output_file("--out", out)
    if out.is_file() and out.stat().st_size and not out.read_text(errors="replace").startswith(
            COMPOSE_HEADER.splitlines()[0]):
        raise ConfigError(f"--out '{out}' holds a file that `flain compose` did not write: choose another name")
    if args.certs:  # first: a certificate that cannot be made leaves no compose file behind
        certs = Path(args.certs)
        _writable("--certs", certs)
        foreign = sorted(p.name for p in certs.iterdir() if not CERT_FILES.fullmatch(p.name)) if certs.is_dir() else []
        if foreign:
            raise ConfigError(f"--certs '{certs}' holds files `flain compose` does not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}): give a new or empty directory")
        make_tls(certs, hosts)
        for i in range(args.nodes):
            make_node_key(certs, f"node{i}")
        print(f"flain: wrote a throwaway CA, the SuperLink's certificate and {args.nodes} node keys to {certs}/")
    atomic_text(out, compose_yaml(args.nodes, flwr_pin(), superlink=args.superlink,
                                  first=args.first_partition, partitions=partitions))
    out.chmod(0o644)  # a file to read and copy to the other machines, not a secret (the keys are in --certs)
    print(f"flain: wrote {args.out} ({args.nodes} SuperNodes"
          + (f", joining the SuperLink at {args.superlink})" if args.superlink else ")"))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one experiment as a Flower simulation")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a run-config key (repeatable), e.g. --set num-rounds=5")
    run.add_argument("--name", help="run directory name under runs/ (default: generated)")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run in the same run directory")
    run.add_argument("--gpu", action="store_true", help="let the clients share one GPU")
    run.add_argument("--gpu-share", type=float, default=None,
                     help="share of the GPU per client with --gpu (0.25: 4 at a time); default: as many clients "
                          "as fit in the GPU's free memory (a measured training step + a CUDA context each), "
                          "at most one per CPU core")
    run.add_argument("--verbose", "-v", action="store_true", help="show every Flower log line")
    run.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    run.add_argument("--resume", metavar="RUN_DIR", help="go on with an interrupted run after its last checkpoint "
                     "(it must have run with checkpoint-every > 0); same final result as an uninterrupted run")
    run.set_defaults(func=cmd_run)

    dep = sub.add_parser("deploy", help="run as real processes: a SuperLink and N SuperNodes on 127.0.0.1")
    dep.add_argument("--nodes", type=int, default=3, help="SuperNodes (= clients, one partition each)")
    dep.add_argument("--tls", action="store_true",
                     help="TLS with a throwaway CA, and SuperNode authentication (registered keys only)")
    dep.add_argument("--superlink-host", default="127.0.0.1", metavar="ADDRESS",
                     help="the address the SuperLink listens on (0.0.0.0: every interface, for SuperNodes on "
                          "other machines; default 127.0.0.1: this machine only)")
    dep.add_argument("--san", action="append", default=[], metavar="NAME",
                     help="with --tls: a host name or IP address the certificate is also valid for (repeatable): "
                          "the one SuperNodes on other machines dial")
    dep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run-config key")
    dep.add_argument("--name", help="run directory name under runs/ (default: generated)")
    dep.add_argument("--overwrite", action="store_true", help="replace an earlier run in the same run directory")
    dep.add_argument("--verbose", "-v", action="store_true", help="show every Flower log line")
    dep.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    dep.set_defaults(func=cmd_deploy)

    dfd = sub.add_parser("defend", help="apply post-training defenses to a finished run's saved models, "
                                        "or to any saved model (--model)")
    dfd.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run directory (with initial.pt and final.pt)")
    dfd.add_argument("--post-defenses", default="flain-cv", metavar="A,B",
                     help="defenses to apply (default: flain-cv); fedpruning needs the clients and is refused")
    dfd.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a post-training setting (flain-*), e.g. --set flain-cv-tol=0.005")
    dfd.add_argument("--name", help="label of the results under RUN_DIR/defended/ (default: from the settings)")
    dfd.add_argument("--overwrite", action="store_true", help="replace earlier results with the same label")
    dfd.add_argument("--round", type=int, default=None, metavar="R",
                     help="defend the checkpoint of round R (a run trained with --set checkpoint-every=K)")
    ext = dfd.add_argument_group("a model outside a run directory (instead of RUN_DIR)")
    ext.add_argument("--model", metavar="MODULE:FUNCTION", help="builds the model, e.g. mypackage.models:Net")
    ext.add_argument("--initial", metavar="W0.pt", help="state_dict of the model before training (W0)")
    ext.add_argument("--final", metavar="W.pt", help="state_dict of the trained model")
    ext.add_argument("--aux", metavar="AUX", help="clean aux set: .npz (images, labels) or a folder of class folders")
    ext.add_argument("--test", metavar="TEST", help="clean test set for ACC (.npz or folder; optional)")
    ext.add_argument("--triggered", metavar="TRIG",
                     help="triggered images labelled with the attacker's target, for ASR (.npz or folder; optional)")
    ext.add_argument("--out", metavar="DIR", help="where the defended state_dicts and summary.json go")
    dfd.set_defaults(func=cmd_defend)

    rp = sub.add_parser("reproduce", help="run the paper's tables/figures and write a side-by-side report")
    rp.add_argument("name", nargs="?", metavar="NAME", help="table1 ... table6, fig5, fig6 or all")
    rp.add_argument("--list", action="store_true", help="print each NAME with its cells and trainings")
    rp.add_argument("--datasets", help="only these data sets, e.g. fmnist,mnist")
    rp.add_argument("--tasks", help="only these (source-target) tasks, e.g. 0-5,0-6")
    rp.add_argument("--seeds", type=int, default=1, help="seeds per cell: 42, 43, ... (default 1)")
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a run-config key in every training, e.g. --set num-rounds=20")
    rp.add_argument("--out", default="runs/reproduce", help="report directory; trainings go to OUT/runs/")
    rp.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1; more on a GPU machine)")
    rp.add_argument("--gpu", action="store_true", help="clients share one GPU in every training")
    rp.add_argument("--dry-run", action="store_true", help="print the trainings and their settings, run nothing")
    rp.add_argument("--report-only", action="store_true",
                    help="write the report from the trainings already finished; start none")
    rp.set_defaults(func=cmd_reproduce)

    data = sub.add_parser("data", help="data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch_p = data_sub.add_parser("fetch", help="prepare a data set in the data directory")
    fetch_p.add_argument("name", help=f"one of {sorted(DATASETS)}")
    fetch_p.add_argument("--data-dir", default=default_run_config()["data-dir"])
    fetch_p.set_defaults(func=cmd_data_fetch)

    trig = sub.add_parser("triggers", help="draw the clean image, each trigger and each DBA part")
    trig.add_argument("--dataset", default="fmnist", help=f"one of {sorted(DATASETS)}")
    trig.add_argument("--data-dir", default=default_run_config()["data-dir"])
    trig.add_argument("--out", default="triggers.png", help="PNG file to write")
    trig.set_defaults(func=cmd_triggers)

    comp = sub.add_parser("compose", help="write docker-compose.yml (+ certificates and node keys)")
    comp.add_argument("--nodes", type=int, default=3)
    comp.add_argument("--out", default="docker-compose.yml")
    comp.add_argument("--certs", help="also write a throwaway CA, server certificate and node keys here")
    comp.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="a host name or IP address the SuperLink's certificate is also valid for (repeatable): "
                           "the one SuperNodes on other machines dial")
    comp.add_argument("--superlink", metavar="HOST:PORT",
                      help="SuperNodes only, joining the SuperLink at HOST:PORT on another machine")
    comp.add_argument("--first-partition", type=int, default=0, help="with --superlink: the first partition served here")
    comp.add_argument("--num-partitions", type=int, default=0, help="all partitions of the federation (default: --nodes)")
    comp.set_defaults(func=cmd_compose)

    table = sub.add_parser("table", help="ACC/ASR of finished runs side by side (markdown)")
    table.add_argument("runs", nargs="+", help="run directories")
    table.set_defaults(func=cmd_table)
    return p


INTERRUPTED = "flain: interrupted; every process started was stopped"


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (timeout, systemd, docker stop, CI) ends a command as Ctrl-C does: the cleanup
    in `finally` blocks stops every process it started. Later signals are ignored so that
    the cleanup itself (bounded by its own grace periods) is not cut short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except tuple(kind for kind, _, _ in ERRORS) as exc:
        code, what = next((code, what) for kind, code, what in ERRORS if isinstance(exc, kind))
        print(f"flain: {what}: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
