"""ServerApp: federated training with central ACC/ASR evaluation, then post-training
defenses on the final model, all written to the run directory."""

from __future__ import annotations

import time
import traceback
from logging import ERROR, INFO

import flwr
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from attacks import malicious_clients, trigger_scheme
from experiment.config import ExperimentConfig
from experiment.data import DATASETS, DatasetSpec, load, split_test, to_float
from models import build_model, pick_device, resolve_precision
from server.evaluation import Evaluator
from server.results import RunRecorder, format_table
from strategies import AGGREGATIONS, POST_DEFENSES
from strategies.aggregation import krum_f, rlr_theta
from strategies.post_training import PostTrainingInput

app = ServerApp()


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


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = ExperimentConfig.from_run_config(context.run_config)  # bad values stop here
    spec = DATASETS[cfg.dataset]
    device = pick_device()

    run_dir = cfg.run_path()
    recorder = RunRecorder(
        run_dir,
        cfg.to_run_config() | {"run-dir": str(run_dir.resolve())},
        extra={
            "malicious_clients": sorted(malicious_clients(cfg.num_clients, cfg.num_malicious, cfg.seed)),
            "device": str(device),
            "versions": {"flwr": flwr.__version__, "torch": torch.__version__},
            # what the automatic (0 / -1 / auto) settings became in this run
            "resolved": {
                "min-clients": cfg.min_replies,
                "rlr-theta": rlr_theta(cfg),
                "krum-f": krum_f(cfg),
                "precision (server device)": resolve_precision(cfg.precision, device),
            },
        },
    )
    log(INFO, "Run directory: %s", run_dir.resolve())
    try:
        _run(grid, cfg, spec, device, recorder)
    except BaseException as exc:
        recorder.fail(f"{type(exc).__name__}: {exc}")
        log(INFO, "Run failed:\n%s", traceback.format_exc())
        raise


def _run(grid: Grid, cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device, recorder: RunRecorder) -> None:
    images, labels = load(cfg.dataset, cfg.data_dir, train=False)
    aux_idx, eval_idx = split_test(len(labels), cfg.aux_size, cfg.seed)
    aux_x, aux_y = images[aux_idx], labels[aux_idx]
    evaluator = Evaluator(  # ASR always with the whole pattern (DBA: all parts together)
        build_model(cfg.dataset).to(device),
        images[eval_idx], labels[eval_idx], trigger_scheme(cfg, *spec.shape[1:]).full,
        cfg.source_label, cfg.target_label,
    )
    defenses = {name: POST_DEFENSES[name](cfg) for name in cfg.post_defense_names}

    torch.manual_seed(cfg.seed)  # the initial global model depends on the seed only
    model = build_model(cfg.dataset)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    recorder.save_model("initial", initial_state)

    clock = {"t": time.perf_counter()}

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        seconds = time.perf_counter() - clock["t"]
        m = evaluator(arrays.to_torch_state_dict())
        recorder.round(rnd, m["acc"], m["asr"], seconds if rnd else 0.0)
        log(INFO, "[flain] round %d/%d  acc=%.4f  asr=%.4f  (%.1fs)", rnd, cfg.num_rounds, m["acc"], m["asr"], seconds)
        clock["t"] = time.perf_counter()
        return MetricRecord(m)

    def post_training(grid: Grid, initial: ArrayRecord, final: ArrayRecord) -> None:
        final_state = final.to_torch_state_dict()
        recorder.save_model("final", final_state)
        trained = build_model(cfg.dataset).to(device)
        trained.load_state_dict(final_state)
        inp = PostTrainingInput(
            model=trained, initial_state=initial.to_torch_state_dict(),
            aux_images=to_float(aux_x), aux_labels=aux_y,
            grid=grid, strategy=strategy, last_round=cfg.num_rounds,
        )
        for name, defense in defenses.items():  # side by side, each on the same final model
            started = time.perf_counter()
            try:
                state, info = defense.apply(inp)
            except Exception as exc:  # one broken defense must not cost the others
                log(ERROR, "post-defense %s failed:\n%s", name, traceback.format_exc())
                recorder.post_defense(name, {"error": f"{type(exc).__name__}: {exc}"})
                continue
            seconds = time.perf_counter() - started
            m = evaluator(state)
            recorder.save_model(name, state)
            recorder.post_defense(name, {**m, "seconds": seconds, **info})
            log(INFO, "[flain] post-defense %s: acc=%.4f asr=%.4f (%.1fs) %s", name, m["acc"], m["asr"], seconds, info)

    wait_for_nodes(grid, cfg.num_clients)
    # BatchNorm buffers are statistics, not learned: update-based rules must not flip them
    buffers = frozenset(name for name, _ in model.named_buffers())
    strategy = AGGREGATIONS[cfg.aggregation](cfg, post_training, buffers)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_state),
        num_rounds=cfg.num_rounds,
        timeout=cfg.round_timeout,
        evaluate_fn=evaluate,
    )
    summary = recorder.finish(client_failures=strategy.failures)
    log(INFO, "[flain] results\n%s", format_table(summary))
