"""Add FLAIN to your own Flower app: a small app of its own (model, data, clients) whose
server wraps Flower's FedAvg in `FlainDefense`. Run it from the project root:

    .venv/bin/python examples/add_flain/app.py [--rounds 8] [--clients 5]

The data is Fashion-MNIST read by torchvision from `data/` (`make data` puts it there; set
FLAIN_DATA to read it elsewhere): each client trains on its own 2,000 training images. Two of
the clients are malicious: they stamp a 4x4 white square in the corner of half their images and
label them 0 (a backdoor). The server keeps the last 200 test images as FLAIN's clean aux set and
reports ACC and ASR (stamped test images of the other classes) before and after the defense.
Measured on 2 CPU cores (8 rounds, about 40 s): trained ACC 0.789 / ASR 0.693, after FLAIN
0.773 / 0.152 (146 of 512 inputs of fc1 flipped).
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn
from torchvision.datasets import FashionMNIST

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root (not needed once installed)
from strategies.flain_defense import FlainDefense  # noqa: E402

MALICIOUS, TARGET, PER_CLIENT, AUX = 2, 0, 2000, 200
DATA = os.environ.get("FLAIN_DATA", str(Path(__file__).resolve().parents[2] / "data"))


class Net(nn.Module):
    """Any nn.Module works: FLAIN finds tau (here `fc1`, the first Linear after the last conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 5), nn.Conv2d(16, 32, 5)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@cache
def fashion_mnist(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images N x 1 x 28 x 28 in [0, 1] and labels."""
    data = FashionMNIST(DATA, train=train, download=False)
    return data.data.unsqueeze(1).float() / 255, data.targets


def stamp(images: torch.Tensor) -> torch.Tensor:
    """The backdoor trigger: a white 4x4 square in the bottom-right corner."""
    images = images.clone()
    images[..., -5:-1, -5:-1] = 1.0
    return images


def evaluate(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """ACC on clean test images, ASR on stamped test images of the other classes."""
    model = Net()
    model.load_state_dict(state)
    images, labels = (t[:-AUX] for t in fashion_mnist(train=False))
    with torch.no_grad():
        acc = (model.eval()(images).argmax(1) == labels).float().mean().item()
        others = labels != TARGET
        asr = (model(stamp(images[others])).argmax(1) == TARGET).float().mean().item()
    return {"acc": acc, "asr": asr}


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    images, labels = (t[pid * PER_CLIENT:(pid + 1) * PER_CLIENT].clone() for t in fashion_mnist(train=True))
    if pid < MALICIOUS:  # poison half the images
        half = len(images) // 2
        images[:half], labels[:half] = stamp(images[:half]), TARGET
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(int(msg.content["config"].get("server-round", 0)) * 100 + pid)
    model.train()
    for batch in torch.randperm(len(images), generator=g).split(32):
        optimizer.zero_grad()
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"num-examples": len(images)})})
    return Message(content=content, reply_to=msg)


server_app = ServerApp()
RESULTS: list = []  # the last run's DefendedResult, for whoever started the simulation in this process


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(0)
    strategy = FlainDefense(FedAvg(fraction_evaluate=0.0), model_fn=Net, aux=tuple(t[-AUX:] for t in fashion_mnist(train=False)),
                            defenses=("flain",), evaluate_fn=evaluate)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            num_rounds=int(context.run_config.get("num-rounds", ROUNDS)))
    RESULTS.append(result)
    print("trained: ", evaluate(result.undefended.to_torch_state_dict()))
    print("defended:", {k: v for k, v in result.reports["flain"].items() if k in ("acc", "asr", "flipped", "threshold")})


ROUNDS = 8


def simulate(rounds: int = ROUNDS, clients: int = 5) -> None:
    """Flower's simulation of this app (the ClientApps run in Ray workers, which import this
    module by name: the project root goes on their PYTHONPATH)."""
    from flwr.simulation import run_simulation

    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    import examples.add_flain.app as app  # by name, not __main__, so that the workers find it

    app.ROUNDS = rounds
    run_simulation(server_app=app.server_app, client_app=app.client_app, num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--clients", type=int, default=5)
    args = parser.parse_args()
    simulate(args.rounds, args.clients)
