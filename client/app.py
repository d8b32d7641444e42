"""ClientApp: local training on this node's partition (benign or malicious)."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.training import client_data, input_ranks, train_local
from experiment.config import ExperimentConfig
from models import build_model, pick_device, resolve_precision

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = ExperimentConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    if num_partitions != cfg.num_clients:
        raise ValueError(
            f"node has num-partitions={num_partitions} but num-clients={cfg.num_clients}: "
            "start as many nodes as clients"
        )
    data = client_data(cfg, partition_id)
    server_round = int(msg.content["config"]["server-round"])
    # Each (seed, round, client) draws its own batches and dropout masks.
    torch.manual_seed(cfg.seed * 1_000_003 + server_round * 1009 + partition_id)

    model = build_model(cfg.dataset)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = pick_device()
    model.to(device)
    loss = train_local(
        model, data.images, data.labels, cfg.local_epochs, cfg.batch_size, cfg.lr,
        seed=cfg.seed * 7919 + server_round * 31 + partition_id,
        precision=resolve_precision(cfg.precision, device),
    )
    metrics = MetricRecord(
        {
            "num-examples": len(data.labels),
            "train-loss": loss,
            "malicious": int(data.malicious),
            "poisoned": data.poisoned,
        }
    )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@app.query("activation_ranking")
def activation_ranking(msg: Message, context: Context) -> Message:
    """Federated pruning (Wu et al. 2020), client side: rank the inputs of layer tau by
    their mean activation on this client's own data; only the ranks leave the client."""
    cfg = ExperimentConfig.from_run_config(context.run_config)
    data = client_data(cfg, int(context.node_config["partition-id"]))
    model = build_model(cfg.dataset)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(pick_device())
    ranks = input_ranks(model, str(msg.content["config"]["layer"]), data.images)
    content = RecordDict(
        {"ranks": ArrayRecord({"ranks": Array(ranks)}), "metrics": MetricRecord({"num-examples": len(data.labels)})}
    )
    return Message(content=content, reply_to=msg)
