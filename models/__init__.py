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

from experiment.config import ConfigError, ExperimentConfig, choice
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


def fmnist_cnn(num_classes: int, stats: Stats, dropouts: int = 4) -> nn.Sequential:
    """FLAIN paper, FMNIST: 2 conv + 4 FC (28x28x1 -> 9216 -> 256 -> 128 -> 64 -> 10).

    Dropout 0.5 before fc1 and after fc1, fc2 and fc3, as the authors' FMNIST code has it
    (`dropouts=4`, network=paper). `dropouts=2` keeps only the first two (network=two-dropout:
    learns faster, and leaves the backdoor on fewer silent inputs; see docs/fidelity.md)."""
    layers: list[tuple[str, nn.Module]] = [
        ("std", Standardize(*stats)),
        ("conv1", nn.Conv2d(1, 32, 3)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 64, 3)), ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)), ("drop1", nn.Dropout(0.5)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(9216, 256)), ("relu3", nn.ReLU()), ("drop2", nn.Dropout(0.5)),  # fc1: tau
        ("fc2", nn.Linear(256, 128)), ("relu4", nn.ReLU()),
    ]
    if dropouts == 4:
        layers.append(("drop3", nn.Dropout(0.5)))
    layers += [("fc3", nn.Linear(128, 64)), ("relu5", nn.ReLU())]
    if dropouts == 4:
        layers.append(("drop4", nn.Dropout(0.5)))
    layers.append(("fc4", nn.Linear(64, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def mnist_cnn(num_classes: int, stats: Stats, dropouts: int = 2) -> nn.Sequential:
    """FLAIN paper, MNIST and EMNIST: 2 conv + 2 FC (28x28x1 -> 3136 -> 128 -> classes);
    dropout before and after fc1, as the authors' code (the same for both networks)."""
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


def cifar_cnn(num_classes: int, stats: Stats, dropouts: int = 3) -> nn.Sequential:
    """FLAIN paper, CIFAR-10: 6 conv with BatchNorm + 3 FC
    (64, 128, pool, 256, 256, pool, 256, 256, pool; 4096 -> 1024 -> 512 -> 10), dropout 0.5
    before fc1, fc2 and fc3 as the authors' code (`dropouts=3`; 2 leaves out the one before fc3)."""
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
        *([("drop3", nn.Dropout(0.5))] if dropouts == 3 else []),
        ("fc3", nn.Linear(512, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "mnist": mnist_cnn,
    "fmnist": fmnist_cnn,
    "emnist": mnist_cnn,
    "cifar10": cifar_cnn,
}
# `network=`: the authors' networks (default), or the variant with dropout only around fc1
NETWORKS: dict[str, dict[str, int]] = {  # network -> data set -> dropout layers
    "paper": {"fmnist": 4, "mnist": 2, "emnist": 2, "cifar10": 3},
    "two-dropout": {"fmnist": 2, "mnist": 2, "emnist": 2, "cifar10": 2},
}


def build_model(dataset: str, network: str = "paper") -> nn.Sequential:
    """The network for `dataset` (`network`: paper or two-dropout), standardizing with its statistics."""
    if dataset not in MODELS:
        raise KeyError(f"no model for dataset {dataset!r}; known: {sorted(MODELS)}")
    if network not in NETWORKS:
        raise KeyError(f"no network {network!r}; known: {sorted(NETWORKS)}")
    spec = DATASETS[dataset]
    return MODELS[dataset](spec.num_classes, (spec.mean, spec.std), NETWORKS[network][dataset])


def first_linear_after_conv(model: nn.Module) -> str:
    """Name of the first Linear layer that follows the last convolution in module order (the
    paper's tau; any `nn.Module`: a ResNet's `fc`, a Sequential's `fc1`)."""
    modules = list(model.named_modules())
    convs = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.modules.conv._ConvNd)]
    start = convs[-1] + 1 if convs else 0
    for name, module in modules[start:]:
        if isinstance(module, nn.Linear):
            return name
    raise ValueError("model has no Linear layer after its convolutions")


def resolve_tau(model: nn.Module, layer: str) -> str:
    """The Linear layer named `layer` (dotted for nested modules), or the paper's default for 'auto'."""
    if layer == "auto":
        return first_linear_after_conv(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
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
    """`network` is known and `flain-layer` names a Linear layer of the model (raises ConfigError)."""
    choice("network", cfg.network, NETWORKS)
    try:
        resolve_tau(build_model(cfg.dataset, cfg.network), cfg.flain_layer)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
