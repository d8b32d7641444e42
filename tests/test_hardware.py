"""Device and precision choice: measured on the machine, cached, never guessed from flags."""

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from experiment import hardware
from experiment.config import ConfigError
from experiment.hardware import CACHE_NAME, autocast, choose, resolve_precision


def _tiny() -> nn.Module:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3), relu=nn.ReLU(), flat=nn.Flatten(),
                                     fc=nn.Linear(4 * 6 * 6, 3)))


def test_choose_takes_bf16_only_when_clearly_faster():
    assert choose(fp32_seconds=8.3, bf16_seconds=9.9) == "fp32"  # the AVX512-BF16 Xeon
    assert choose(fp32_seconds=56.1, bf16_seconds=32.1) == "bf16"  # the EPYC
    assert choose(fp32_seconds=1.0, bf16_seconds=0.99) == "fp32"  # within noise: keep fp32


def test_auto_on_cpu_measures_once_then_uses_the_cache(tmp_path, monkeypatch):
    calls = []
    real = hardware.time_training_steps

    def counted(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(hardware, "time_training_steps", counted)
    cpu = torch.device("cpu")
    choice, how = resolve_precision("auto", cpu, "tiny", _tiny, (1, 8, 8), 3, tmp_path)
    assert calls == ["fp32", "bf16"] and how.startswith("measured")
    entries = json.loads((tmp_path / CACHE_NAME).read_text())
    (entry,) = entries.values()
    assert entry["choice"] == choice == choose(entry["fp32_step_seconds"], entry["bf16_step_seconds"])
    again, how = resolve_precision("auto", cpu, "tiny", _tiny, (1, 8, 8), 3, tmp_path)
    assert again == choice and how.startswith("cached") and len(calls) == 2  # no second measurement


@pytest.mark.parametrize("cached", ["fp32", "bf16"])
def test_cached_choice_is_what_auto_returns(tmp_path, cached):
    key = f"{hardware._cpu_name()} | torch {torch.__version__} | tiny"
    (tmp_path / CACHE_NAME).write_text(json.dumps(
        {key: {"choice": cached, "fp32_step_seconds": 1.0, "bf16_step_seconds": 1.0}}))
    assert resolve_precision("auto", torch.device("cpu"), "tiny", _tiny, (1, 8, 8), 3, tmp_path)[0] == cached
    # another model on the same machine is measured on its own
    assert resolve_precision("auto", torch.device("cpu"), "other", _tiny, (1, 8, 8), 3, tmp_path)[1].startswith(
        "measured")


def test_explicit_precision_is_kept_and_bad_names_refused(tmp_path):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu, "tiny", _tiny, (1, 8, 8), 3, tmp_path) == ("fp32", "given")
    assert resolve_precision("bf16", cpu, "tiny", _tiny, (1, 8, 8), 3, tmp_path) == ("bf16", "given")
    assert not (tmp_path / CACHE_NAME).exists()
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", cpu, "tiny", _tiny, (1, 8, 8), 3, tmp_path)
    with pytest.raises(ConfigError, match="precision='fp16'"):
        hardware.check_precision("fp16")


def test_autocast_switches_matmul_dtype():
    cpu = torch.device("cpu")
    with autocast(cpu, "bf16"):
        assert torch.nn.Linear(4, 4)(torch.rand(2, 4)).dtype == torch.bfloat16
    with autocast(cpu, "fp32"):
        assert torch.nn.Linear(4, 4)(torch.rand(2, 4)).dtype == torch.float32


def test_clients_per_gpu_fill_the_memory_within_cores_and_clients():
    from experiment.hardware import CUDA_CONTEXT_BYTES, GPU_MEMORY_USE, clients_per_gpu

    gib = 2**30
    per = CUDA_CONTEXT_BYTES + gib // 2
    assert clients_per_gpu(80 * gib, gib // 2, cpus=128, num_clients=100) == int(GPU_MEMORY_USE * 80 * gib // per)
    assert clients_per_gpu(80 * gib, gib // 2, cpus=16, num_clients=100) == 16  # one core per actor
    assert clients_per_gpu(80 * gib, gib // 2, cpus=16, num_clients=10) == 10  # no more than the clients
    assert clients_per_gpu(gib // 2, gib, cpus=16, num_clients=10) == 1  # never zero


def test_gpu_share_must_be_a_share(capsys):
    from launch.cli import main

    assert main(["run", "--gpu", "--gpu-share", "1.5", "--dry-run"]) == 2
    assert "--gpu-share 1.5 is not allowed" in capsys.readouterr().err
