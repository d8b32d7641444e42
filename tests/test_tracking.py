"""tracker=tensorboard: the events written are the values given (read back with TensorBoard's
own reader), and the setting is checked before anything runs."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiment.config import ConfigError, ExperimentConfig
from server.tracking import TensorBoardTracker, check


def test_tensorboard_events_hold_the_rounds_the_defenses_and_the_search_curve(tmp_path):
    tracker = TensorBoardTracker(tmp_path)
    for rnd, (acc, asr) in enumerate([(0.1, 0.0), (0.8, 0.9), (0.85, 0.95)]):
        tracker.round(rnd, acc, asr, seconds=2.0 + rnd)
    tracker.defense("flain", {"acc": 0.84, "asr": 0.01, "flipped": 120, "threshold": 0.004, "exhausted": False,
                              "layer": "fc1", "search_curve": {"flipped": [3, 40, 120], "aux_acc": [0.9, 0.88, 0.87]}})
    tracker.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()

    def series(tag):
        return [(e.step, pytest.approx(e.value, abs=1e-6)) for e in events.Scalars(tag)]

    assert series("round/acc") == [(0, 0.1), (1, 0.8), (2, 0.85)]
    assert series("round/asr") == [(0, 0.0), (1, 0.9), (2, 0.95)]
    assert series("round/seconds") == [(0, 2.0), (1, 3.0), (2, 4.0)]
    assert series("defense/flain/asr") == [(0, 0.01)] and series("defense/flain/flipped") == [(0, 120)]
    assert series("search/flain/aux_acc") == [(3, 0.9), (40, 0.88), (120, 0.87)]
    assert not any(tag.endswith(("exhausted", "layer")) for tag in events.Tags()["scalars"])  # not numbers


def test_an_unknown_tracker_is_refused_before_the_run():
    with pytest.raises(ConfigError, match="tracker"):
        check(ExperimentConfig.defaults(tracker="wandb"))
