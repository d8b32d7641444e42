"""The paper's networks, one builder per data set (registry: name -> builder).

Every model is an `nn.Sequential` with named layers, so the FLAIN layer tau can be
named ("fc1") and the network split at it: the body up to tau runs once over the aux
set, only the head from tau on is re-evaluated during the threshold search.

BatchNorm: clients send the whole `state_dict` (parameters AND buffers), so running
statistics travel and are averaged like weights; post-training defenses touch only
tau's weight. The Fashion-MNIST network has no BatchNorm.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import nn

from experiment.config import ConfigError, ExperimentConfig
from experiment.data import DATASETS, to_float
from experiment.hardware import inference_batch


class Standardize(nn.Module):
    """(x - mean) / std per channel with fixed constants: models take images in [0, 1].
    The constants are non-persistent buffers: they follow .to(device) but are not in the
    state_dict (nothing for FedAvg or a defense to touch)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel mean, std


def fmnist_cnn(num_classes: int, stats: Stats) -> nn.Sequential:
    """FLAIN paper, FMNIST: 2 conv + 4 FC (28x28x1 -> 9216 -> 256 -> 128 -> 64 -> 10).

    Dropout 0.5 after the pooling and after fc1. (A third one after fc2 cost a measured
    0.02-0.04 ACC after the same number of steps, which a 2-core demo cannot afford.)"""
    return nn.Sequential(
        OrderedDict(
            std=Standardize(*stats),
            conv1=nn.Conv2d(1, 32, 3),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(32, 64, 3),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            drop1=nn.Dropout(0.5),
            flatten=nn.Flatten(),
            fc1=nn.Linear(9216, 256),  # tau: its inputs are post-ReLU conv features
            relu3=nn.ReLU(),
            drop2=nn.Dropout(0.5),
            fc2=nn.Linear(256, 128),
            relu4=nn.ReLU(),
            fc3=nn.Linear(128, 64),
            relu5=nn.ReLU(),
            fc4=nn.Linear(64, num_classes),
        )
    )


def mnist_cnn(num_classes: int, stats: Stats) -> nn.Sequential:
    """FLAIN paper, MNIST and EMNIST: 2 conv + 2 FC (28x28x1 -> 3136 -> 128 -> classes)."""
    return nn.Sequential(
        OrderedDict(
            std=Standardize(*stats),
            conv1=nn.Conv2d(1, 32, 3, padding=1),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(32, 64, 3, padding=1),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            drop1=nn.Dropout(0.5),
            flatten=nn.Flatten(),
            fc1=nn.Linear(3136, 128),  # tau
            relu3=nn.ReLU(),
            drop2=nn.Dropout(0.5),
            fc2=nn.Linear(128, num_classes),
        )
    )


def _conv_bn(cin: int, cout: int) -> list[tuple[str, nn.Module]]:
    return [("conv", nn.Conv2d(cin, cout, 3, padding=1)), ("bn", nn.BatchNorm2d(cout)), ("relu", nn.ReLU())]


def cifar_cnn(num_classes: int, stats: Stats) -> nn.Sequential:
    """FLAIN paper, CIFAR-10: 6 conv with BatchNorm + 3 FC
    (64, 128, pool, 256, 256, pool, 256, 256, pool; dropout; 4096 -> 1024 -> 512 -> 10)."""
    layers: list[tuple[str, nn.Module]] = [("std", Standardize(*stats))]
    widths = [(3, 64), (64, 128), "pool", (128, 256), (256, 256), "pool", (256, 256), (256, 256), "pool"]
    conv, pool = 0, 0
    for item in widths:
        if item == "pool":
            pool += 1
            layers.append((f"pool{pool}", nn.MaxPool2d(2)))
            continue
        conv += 1
        layers += [(f"{kind}{conv}", module) for kind, module in _conv_bn(*item)]
    layers += [
        ("drop1", nn.Dropout(0.5)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(4096, 1024)),  # tau
        ("relu_fc1", nn.ReLU()),
        ("drop2", nn.Dropout(0.5)),
        ("fc2", nn.Linear(1024, 512)),
        ("relu_fc2", nn.ReLU()),
        ("fc3", nn.Linear(512, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


MODELS: dict[str, Callable[[int, Stats], nn.Sequential]] = {
    "mnist": mnist_cnn,
    "fmnist": fmnist_cnn,
    "emnist": mnist_cnn,
    "cifar10": cifar_cnn,
}


def build_model(dataset: str) -> nn.Sequential:
    """The paper's network for `dataset`, standardizing with its statistics."""
    if dataset not in MODELS:
        raise KeyError(f"no model for dataset {dataset!r}; known: {sorted(MODELS)}")
    spec = DATASETS[dataset]
    return MODELS[dataset](spec.num_classes, (spec.mean, spec.std))


def first_linear_after_conv(model: nn.Sequential) -> str:
    """Name of the first Linear layer that follows the last convolution (the paper's tau)."""
    names = list(model._modules)
    convs = [i for i, n in enumerate(names) if isinstance(model._modules[n], nn.Conv2d)]
    start = convs[-1] + 1 if convs else 0
    for name in names[start:]:
        if isinstance(model._modules[name], nn.Linear):
            return name
    raise ValueError("model has no Linear layer after its convolutions")


def resolve_tau(model: nn.Sequential, layer: str) -> str:
    """The Linear layer named `layer`, or the paper's default for 'auto'."""
    if layer == "auto":
        return first_linear_after_conv(model)
    linears = [n for n, m in model._modules.items() if isinstance(m, nn.Linear)]
    if layer not in linears:
        raise ValueError(f"flain-layer={layer!r} is not a Linear layer of the model: choose 'auto' or one of {linears}")
    return layer


def split_at(model: nn.Sequential, layer: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(body, head): body(x) is the input of Linear `layer`, head(body(x)) == model(x)."""
    i = list(model._modules).index(resolve_tau(model, layer))
    return model[:i], model[i:]


@torch.no_grad()
def inference_batches(module: nn.Module, images: torch.Tensor, batch: int | None = None) -> Iterator[torch.Tensor]:
    """`module`'s outputs on `images` (uint8 or float; N x C x H x W fed channels-last: same
    math, faster convolutions), `batch` at a time (default: the device's `inference_batch`),
    on the module's device. The module's weights keep their layout."""
    device = next(module.parameters(), images).device
    batch = batch or inference_batch(device)
    layout = torch.channels_last if images.dim() == 4 else torch.contiguous_format
    for i in range(0, len(images), batch):
        yield module(to_float(images[i : i + batch]).to(device, memory_format=layout))


def check(cfg: ExperimentConfig) -> None:
    """`flain-layer` names a Linear layer of the data set's model (raises ConfigError)."""
    try:
        resolve_tau(build_model(cfg.dataset), cfg.flain_layer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
