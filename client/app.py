"""ClientApp: local training on this node's partition (benign or malicious)."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from attacks import ATTACKS, AttackContext, ModelAttack
from client.training import clean_sample, client_data, input_ranks
from models.training import train_local
from experiment import seeds
from experiment.config import ExperimentConfig
from experiment.hardware import pick_device, training_precision
from models import build_model, resolve_tau, split_at

MEMORY = "attack-memory"  # context.state key: what an attack keeps across rounds on this node

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
    # Each (seed, round, client) draws its own batches and dropout masks (own streams).
    torch.manual_seed(seeds.int_seed(cfg.seed, "dropout", server_round, partition_id))
    batches = torch.Generator().manual_seed(seeds.int_seed(cfg.seed, "batches", server_round, partition_id))

    model = build_model(cfg.dataset, cfg.network)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = pick_device()
    model.to(device)
    precision, _ = training_precision(cfg, device, build_model)  # the server measured it: a cache hit

    # benign clients run the no-op attack too (every reply carries the same metric keys), but
    # only an attacker needs its clean sample
    attack = ATTACKS[cfg.attack](cfg) if data.malicious else ModelAttack()
    tau = resolve_tau(model, cfg.flain_layer)
    clean_images, clean_labels = clean_sample(data, size=512 if data.malicious else 0)
    memory = context.state.array_records.get(MEMORY)
    ctx = AttackContext(model=model, global_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                        clean_images=clean_images, clean_labels=clean_labels, tau=tau,
                        features=split_at(model, tau)[0],
                        memory=memory.to_torch_state_dict() if memory is not None else {})
    attack.prepare(ctx)
    loss = train_local(model, data.images, data.labels, cfg.local_epochs, cfg.batch_size, cfg.lr,
                       generator=batches, precision=precision, attack=attack, ctx=ctx, poisoned=data.poisoned_mask)
    attack.finish(ctx)
    if ctx.memory:
        context.state[MEMORY] = ArrayRecord({k: v.cpu() for k, v in ctx.memory.items()})
    metrics = MetricRecord(
        {
            "num-examples": len(data.labels),
            "partition-id": partition_id,
            "train-loss": loss,
            "malicious": int(data.malicious),
            "poisoned": data.poisoned,
            **attack.metrics(ctx),
        }
    )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return Message(content=RecordDict({"arrays": ArrayRecord(state), "metrics": metrics}), reply_to=msg)


@app.query("activation_ranking")
def activation_ranking(msg: Message, context: Context) -> Message:
    """Federated pruning (Wu et al. 2020), client side: rank the inputs of layer tau by
    their mean activation on this client's own data; only the ranks leave the client."""
    cfg = ExperimentConfig.from_run_config(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    data = client_data(cfg, partition_id)
    model = build_model(cfg.dataset, cfg.network)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(pick_device())
    ranks = input_ranks(model, str(msg.content["config"]["layer"]), data.images)
    metrics = MetricRecord({"num-examples": len(data.labels), "partition-id": partition_id})
    content = RecordDict({"ranks": ArrayRecord({"ranks": Array(ranks)}), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.query("partition")
def partition(msg: Message, context: Context) -> Message:
    """Which partition this node serves: the server samples each round's clients by partition
    (strategies/sampling.py) and asks once, before round 1. Loads no data."""
    metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"]),
                            "num-partitions": int(context.node_config["num-partitions"])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
