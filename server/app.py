"""ServerApp: federated training with central ACC/ASR evaluation, then the post-training
defenses on the final model, all written to the run directory.

Flow: check the configuration -> load the test split (aux set + eval set) -> build the
aggregation rule from its registry -> wrap it in `FlainDefense` (strategies/flain_defense.py,
the same wrapper users add to their own apps): it keeps W0, runs the rounds (each evaluated
centrally), then applies every post-training defense to the same trained model -> summary.json
says `completed`, or `defense-failed` naming the defenses that raised (their siblings' results
are still written).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from functools import partial
from logging import INFO

import flwr
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from attacks import malicious_clients
from experiment.config import ExperimentConfig
from experiment.data import aux_split, load, num_rounds, partition_sizes, root_split
from experiment.hardware import pick_device, training_precision
from experiment.seeds import int_seed
from models import build_model
from server.checks import check_experiment, resolved_settings
from server.post_training import make_evaluator, post_defenses
from server.results import RunDir, RunRecorder
from server.tracking import make_tracker
from strategies import AGGREGATIONS
from strategies.flain_defense import FlainDefense
from strategies.resume import kept_state, restore_state
from strategies.sampling import Sampled, sample_plan
from strategies.aggregation.reply_guard import ReplyLimits

app = ServerApp()


class TrainingProducedNoModel(RuntimeError):
    """No round aggregated a single client reply."""


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def wait_for_nodes(grid: Grid, count: int, timeout: float = 300.0) -> None:
    """Fail clearly, instead of waiting forever, when fewer than num-clients nodes connect."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {connected} nodes connected after {timeout:.0f}s but num-clients={count}: "
                "start one SuperNode per client (simulation: num-supernodes = num-clients)"
            )
        time.sleep(1)


def participation_plan(cfg: ExperimentConfig) -> Callable[[int, Sequence[int]], list[int]]:
    """(round, partitions that answered) -> those that train in it (clients-per-round, attacker-schedule)."""
    fixed = cfg.attacker_schedule == "fixed"
    return sample_plan(cfg.seed, cfg.num_clients, cfg.round_clients,
                       malicious_clients(cfg.num_clients, cfg.num_malicious, cfg.seed),
                       cfg.round_attackers if fixed else None)


def reply_limits(cfg: ExperimentConfig) -> ReplyLimits:
    """What a client's reply may claim: `num-examples` up to its partition's size as computed
    here from the clients' own split, or up to `max-examples` for every client where set."""
    if cfg.max_examples:
        return ReplyLimits.uniform(cfg.num_clients, cfg.max_examples)
    return ReplyLimits(tuple(partition_sizes(cfg)))


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = ExperimentConfig.from_run_config(context.run_config)
    check_experiment(cfg)  # bad values stop here, before anything is written
    device = pick_device()
    precision, how = training_precision(cfg, device, build_model)  # measured once, then cached for the clients
    run_dir = cfg.run_path()
    tracker = make_tracker(cfg, RunDir(run_dir).tracking_dir)
    resumed = RunDir(run_dir).resume_point(num_rounds(cfg)) if cfg.resume else 0
    recorder = RunRecorder.resume(run_dir, resumed, tracker) if cfg.resume else RunRecorder(
        run_dir,
        cfg.to_run_config() | {"run-dir": str(run_dir.resolve())},
        extra={
            "malicious_clients": sorted(malicious_clients(cfg.num_clients, cfg.num_malicious, cfg.seed)),
            "device": str(device),
            "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
            "resolved": resolved_settings(cfg) | {"precision": precision, "precision-choice": how},
        },
        tracker=tracker,
    )
    log(INFO, "Run directory: %s%s", run_dir.resolve(), f" (resumed after round {resumed})" if resumed else "")
    log(INFO, "[flain] training precision: %s (%s)", precision, how)
    try:
        _run(grid, cfg, device, recorder, resumed)
    except BaseException as exc:
        recorder.fail(f"{type(exc).__name__}: {exc}")
        log(INFO, "Run failed:\n%s", traceback.format_exc())
        raise


def _run(grid: Grid, cfg: ExperimentConfig, device: torch.device, recorder: RunRecorder, resumed: int = 0) -> None:
    images, labels = load(cfg.dataset, cfg.data_dir, train=False)
    aux_idx, _ = aux_split(cfg, labels.numpy())
    _, eval_idx = root_split(cfg, labels.numpy(), aux_idx)  # FLTrust's root set is scored by nobody
    recorder.save_aux(aux_idx)  # `flain defend` re-applies defenses with exactly this aux set
    evaluator = make_evaluator(cfg, images[eval_idx], labels[eval_idx], device)
    torch.manual_seed(int_seed(cfg.seed, "init"))  # the initial global model depends on the seed only
    model = build_model(cfg.dataset, cfg.network)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    run = RunDir(recorder.dir)
    if resumed:  # W0 as the interrupted run saved it, and its model after round `resumed`
        initial_state = run.load_model("initial", like=initial_state)
        start_state = run.load_model("", like=initial_state, rnd=resumed)
    else:
        recorder.save_model("initial", initial_state)
        start_state = initial_state
    rounds = num_rounds(cfg)
    clock = {"t": time.perf_counter()}  # the end of the last round (the first: its evaluation's start)

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        started = time.perf_counter()
        if rnd == resumed:  # the first call: round 0, or the round resumed after
            clock["t"] = started
            last = recorder.rounds[-1] if recorder.rounds else None
            if resumed and last is not None and last["round"] == resumed:  # recorded before the stop
                return MetricRecord({"acc": last["acc"], "asr": last["asr"]})
        state = arrays.to_torch_state_dict()
        m = evaluator(state)
        now = time.perf_counter()
        recorder.round(rnd, m["acc"], m["asr"], now - clock["t"], now - started)
        if cfg.checkpoint_every and rnd > resumed and rnd % cfg.checkpoint_every == 0:
            # after its round is recorded: a resume point's round is always in rounds.csv.
            # `flain defend RUN --round R` defends it; `flain run --resume RUN` goes on after it
            recorder.save_checkpoint(rnd, state, kept_state(strategy))
        if rnd > resumed:
            clock["trained"] = clock.get("trained", 0.0) + now - clock["t"]
        eta = clock.get("trained", 0.0) / max(rnd - resumed, 1) * (rounds - rnd)
        log(INFO, "[flain] round %d/%d  acc=%.4f  asr=%.4f  (%.1fs, evaluation %.1fs; about %s left in training)",
            rnd, rounds, m["acc"], m["asr"], now - clock["t"], now - started, _minutes(eta) if rnd else "?")
        clock["t"] = now
        return MetricRecord(m)

    wait_for_nodes(grid, cfg.num_clients)  # (sampled or not: every partition's node, as the split has them)
    # BatchNorm buffers are statistics, not learned: update-based rules must not flip them.
    # Clients send the whole state_dict (parameters and buffers); see models/__init__.py.
    buffers = frozenset(name for name, _ in model.named_buffers())
    strategy = AGGREGATIONS[cfg.aggregation](cfg, buffers, reply_limits(cfg))
    rule = strategy  # what the rule logged (failures, attack and defense logs) is read from it
    if cfg.sampled:
        strategy = Sampled(strategy, choose=participation_plan(cfg), num_partitions=cfg.num_clients,
                           malicious=malicious_clients(cfg.num_clients, cfg.num_malicious, cfg.seed),
                           timeout=cfg.round_timeout)
    if resumed:
        restore_state(strategy, run.resume_state(resumed))
    # W0, the rounds, then every post-training defense on the final model (saved as they come)
    defended = FlainDefense(strategy, model_fn=partial(build_model, cfg.dataset, cfg.network),
                            aux=(images[aux_idx], labels[aux_idx]), defenses=post_defenses(cfg),
                            evaluate_fn=evaluator, sink=recorder, device=device)
    result = defended.start(grid=grid, initial_arrays=ArrayRecord(start_state), num_rounds=rounds,
                            timeout=cfg.round_timeout, evaluate_fn=evaluate, start_round=resumed + 1,
                            w0=ArrayRecord(initial_state) if resumed else None)
    if not result.undefended:
        raise TrainingProducedNoModel("no round produced an aggregated model: every client failed or was refused")
    recorder.finish(client_failures=getattr(rule, "failures", []),
                    failed_defenses=[name for name, report in result.reports.items() if "error" in report],
                    attack_log=getattr(rule, "attack_log", []), defense_log=getattr(rule, "defense_log", []),
                    participation=getattr(strategy, "participation", []))
