"""The model attacks' mechanisms on a tiny network and generated data, trained by the
clients' own `train_local` (attacks/: neurotoxin, scaling, pgd, flain-aware)."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from attacks import ATTACKS, AttackContext, ModelAttack, scaling_factor
from attacks.base import UPDATE_METRICS, distance
from attacks.flain_aware import FlainAware, low_activation_inputs
from attacks.neurotoxin import PREVIOUS, Neurotoxin, top_share_mask
from attacks.pgd import PGD
from attacks.scaling import Scaling
from models.training import train_local
from experiment.config import ConfigError, ExperimentConfig
from experiment.data import to_float
from server.checks import check_experiment


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc1=nn.Linear(16, 8), relu=nn.ReLU(),
                                     fc2=nn.Linear(8, 3)))


def data(n: int = 96):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    images[:, :, :, :2] = 0  # inputs 0,1,4,5,8,9,12,13 are silent on clean data
    labels = torch.randint(0, 3, (n,), generator=g)
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[::4] = True
    images[poisoned, :, 0, 0] = 255  # the trigger lights a silent input
    labels[poisoned] = 2
    return images, labels, poisoned


def run(attack: ModelAttack, memory: dict | None = None, epochs: int = 3):
    model = tiny()
    images, labels, poisoned = data()
    ctx = AttackContext(model=model, global_state={k: v.clone() for k, v in model.state_dict().items()},
                        clean_images=to_float(images[~poisoned]), clean_labels=labels[~poisoned], tau="fc1",
                        features=model[:1], memory=memory if memory is not None else {})
    attack.prepare(ctx)
    train_local(model, images, labels, epochs, 16, 0.05, torch.Generator().manual_seed(2),
                attack=attack, ctx=ctx, poisoned=poisoned)
    attack.finish(ctx)
    return model, ctx, attack.metrics(ctx)


def test_every_attack_reports_the_same_metric_keys():
    cfg = ExperimentConfig.defaults()
    for name, build in ATTACKS.items():
        _, _, metrics = run(build(cfg))
        assert tuple(metrics) == UPDATE_METRICS, name
        assert all(isinstance(v, float) for v in metrics.values()), name


def test_plain_attack_sends_what_it_trained():
    _, ctx, m = run(ModelAttack())
    assert m["update-norm"] == m["update-norm-unconstrained"] > 0
    assert m["masked-share"] == 0 and m["masked-columns"] == 0


def test_scaling_multiplies_the_update_by_the_factor():
    model, ctx, m = run(Scaling(4.0))
    assert m["update-norm"] == pytest.approx(4.0 * m["update-norm-unconstrained"], rel=1e-5)
    reference, _, plain = run(ModelAttack())  # same seeds: the unscaled model is the plain one
    assert m["update-norm-unconstrained"] == pytest.approx(plain["update-norm"], rel=1e-5)
    for name, p in model.named_parameters():
        g = ctx.global_state[name]
        assert torch.allclose(p, g + 4.0 * (dict(reference.named_parameters())[name] - g), atol=1e-5)


def test_scaling_factor_default_replaces_the_model():
    assert scaling_factor(ExperimentConfig.defaults()) == 10 / 4
    assert scaling_factor(ExperimentConfig.defaults(scaling_factor=7.0)) == 7.0


def test_pgd_keeps_the_model_in_the_ball():
    eps = 0.3
    model, ctx, m = run(PGD(eps))
    assert m["update-norm-unconstrained"] > eps  # the projection had work to do
    assert m["update-norm"] <= eps * (1 + 1e-6)
    assert distance(model, ctx.global_state) == pytest.approx(m["update-norm"])
    _, _, loose = run(PGD(1e6))  # a ball it never leaves: the plain training
    _, _, plain = run(ModelAttack())
    assert loose["update-norm"] == pytest.approx(plain["update-norm"], rel=1e-6)


def test_top_share_mask_freezes_the_largest_coordinates():
    d = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    keep = top_share_mask(d, 2 / 6)
    assert keep.tolist() == [[True, False, True], [False, True, True]]


def test_neurotoxin_first_round_uses_its_clean_gradient_and_freezes_topk():
    memory: dict = {}
    model, ctx, m = run(Neurotoxin(0.25), memory)
    assert m["attack-direction"] == 0.0
    assert m["masked-share"] == pytest.approx(0.25, abs=0.02)
    for name, p in model.named_parameters():
        frozen = ~ctx_masks(ctx, name, 0.25, model)
        assert torch.equal(p[frozen], ctx.global_state[name][frozen]), name  # never moved
        assert not torch.equal(p[~frozen], ctx.global_state[name][~frozen]), name
    assert set(memory) == {PREVIOUS + n for n, _ in model.named_parameters()}  # kept for the next round


def ctx_masks(ctx, name, share, model):
    attack = Neurotoxin(share)
    fresh = tiny()
    probe = AttackContext(model=fresh, global_state=ctx.global_state, clean_images=ctx.clean_images,
                          clean_labels=ctx.clean_labels, tau="fc1", features=fresh[:1])
    attack.prepare(probe)
    return attack.masks[name]


def test_neurotoxin_later_rounds_use_the_last_global_change():
    model = tiny()
    previous = {PREVIOUS + n: p.detach() - 0.01 * torch.arange(p.numel()).view_as(p) for n, p in model.named_parameters()}
    trained, ctx, m = run(Neurotoxin(0.5), dict(previous))
    assert m["attack-direction"] == 1.0
    # the global change grows with the coordinate index: the upper half is frozen
    w = dict(trained.named_parameters())["fc1.weight"].flatten()
    g = ctx.global_state["fc1.weight"].flatten()
    half = w.numel() // 2
    assert torch.equal(w[half:], g[half:]) and not torch.equal(w[:half], g[:half])


def test_low_activation_inputs_are_the_lowest_quantile():
    act = torch.tensor([5.0, 0.0, 3.0, 0.1, 9.0, 0.0])
    assert low_activation_inputs(act, 0.5).tolist() == [1, 3, 5]


def test_flain_aware_masks_exactly_the_columns_it_reports():
    attack = FlainAware(quantile=0.5, lam=1.0)
    model, ctx, m = run(attack)
    silent = torch.tensor([0, 1, 4, 5, 8, 9, 12, 13])  # the generated images' dark half
    assert attack.columns.tolist() == silent.tolist()
    assert m["masked-columns"] == 8 and m["masked-share"] == 0.5
    w, g = model.fc1.weight.detach(), ctx.global_state["fc1.weight"]
    assert torch.equal(w[:, silent], g[:, silent])  # the attacker's update there is exactly zero
    loud = torch.tensor([i for i in range(16) if i not in silent.tolist()])
    assert (w[:, loud] != g[:, loud]).any(0).all()  # every other column moved
    # the plain attacker does write into the trigger's silent input
    plain, pctx, _ = run(ModelAttack())
    assert not torch.equal(plain.fc1.weight[:, 0], pctx.global_state["fc1.weight"][:, 0])


def test_flain_aware_loss_is_the_low_inputs_activation_on_triggered_images():
    images, _, poisoned = data()
    x = to_float(images)
    low = torch.tensor([0, 1, 4, 5, 8, 9, 12, 13])
    attack = FlainAware(0.5, lam=2.0)
    model = tiny()
    ctx = AttackContext(model=model, global_state=model.state_dict(), clean_images=x[~poisoned],
                        clean_labels=torch.zeros(int((~poisoned).sum()), dtype=torch.long), tau="fc1",
                        features=model[:1])
    attack.prepare(ctx)
    term = attack.extra_loss(ctx, x, poisoned)
    assert term == pytest.approx(2.0 * float(x[poisoned].flatten(1)[:, low].mean()))
    assert attack.extra_loss(ctx, x, torch.zeros_like(poisoned)) is None


@pytest.mark.parametrize("key,value,fragment", [
    ("attack", "'badnet'", "attack='badnet' is not allowed: choose one of ['flain-aware', 'neurotoxin', 'none'"),
    ("neurotoxin-topk", "1.0", "neurotoxin-topk=1.0 is not allowed"),
    ("pgd-eps", "0.0", "pgd-eps=0.0 is not allowed"),
    ("scaling-factor", "-1.0", "scaling-factor=-1.0 is not allowed"),
    ("flain-aware-quantile", "0.0", "flain-aware-quantile=0.0 is not allowed"),
])
def test_bad_attack_settings_fail_before_training(key, value, fragment):
    import tomllib

    with pytest.raises(ConfigError) as err:
        check_experiment(ExperimentConfig.from_run_config({key: tomllib.loads(f"v = {value}")["v"]}))
    assert fragment in str(err.value)
