"""Where the arithmetic runs: the device, and the training precision.

The device is chosen at run time (CUDA when the process sees a GPU), never fixed.
`precision=auto` picks bf16 autocast only where it is faster: on CUDA when the GPU
supports bf16; on a CPU it is measured once (a few training steps of the run's own model
in fp32 and in bf16, one thread, as a simulated client trains) and the choice is cached
in the data directory, keyed by CPU, torch version and model. CPU flags do not tell:
bf16 was 1.2x slower than fp32 on one AVX512-BF16 Xeon and 1.75x faster on an EPYC.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from experiment.config import ExperimentConfig, choice
from experiment.data import DATASETS

PRECISIONS = ("auto", "fp32", "bf16")
CACHE_NAME = "precision-cache.json"
BF16_MARGIN = 0.95  # bf16 must be at least 5% faster to be chosen


def pick_device() -> torch.device:
    """CUDA when this process sees a GPU, else CPU (decided at run time, never fixed)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_batch(device: torch.device) -> int:
    """Images per forward pass when only predicting. On a CPU a small batch keeps each
    layer's activations in cache: the central FMNIST evaluation (10,782 images, 2 threads)
    took 4.6 s at batch 1000 and 1.4 s at 64, measured; a GPU wants large batches."""
    return 1024 if device.type == "cuda" else 64


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for training: bf16 matmuls/convs, fp32 weights and optimizer state.
    'fp32' disables it."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def choose(fp32_seconds: float, bf16_seconds: float) -> str:
    """The faster precision from two timings of the same work (ties go to fp32)."""
    return "bf16" if bf16_seconds < BF16_MARGIN * fp32_seconds else "fp32"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_training_steps(model: nn.Module, sample_shape: tuple[int, ...], num_classes: int, precision: str,
                        batch: int = 256, steps: int = 3) -> float:
    """Seconds per Adam step of `model` on random data, one CPU thread, after a warm-up step."""
    device = next(model.parameters()).device
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, *sample_shape, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(steps + 1):
            if i == 1:
                started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - started) / steps
    finally:
        torch.set_num_threads(threads)


def resolve_precision(precision: str, device: torch.device, model_name: str,
                      make_model: Callable[[], nn.Module], sample_shape: tuple[int, ...], num_classes: int,
                      cache_dir: str | Path | None = None) -> tuple[str, str]:
    """(fp32 | bf16, how it was decided). 'auto' on a CPU measures once per CPU, torch
    version and model, and caches the choice in `cache_dir` (nothing cached if None)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed: choose one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision, "given"
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return ("bf16" if supported else "fp32"), f"CUDA bf16 support: {supported}"
    key = f"{_cpu_name()} | torch {torch.__version__} | {model_name}"
    cache = Path(cache_dir) / CACHE_NAME if cache_dir is not None else None
    entries: dict[str, dict] = {}
    if cache is not None and cache.is_file():
        try:
            entries = json.loads(cache.read_text())
        except ValueError:
            entries = {}  # a broken cache is measured again
    if key in entries and entries[key].get("choice") in ("fp32", "bf16"):
        hit = entries[key]
        return hit["choice"], f"cached measurement ({_describe(hit)})"
    timings = {p: time_training_steps(make_model().to(device), sample_shape, num_classes, p) for p in ("fp32", "bf16")}
    entry = {"choice": choose(timings["fp32"], timings["bf16"]), **{f"{p}_step_seconds": t for p, t in timings.items()}}
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{time.monotonic_ns()}")
            tmp.write_text(json.dumps(entries | {key: entry}, indent=2) + "\n")
            tmp.replace(cache)  # atomic: concurrent processes never read half a file
        except OSError:
            pass  # an unwritable cache only costs a measurement next time
    return entry["choice"], f"measured ({_describe(entry)})"


def _describe(entry: dict) -> str:
    return f"fp32 {entry['fp32_step_seconds']:.3f} s/step, bf16 {entry['bf16_step_seconds']:.3f} s/step"


def check_precision(precision: str) -> None:
    """The precision is a known name (raises ConfigError naming the allowed ones)."""
    choice("precision", precision, PRECISIONS)


def training_precision(cfg: ExperimentConfig, device: torch.device,
                       build_model: Callable[..., nn.Module]) -> tuple[str, str]:
    """`resolve_precision` for the run's data set and model, cached in its data directory."""
    spec = DATASETS[cfg.dataset]
    return resolve_precision(cfg.precision, device, f"{cfg.dataset} {cfg.network} model",
                             lambda: build_model(cfg.dataset, cfg.network),
                             spec.shape, spec.num_classes, cfg.data_dir)


# ---- one GPU shared by the simulated clients ---------------------------------------------------
CUDA_CONTEXT_BYTES = 600 * 2**20  # each Ray actor is a process with its own CUDA context (~0.5 GB)
GPU_MEMORY_USE = 0.9  # leave a tenth for the server's evaluation, defenses and fragmentation


def clients_per_gpu(free_bytes: int, step_peak_bytes: int, cpus: int, num_clients: int) -> int:
    """How many clients can train on one GPU at once: as many as fit in `GPU_MEMORY_USE` of
    its free memory (each needs its CUDA context and a training step's peak), at most one per
    CPU core (an actor feeds its GPU work from one core) and at most the number of clients."""
    per_client = CUDA_CONTEXT_BYTES + step_peak_bytes
    fit = int(GPU_MEMORY_USE * free_bytes // per_client)
    return max(1, min(fit, cpus, num_clients))


def training_step_peak(model: nn.Module, sample_shape: tuple[int, ...], num_classes: int, batch: int,
                       precision: str) -> int:
    """Peak CUDA memory (bytes) of one Adam step of `model` at `batch` in `precision`: weights,
    gradients, optimizer state and activations, measured on the GPU."""
    device = torch.device("cuda")
    model = model.to(device).train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    optimizer = torch.optim.Adam(model.parameters())
    x = torch.rand(batch, *sample_shape, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    with autocast(device, precision):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, optimizer, x, y, loss
    torch.cuda.empty_cache()
    return int(peak)


def gpu_share(cfg: ExperimentConfig, build_model: Callable[..., nn.Module], cpus: int) -> tuple[float, str]:
    """Flower's `client-resources-num-gpus` for `flain run --gpu`: 1 / (clients at once), and
    how it was decided (the GPU's free memory, a measured training step, the CPU cores)."""
    free, total = torch.cuda.mem_get_info()
    spec = DATASETS[cfg.dataset]
    precision = "bf16" if cfg.precision == "auto" and torch.cuda.is_bf16_supported() else (
        "fp32" if cfg.precision == "auto" else cfg.precision)
    peak = training_step_peak(build_model(cfg.dataset, cfg.network), spec.shape, spec.num_classes, cfg.batch_size, precision)
    count = clients_per_gpu(free, peak, cpus, cfg.num_clients)
    return 1.0 / count, (f"{count} clients at once: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, "
                         f"a training step peaks at {peak / 2**20:.0f} MiB + {CUDA_CONTEXT_BYTES / 2**20:.0f} MiB "
                         f"CUDA context per client, {cpus} CPU cores")
