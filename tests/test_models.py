"""The paper's networks and the tau helpers."""

import pytest
import torch

from models import build_model, resolve_tau, split_at


def test_fmnist_cnn_shapes():
    model = build_model("fmnist").eval()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_children() if isinstance(m, torch.nn.Linear)]
    assert linears == [("fc1", 9216, 256), ("fc2", 256, 128), ("fc3", 128, 64), ("fc4", 64, 10)]
    assert [m.out_channels for m in model if isinstance(m, torch.nn.Conv2d)] == [32, 64]
    # the fixed standardization adds nothing to the state_dict
    assert not any(k.startswith("std") for k in model.state_dict())


def test_tau_and_split():
    model = build_model("fmnist").eval()
    assert resolve_tau(model, "auto") == "fc1"
    assert resolve_tau(model, "fc3") == "fc3"
    with pytest.raises(ValueError, match="conv1"):
        resolve_tau(model, "conv1")
    body, head = split_at(model, "auto")
    x = torch.rand(4, 1, 28, 28)
    feats = body(x)
    assert feats.shape == (4, 9216) and (feats >= 0).all()  # post-ReLU inputs of tau
    assert torch.allclose(head(feats), model(x))


@pytest.mark.parametrize(
    "dataset,shape,linears,convs",
    [
        ("mnist", (1, 28, 28), [("fc1", 3136, 128), ("fc2", 128, 10)], [32, 64]),
        ("emnist", (1, 28, 28), [("fc1", 3136, 128), ("fc2", 128, 62)], [32, 64]),
        ("cifar10", (3, 32, 32), [("fc1", 4096, 1024), ("fc2", 1024, 512), ("fc3", 512, 10)],
         [64, 128, 256, 256, 256, 256]),
    ],
)
def test_paper_models_layer_shapes(dataset, shape, linears, convs):
    model = build_model(dataset).eval()
    assert model(torch.rand(2, *shape)).shape == (2, linears[-1][2])
    got = [(n, m.in_features, m.out_features) for n, m in model.named_children() if isinstance(m, torch.nn.Linear)]
    assert got == linears
    assert [m.out_channels for m in model if isinstance(m, torch.nn.Conv2d)] == convs
    assert resolve_tau(model, "auto") == "fc1"
    bns = [m for m in model if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == (6 if dataset == "cifar10" else 0)
    if bns:  # BatchNorm statistics travel in the state_dict (as buffers, not parameters)
        keys = model.state_dict().keys()
        assert "bn1.running_mean" in keys and "bn1.num_batches_tracked" in keys
        assert "bn1.running_mean" not in dict(model.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["fmnist", "cifar10"])
def test_predictions_do_not_depend_on_the_inference_batch(dataset):
    """The central evaluation runs at a cache-sized batch on a CPU: the same predictions, and
    the same tau inputs up to float rounding, as one large batch."""
    from experiment.data import DATASETS
    from experiment.hardware import inference_batch
    from server.evaluation import predict
    from strategies.post_training.tau import tau_inputs

    torch.manual_seed(0)
    model = build_model(dataset).eval()
    images = torch.randint(0, 256, (150, *DATASETS[dataset].shape), dtype=torch.uint8)
    assert inference_batch(torch.device("cpu")) < 150 <= inference_batch(torch.device("cuda"))
    reference = predict(model, images, batch=150)
    assert torch.equal(predict(model, images), reference) and torch.equal(predict(model, images, batch=7), reference)
    body, _ = split_at(model, "fc1")
    x = images.float() / 255
    assert torch.allclose(tau_inputs(body, x), tau_inputs(body, x, batch=150), atol=1e-5)


# layer by layer, as the authors' code has them (models/__init__.py: network=paper)
PAPER_LAYERS = {
    "fmnist": ["conv1", "relu1", "conv2", "relu2", "pool", "drop1", "flatten", "fc1", "relu3", "drop2",
               "fc2", "relu4", "drop3", "fc3", "relu5", "drop4", "fc4"],
    "mnist": ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "drop1", "flatten", "fc1", "relu3", "drop2", "fc2"],
    "cifar10": ["conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "pool1", "conv3", "bn3", "relu3", "conv4", "bn4",
                "relu4", "pool2", "conv5", "bn5", "relu5", "conv6", "bn6", "relu6", "pool3", "drop1", "flatten",
                "fc1", "relu_fc1", "drop2", "fc2", "relu_fc2", "drop3", "fc3"],
}


@pytest.mark.parametrize("dataset", sorted(PAPER_LAYERS))
def test_the_default_network_is_the_papers_layer_by_layer(dataset):
    model = build_model(dataset)
    assert [n for n in model._modules if n != "std"] == PAPER_LAYERS[dataset]
    assert all(m.p == 0.5 for m in model if isinstance(m, torch.nn.Dropout))


@pytest.mark.parametrize("dataset, dropped", [("fmnist", {"drop3", "drop4"}), ("cifar10", {"drop3"}), ("mnist", set())])
def test_the_two_dropout_network_differs_only_in_dropout(dataset, dropped):
    paper, light = build_model(dataset), build_model(dataset, "two-dropout")
    assert set(paper._modules) - set(light._modules) == dropped and not set(light._modules) - set(paper._modules)
    assert {k: v.shape for k, v in paper.state_dict().items()} == {k: v.shape for k, v in light.state_dict().items()}
    torch.manual_seed(0)
    state = build_model(dataset).state_dict()
    paper.load_state_dict(state)
    light.load_state_dict(state)
    x = torch.rand(2, *((3, 32, 32) if dataset == "cifar10" else (1, 28, 28)))
    assert torch.equal(paper.eval()(x), light.eval()(x))  # in eval mode dropout is the identity
