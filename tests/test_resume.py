"""Resume (strategies/resume.py, RunDir.resume_point, `flain run --resume`): what a strategy
keeps survives a checkpoint, a resumed loop is told the true rounds, and a killed run resumed
from its checkpoint ends where the uninterrupted run ends."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from experiment.config import ExperimentConfig
from launch.superlink import SOURCE_ROOT
from server.results import RunDir, RunFileError, RunRecorder
from strategies.resume import Offset, kept_state, restore_state
from strategies.sampling import Sampled
from tests.grids import LocalGrid, build_rule, train_metrics

N = 4


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _foolsgold():
    return build_rule("foolsgold", ExperimentConfig.defaults(num_clients=N, aggregation="foolsgold"))


def _round(strategy, rnd: int, updates: dict[int, np.ndarray]):
    """One round: node p + 1 (partition p) sends w = updates[p]; the aggregate's w."""
    sent = list(strategy.configure_train(rnd, ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
                                         ConfigRecord(), LocalGrid(N)))
    replies = [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(updates[m.metadata.dst_node_id - 1])}),
                                           "metrics": train_metrics(100, m.metadata.dst_node_id - 1)}), reply_to=m)
               for m in sent]
    arrays, _ = strategy.aggregate_train(rnd, replies)
    return None if arrays is None else arrays["w"].numpy()


# partitions 0 and 1 are sybils in rounds 1 and 2 (the same update); in round 3 they differ. With
# its histories FoolsGold still gives them weight 0; a FoolsGold that lost them gives 0 weight 1.
UPDATES = [{p: np.array(u, np.float32) for p, u in enumerate(us)} for us in (
    [[0.1, -0.1, 0.6], [0.1, -0.1, 0.6], [1.3, 0.9, -0.7], [-1.3, -0.6, 0.0]],
    [[-2.3, -0.2, -1.2], [-2.3, -0.2, -1.2], [0.4, 1.0, -0.1], [1.4, -0.7, 0.4]],
    [[0.9, 0.1, -0.7], [-0.9, -0.5, 0.2], [-1.0, -0.2, -0.2], [0.5, 0.2, 0.4]],
)]


def test_foolsgold_resumed_from_its_saved_state_aggregates_as_if_never_stopped():
    """Oracle: the same strategy object going on uninterrupted. FoolsGold's weights depend on
    every earlier round (its histories): a strategy that lost them aggregates differently."""
    goes_on = _foolsgold()
    for rnd in (1, 2):
        _round(goes_on, rnd, UPDATES[rnd - 1])
    saved = io.BytesIO()
    torch.save(kept_state(goes_on), saved)  # as a checkpoint holds it (results.RunRecorder)
    saved.seek(0)
    expected = _round(goes_on, 3, UPDATES[2])

    resumed = _foolsgold()
    restore_state(resumed, torch.load(saved, weights_only=True))
    assert _round(resumed, 3, UPDATES[2]) == pytest.approx(expected)
    assert expected == pytest.approx((UPDATES[2][2] + UPDATES[2][3]) / 2)  # the sybils got weight 0
    assert resumed.defense_log == goes_on.defense_log and len(resumed.defense_log) == 3
    fresh = _foolsgold()  # without the state: another aggregate (the test can tell)
    assert not np.allclose(_round(fresh, 3, UPDATES[2]), expected)


def test_kept_state_covers_the_wrappers_and_refuses_another_strategy_whole():
    rule = _foolsgold()
    sampled = Sampled(rule, choose=lambda rnd, available: [0, 1], num_partitions=N)
    sampled.participation = [{"round": 1, "partitions": [0, 1], "unreachable": [], "attackers": 0}]
    rule.failures.append({"round": 1, "node": 3, "partition": 2, "kind": "rejected", "reason": "x"})
    state = kept_state(sampled)
    assert set(state) == {"Sampled", "GuardedFoolsGold"}
    assert set(state["GuardedFoolsGold"]) == {"failures", "attack_log", "defense_log", "histories"}
    other = build_rule("fedavg", ExperimentConfig.defaults(num_clients=N))
    with pytest.raises(ValueError, match="saved state is of"):
        restore_state(other, state)
    assert other.failures == []  # nothing was put back
    again = Sampled(_foolsgold(), choose=lambda rnd, available: [0, 1], num_partitions=N)
    restore_state(again, state)
    assert again.participation == sampled.participation and again.failures == rule.failures


def test_offset_tells_the_rule_and_the_clients_the_true_round():
    rule = _foolsgold()
    loop = Offset(rule, 2)
    sent = list(loop.configure_train(1, ArrayRecord({"w": Array(np.zeros(3, np.float32))}), ConfigRecord(),
                                     LocalGrid(N)))
    assert {m.content["config"]["server-round"] for m in sent} == {3}  # client seeds are per true round
    replies = [Message(content=RecordDict({"arrays": ArrayRecord({"w": Array(UPDATES[0][m.metadata.dst_node_id - 1])}),
                                           "metrics": train_metrics(100, m.metadata.dst_node_id - 1)}), reply_to=m)
               for m in sent]
    loop.aggregate_train(1, replies)
    assert [entry["round"] for entry in rule.defense_log] == [3]
    seen = []
    loop.shifted(lambda rnd, arrays: seen.append(rnd))(0, None)
    assert seen == [2]


def _recorded_run(tmp_path, status: str, saved_rounds: dict[int, bool]):
    """A run directory with rounds 0..4 and checkpoints of `saved_rounds` (round -> with state)."""
    recorder = RunRecorder(tmp_path / "run", {"seed": 1}, extra={})
    for rnd in range(5):
        recorder.round(rnd, 0.5, 0.1, 1.0, 0.5)
    for rnd, with_state in saved_rounds.items():
        recorder.save_checkpoint(rnd, {"w": torch.zeros(2)}, {"X": {"a": [rnd]}} if with_state else None)
    recorder.summary["status"] = status
    recorder._write_summary()
    return RunDir(recorder.dir)


def test_resume_point_is_the_last_round_with_model_and_state(tmp_path):
    run = _recorded_run(tmp_path, "interrupted", {1: True, 2: True, 3: False})
    assert run.resume_point(4) == 2  # round 3 saved its model only
    assert run.resume_state(2) == {"X": {"a": [2]}}
    resumed = RunRecorder.resume(run.path, 2)
    assert [r["round"] for r in RunDir(run.path).rounds()] == [0, 1, 2]
    summary = RunDir(run.path).summary()
    assert summary["status"] == "running" and summary["resumed"] == [{"after_round": 2, "was": "interrupted"}]
    assert resumed.summary["final"]["round"] == 2


def test_only_the_newest_strategy_state_is_kept_and_every_model(tmp_path):
    run = _recorded_run(tmp_path, "interrupted", {1: True, 2: True, 3: True})
    assert run.checkpoint_rounds() == [1, 2, 3] and run.resume_rounds() == [3]


@pytest.mark.parametrize("status, saved, message", [
    ("completed", {1: True}, "has finished"),
    ("interrupted", {1: False}, "checkpoint-every > 0"),
    ("failed", {}, "checkpoint-every > 0"),
])
def test_resume_point_refuses_what_cannot_be_resumed(tmp_path, status, saved, message):
    run = _recorded_run(tmp_path, status, saved)
    with pytest.raises(RunFileError, match=message):
        run.resume_point(4)


def test_a_state_file_of_another_round_is_refused(tmp_path):
    run = _recorded_run(tmp_path, "failed", {2: True})
    os.replace(run.path / "checkpoints" / "round-2.state.pt", run.path / "checkpoints" / "round-1.state.pt")
    torch.save({"w": torch.zeros(2)}, run.path / "checkpoints" / "round-1.pt")
    with pytest.raises(RunFileError, match="not the strategy state of round 1"):
        run.resume_state(1)


def test_resume_takes_no_other_settings(flain_cli, tmp_path):
    proc = flain_cli("run", "--resume", str(tmp_path), "--set", "seed=1")
    assert proc.returncode == 2 and "takes no --set" in proc.stderr


# ---- the real thing ----------------------------------------------------------------
def _flain(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *args]


SETTINGS = ["--set", "num-clients=4", "--set", "clients-per-round=3", "--set", "mcr=0.25",
            "--set", "aggregation='foolsgold'", "--set", "num-rounds=4", "--set", "checkpoint-every=1",
            "--set", "train-fraction=0.05", "--set", "post-defenses='flain'",
            "--set", f"data-dir='{SOURCE_ROOT / 'data'}'"]


@pytest.mark.slow
def test_a_run_killed_after_round_2_of_4_and_resumed_ends_as_the_uninterrupted_run(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(_flain("run", *SETTINGS, "--set", f"run-dir='{whole}'"), cwd=SOURCE_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(_flain("run", *SETTINGS, "--set", f"run-dir='{killed}'"), cwd=SOURCE_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "round-2.state.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before round 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert RunDir(killed).status() == "interrupted"
    after = RunDir(killed).resume_point(4)
    assert 2 <= after < 4

    resumed = subprocess.run(_flain("run", "--resume", str(killed)), cwd=SOURCE_ROOT,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {killed} after round {after} of 4" in resumed.stdout

    a, b = RunDir(whole), RunDir(killed)
    final_a, final_b = (torch.load(r.model_file("final"), weights_only=True) for r in (a, b))
    for key in final_a:  # the same seeded streams, the same order: equal up to float reordering
        assert torch.allclose(final_a[key].float(), final_b[key].float(), atol=1e-6), key
    assert [(r["round"], r["acc"], r["asr"]) for r in a.rounds()] == [(r["round"], r["acc"], r["asr"]) for r in b.rounds()]
    sa, sb = a.summary(), b.summary()
    assert sb["status"] == "completed" and sb["resumed"][0]["after_round"] == after
    for key in ("participation", "defense_log"):  # FoolsGold's weights: its histories came back
        assert json.dumps(sa[key], sort_keys=True) == json.dumps(sb[key], sort_keys=True), key
    no_node = lambda log: [{k: v for k, v in e.items() if k != "node"} for e in log]  # noqa: E731 - ids are per run
    assert no_node(sa["attack_log"]) == no_node(sb["attack_log"]) and sa["client_failures"] == sb["client_failures"] == []
    assert sb["post_defenses"]["flain"]["acc"] == pytest.approx(sa["post_defenses"]["flain"]["acc"])


@pytest.mark.parametrize("damage, message", [
    (lambda s: s["GuardedFoolsGold"].update(failures="not a list"), "failures is a str, expected a list"),
    (lambda s: s["GuardedFoolsGold"].update(histories={"0": torch.zeros(3)}), "keys that are not partition ids"),
    (lambda s: s["GuardedFoolsGold"].update(histories={0: torch.zeros(3), 1: torch.zeros(4)}), "different lengths"),
    (lambda s: s["GuardedFoolsGold"].update(histories={0: torch.full((3,), float("nan"))}), "not finite vectors"),
    (lambda s: s["GuardedFoolsGold"].update(attack_log=[1, 2]), "not records"),
])
def test_a_damaged_state_is_refused_whole(damage, message):
    rule = _foolsgold()
    _round(rule, 1, UPDATES[0])
    state = kept_state(rule)
    damage(state)
    fresh = _foolsgold()
    with pytest.raises(ValueError, match=message):
        restore_state(fresh, state)
    assert fresh.histories == {} and fresh.defense_log == []  # nothing was put back
