"""Layer tau of the post-training defenses: its inputs on the aux set, evaluated fast.

The defenses change only tau's weight, so the model runs once over the aux set with a forward
hook on tau keeping its inputs (`features`), and every candidate weight is scored by running
only what comes after tau (`rest`). Any `nn.Module` works: where torch.fx can trace the model
and everything after tau depends on tau's output alone (a Sequential, a ResNet's `fc`), `rest`
is that part of the traced graph; otherwise (a skip connection around tau, an untraceable
forward) every candidate is scored by the whole model, slower and the same Algorithm 1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from models import inference_batches, resolve_tau

# accuracy on the aux set of the model whose tau weight is the given matrix
Evaluate = Callable[[torch.Tensor], float]


def tau_inputs(body: nn.Module, images: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Inputs of tau (post-ReLU features) for every aux image, N x z (`inference_batches`: on
    CIFAR-10's 600 aux images 2.5-3 s at batch 512, 1.3 s at the CPU's 64)."""
    return torch.cat(list(inference_batches(body, images, batch)))


def head_accuracy(head: nn.Sequential, tau_name: str, features: torch.Tensor, labels: torch.Tensor) -> Evaluate:
    """Evaluate(W) = accuracy of `head` (tau and after) on cached features with tau.weight = W."""
    tau: nn.Linear = head._modules[tau_name]  # type: ignore[assignment]

    @torch.no_grad()
    def evaluate(weight: torch.Tensor) -> float:
        tau.weight.copy_(weight)
        return (head(features).argmax(1) == labels).float().mean().item()

    return evaluate


class TauNotUsable(ValueError):
    """Layer tau cannot be defended in this model (its input is not N x in, ...)."""


def rest_after(model: nn.Module, name: str) -> nn.Module | None:
    """The computation after Linear `name` as a module of tau's output, if the model's output
    depends on nothing else (torch.fx graph from tau's output to the model's output); None
    where fx cannot trace the model, tau is called more than once, or a value computed before
    tau reaches the output another way."""
    try:
        graph = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: no split, the whole model
        return None
    calls = [n for n in graph.graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        return None
    tau = calls[0]
    after = {tau}
    for node in graph.graph.nodes:  # topological order
        if any(i in after for i in node.all_input_nodes):
            after.add(node)
    rest = fx.Graph()
    env = {tau: rest.placeholder("tau_output")}
    for node in graph.graph.nodes:
        if node is tau or node not in after:
            continue
        for i in node.all_input_nodes:
            if i not in env:
                if i.op != "get_attr":
                    return None  # a value from before tau: not a function of tau's output
                env[i] = rest.node_copy(i)
        env[node] = rest.node_copy(node, lambda n: env[n])
    if not any(n.op == "output" for n in env):
        return None
    return fx.GraphModule(graph, rest)


@torch.no_grad()
def tau_features(model: nn.Module, tau: nn.Linear, name: str, images: torch.Tensor) -> torch.Tensor:
    """tau's inputs for every image (a forward pre-hook on tau), N x in."""
    seen: list[torch.Tensor] = []
    hook = tau.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        calls = 0
        for _ in inference_batches(model, images):
            calls += 1
    finally:
        hook.remove()
    if len(seen) != calls:
        raise TauNotUsable(f"layer {name!r} ran {len(seen)} times on {calls} batches: tau must run once per input")
    features = torch.cat(seen)
    if features.dim() != 2 or len(features) != len(images):
        raise TauNotUsable(f"layer {name!r} gets inputs of shape {tuple(seen[0].shape)} per batch: "
                           "tau must be a Linear layer that gets one flat vector per image")
    return features


def _whole_model_accuracy(model: nn.Module, tau: nn.Linear, images: torch.Tensor, labels: torch.Tensor) -> Evaluate:
    """Evaluate(W) by the whole model, for models that cannot be split at tau."""

    @torch.no_grad()
    def evaluate(weight: torch.Tensor) -> float:
        tau.weight.copy_(weight)
        logits = torch.cat(list(inference_batches(model, images)))
        return (logits.argmax(1) == labels).float().mean().item()

    return evaluate


@dataclass
class TauView:
    """A private copy of the trained model, seen from layer tau."""

    model: nn.Module
    name: str  # tau's name in the model (dotted for nested modules)
    weight: torch.Tensor  # trained W (out x in)
    activations: np.ndarray  # mean input of each of tau's inputs over the aux set (float64)
    evaluate: Evaluate
    features: torch.Tensor  # tau's inputs for every aux image (N x in)
    labels: torch.Tensor  # the aux labels, on the model's device
    bias: torch.Tensor | None  # tau's bias
    rest: nn.Module | None  # what comes after tau, as a function of tau's output; None: not split

    @classmethod
    def of(cls, model: nn.Module, layer: str, aux_images: torch.Tensor, aux_labels: torch.Tensor) -> TauView:
        model = copy.deepcopy(model).eval()
        name = resolve_tau(model, layer)
        tau: nn.Linear = model.get_submodule(name)  # type: ignore[assignment]
        device = next(model.parameters()).device
        images, labels = aux_images.to(device), aux_labels.to(device)
        features = tau_features(model, tau, name, images)
        rest = rest_after(model, name)
        if rest is not None:
            with torch.no_grad():  # the split must reproduce the model (else: the whole model)
                probe = slice(0, min(len(images), 64))
                if not torch.allclose(rest(tau(features[probe])), model(images[probe]), atol=1e-4, rtol=1e-4):
                    rest = None
        evaluate = (_whole_model_accuracy(model, tau, images, labels) if rest is None
                    else head_accuracy(nn.Sequential(tau, rest), "0", features, labels))
        return cls(
            model=model,
            name=name,
            weight=tau.weight.detach().clone(),
            activations=features.mean(0).double().cpu().numpy(),
            evaluate=evaluate,
            features=features,
            labels=labels,
            bias=tau.bias,
            rest=rest,
        )

    def state_with(self, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """(state_dict with tau.weight = weight, its aux accuracy)."""
        acc = self.evaluate(weight)  # also leaves `weight` in the model
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}, acc
