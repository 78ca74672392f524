"""SAU: the shared-adversarial losses on hand-made logits, shared PGD's bounds, the frozen original, the
config, every architecture, and the BadNets proof."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn

from tscray import defenses, models
from tscray.data import clean_subset
from tscray.defenses import CleanData
from tscray.defenses.layers import input_bounds
from tscray.defenses.sau import (SAUConfig, build_optimizer, js_divergence, pgd_objective, shared_pgd,
                                 shared_unlearning_loss, unlearn_step)
from tscray.methods import build as method
from tscray.optim import OptimConfig

from conftest import assert_runs_on, assert_same_state, randomize, supervised_archs

ARCHS = supervised_archs()
BIG = 12.0  # a logit that makes its class's probability ~1


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(models.build("cnn", 10, in_channels=1, widths=(8, 8, 16, 16)), seed)


def onehot_logits(classes: list[int], k: int = 4, scale: float = BIG) -> torch.Tensor:
    return nn.functional.one_hot(torch.tensor(classes), k).float() * scale


@pytest.fixture
def clean(embedded):
    return CleanData(embedded.train.subset(clean_subset(len(embedded.train), 0.05, 0)), embedded.prep)


# --- the unlearning loss L_sar on hand-made logits ------------------------------------------------------------


def test_shared_loss_is_large_when_both_models_share_a_wrong_prediction():
    y = torch.tensor([0, 0])
    clean_ref = onehot_logits([0, 0])      # the original is right on the clean images
    adv_ref = onehot_logits([2, 3])        # ... and fooled on the adversarial ones (to 2 and 3)
    adv = onehot_logits([2, 3])            # the current model shares both wrong predictions
    loss = shared_unlearning_loss(adv, adv_ref, clean_ref, y)
    # both samples: -log(1 - p_h(shared class)), summed and divided by N = 2 (the 1e-6 guard is negligible)
    p = torch.softmax(adv, 1)[0, 2]
    assert float(loss) == pytest.approx(-math.log(1 - float(p)), rel=0.05)
    assert float(loss) > 10.0


def test_shared_loss_is_near_zero_when_the_models_disagree():
    y = torch.tensor([0, 0])
    clean_ref, adv_ref = onehot_logits([0, 0]), onehot_logits([2, 3])
    disagree = onehot_logits([1, 0])       # the current model predicts another class (or the right one)
    loss = shared_unlearning_loss(disagree, adv_ref, clean_ref, y)
    assert 0.0 < float(loss) < 2e-3        # the 0.1% clamp leaves -log(1 - 0.001) ≈ 0.001
    shared = shared_unlearning_loss(onehot_logits([2, 3]), adv_ref, clean_ref, y)
    assert float(shared) > 1000 * float(loss)


def test_shared_loss_is_zero_when_the_original_is_not_fooled():
    y = torch.tensor([0, 1, 2])
    clean_ref = onehot_logits([0, 1, 2])
    # h₀'s adversarial prediction is the true label (not fooled) or its own clean prediction (no flip)
    adv_ref = onehot_logits([0, 1, 2])
    adv = onehot_logits([3, 3, 3])
    assert float(shared_unlearning_loss(adv, adv_ref, clean_ref, y)) == 0.0
    flipped_from_a_wrong_clean_prediction = onehot_logits([3, 3, 3])
    assert float(shared_unlearning_loss(adv, flipped_from_a_wrong_clean_prediction,
                                        flipped_from_a_wrong_clean_prediction, y)) == 0.0


def test_shared_loss_counts_only_poisoned_samples_and_divides_by_the_batch():
    y = torch.tensor([0, 0, 0, 0])
    clean_ref = onehot_logits([0, 0, 0, 0])
    adv_ref = onehot_logits([2, 0, 0, 0])  # one of four fools the original
    adv = onehot_logits([2, 2, 2, 2])      # the current model predicts 2 everywhere
    one = float(shared_unlearning_loss(adv, adv_ref, clean_ref, y))
    alone = float(shared_unlearning_loss(adv[:1], adv_ref[:1], clean_ref[:1], y[:1]))
    assert alone > 10.0 and one == pytest.approx(alone / 4, rel=1e-5)


def test_shared_loss_grows_with_the_shared_probability_and_its_gradient_lowers_it():
    y = torch.tensor([0])
    clean_ref, adv_ref = onehot_logits([0]), onehot_logits([2])
    values = []
    for z in (0.0, 1.0, 2.0, 3.0):
        adv = torch.tensor([[0.0, 0.0, z, 0.0]], requires_grad=True)
        loss = shared_unlearning_loss(adv, adv_ref, clean_ref, y)
        loss.backward()
        values.append(float(loss.detach()))
        assert adv.grad[0, 2] > 0          # descending lowers the shared class's logit
    assert values == sorted(values) and values[0] > 0


# --- the PGD objective on hand-made logits ---------------------------------------------------------------------


def test_pgd_objective_rewards_sharing_a_wrong_class():
    y = torch.tensor([0, 0])
    clean_pred = torch.tensor([0, 0])
    shared_logits = onehot_logits([2, 3])
    objective, shared = pgd_objective(shared_logits, shared_logits.clone(), y, clean_pred, clean_pred, 0.01, 1.0)
    assert shared.all()
    assert float(objective) == 0.0         # nothing left to push: all fooled and shared
    apart, not_shared = pgd_objective(onehot_logits([2, 3]), onehot_logits([1, 1]), y, clean_pred, clean_pred,
                                      0.01, 1.0)
    assert not not_shared.any() and float(apart) > 0.5  # fooled differently: the JS term is ~log 2 each
    right, _ = pgd_objective(onehot_logits([0, 0]), onehot_logits([0, 0]), y, clean_pred, clean_pred, 0.01, 1.0)
    assert float(right) < 0                # not fooled: -β₁·CE (descending raises the CE)


def test_js_divergence_is_symmetric_zero_on_equal_and_at_most_log_two():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    torch.testing.assert_close(js_divergence(a, b), js_divergence(b, a))
    assert torch.allclose(js_divergence(a, a), torch.zeros(6), atol=1e-7)
    far = js_divergence(onehot_logits([0], 5, 40.0), onehot_logits([1], 5, 40.0))
    assert float(far) == pytest.approx(math.log(2), rel=1e-3)


# --- shared PGD ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["max", "zero", "random", "min"])
def test_pgd_examples_stay_in_the_eps_ball_and_the_input_bounds(init, embedded):
    model, ref = tiny_cnn(0).eval(), tiny_cnn(1).eval()
    x, y = next(iter(CleanData(embedded.train, embedded.prep).loader(32, 0, augment=False)))
    cfg = SAUConfig(pgd_steps=5, pgd_init=init)
    low, high = input_bounds(embedded.prep)
    std = torch.tensor(embedded.prep.std).view(1, -1, 1, 1)
    x_adv, shared = shared_pgd(model, ref, x, y, cfg, std, low, high, torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and shared.shape == y.shape
    assert (x_adv >= low - 1e-6).all() and (x_adv <= high + 1e-6).all()
    assert ((x_adv - x).abs() <= cfg.pgd_eps / std + 1e-6).all()
    pixels = x_adv * std + torch.tensor(embedded.prep.mean).view(1, -1, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    if init != "zero":
        assert (x_adv != x).any()


def test_pgd_moves_toward_a_shared_wrong_class(embedded):
    """Against two copies of one (linear, so easily fooled) model every fooled example is shared; from δ = 0,
    more PGD steps fool more images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    x, y = next(iter(CleanData(embedded.train, embedded.prep).loader(64, 0, augment=False)))
    low, high = input_bounds(embedded.prep)
    std = torch.tensor(embedded.prep.std).view(1, -1, 1, 1)
    rates = []
    for steps in (0, 1, 5):
        cfg = SAUConfig(pgd_steps=steps, pgd_lr=0.05, pgd_init="zero")
        adv, shared = shared_pgd(model, copy.deepcopy(model), x, y, cfg, std, low, high, torch.Generator())
        with torch.no_grad():
            rates.append(float((model(adv).argmax(1) != model(x).argmax(1)).float().mean()))
    assert rates[0] == 0.0 and rates[0] < rates[1] < rates[2]
    assert float(shared.float().mean()) > 0.3


def test_pgd_touches_no_model_gradient_or_state(embedded):
    model, ref = tiny_cnn(0).train(), tiny_cnn(1)
    states = [copy.deepcopy(m.state_dict()) for m in (model, ref)]
    x, y = next(iter(CleanData(embedded.train, embedded.prep).loader(16, 0, augment=False)))
    low, high = input_bounds(embedded.prep)
    std = torch.tensor(embedded.prep.std).view(1, -1, 1, 1)
    shared_pgd(model, ref, x, y, SAUConfig(), std, low, high, torch.Generator().manual_seed(0))
    assert model.training  # the training flag is restored
    for m, s in zip((model, ref), states):
        assert all(p.grad is None for p in m.parameters())
        for k, v in m.state_dict().items():
            assert torch.equal(v, s[k]), k


# --- unlearning: the frozen original ------------------------------------------------------------------------------


def test_unlearning_updates_the_model_and_never_the_frozen_original(embedded):
    torch.manual_seed(0)
    model = tiny_cnn(0).eval()
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    ref_state = copy.deepcopy(ref.state_dict())
    cfg = SAUConfig(optim=OptimConfig(name="adam", lr=1e-2, weight_decay=0.0, schedule="constant"), pgd_steps=2)
    opt, _ = build_optimizer(cfg, list(model.parameters()))
    assert opt.param_groups[0]["amsgrad"] is True
    low, high = input_bounds(embedded.prep)
    std = torch.tensor(embedded.prep.std).view(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(0)
    small = CleanData(embedded.train.subset(torch.arange(64)), embedded.prep)
    for x, y in small.loader(32, 0, augment=False):
        x_adv, _ = shared_pgd(model, ref, x, y, cfg, std, low, high, gen)
        stats = unlearn_step(model, ref, x, x_adv, y, opt, cfg)
        assert math.isfinite(stats["loss"])
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    assert all(p.grad is None for p in ref.parameters())
    assert not torch.equal(model.convs[0].weight, ref.convs[0].weight)
    # train_mode False: BN statistics frozen (BackdoorBench's default)
    assert torch.equal(model.bns[0].running_mean, ref.bns[0].running_mean)


def test_train_mode_updates_batchnorm_statistics(embedded):
    model = tiny_cnn(0).eval()
    ref = copy.deepcopy(model).requires_grad_(False)
    cfg = SAUConfig(train_mode=True)
    opt, _ = build_optimizer(cfg, list(model.parameters()))
    x, y = next(iter(CleanData(embedded.train, embedded.prep).loader(32, 0, augment=False)))
    unlearn_step(model, ref, x, x, y, opt, cfg)
    assert not model.training
    assert not torch.equal(model.bns[0].running_mean, ref.bns[0].running_mean)


# --- config and contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("epochs", -1), ("pgd_steps", -1), ("outer_steps", 0), ("batch_size", 0),
                                         ("pgd_eps", -0.1), ("pgd_eps", 1.5), ("pgd_lr", 0.0),
                                         ("pgd_init", "gaussian"), ("beta_adv", -1.0), ("lmd_shared", -1.0)])
def test_config_rejects_out_of_range_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SAUConfig(**{field: value})


def test_presets_are_backdoorbench_defaults():
    cfg = SAUConfig.preset("paper")
    assert cfg == SAUConfig.preset("released")
    assert (cfg.epochs, cfg.pgd_steps, cfg.pgd_eps, cfg.pgd_lr, cfg.pgd_init) == (100, 5, 0.2, 0.2, "max")
    assert (cfg.beta_adv, cfg.beta_share, cfg.lmd_clean, cfg.lmd_adv, cfg.lmd_shared) == (0.01, 1.0, 1.0, 0.0, 1.0)
    assert cfg.optim.name == "adam" and cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0
    with pytest.raises(ValueError, match="paper, released"):
        SAUConfig.preset("nope")


def test_run_leaves_the_model_unchanged_and_records_the_final_model(clean):
    model = tiny_cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    d = defenses.get("sau")
    cfg = d.make_config("paper", epochs=2, batch_size=64, pgd_steps=2)
    res = d.run(model, clean, method("supervised"), cfg, lambda m: {"acc": 10.0})
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    rec = res.records[-1]
    assert rec["defense"] == "sau" and rec["stage"] == "final" and rec["round"] == 1 and rec["acc"] == 10.0
    assert set(d.columns) <= set(rec) and 0.0 <= rec["sau_shared_rate"] <= 1.0
    assert res.model is res.outputs[-1]
    assert not torch.equal(res.model.convs[0].weight, model.convs[0].weight)
    assert_same_state(res.model, d.run(model, clean, method("supervised"), cfg).model)  # deterministic given the seed


@pytest.mark.parametrize("arch", ARCHS)
def test_runs_on_every_supervised_architecture(arch, embedded):
    assert_runs_on(arch, "sau", embedded, epochs=1, batch_size=4, pgd_steps=1)


# --- the end-to-end proof ------------------------------------------------------------------------------------


# CPU scale for the proof (see its docstring): 8 epochs of batch 64, Adam lr 1.5e-3 with a cosine decay
PROOF = dict(optim=OptimConfig(name="adam", lr=1.5e-3, weight_decay=0.0, schedule="cosine"), batch_size=64, epochs=8)


@pytest.mark.slow
def test_sau_removes_badnets(badnets_reduced, say):
    """SAU removes BadNets (TSC paper, Table 1, CIFAR-10 BadNet 5%: ACC 92.64 → 89.32, ASR 88.74 → 1.74; the
    paper notes SAU's unstable ACC, e.g. 65.38 on BadNet 1%).

    CPU scale: the shared reduced BadNets cnn and the 500-image clean set; SAU with BackdoorBench's PGD and
    loss (5 steps, L∞ 0.2, step 0.2, init max, β 0.01/1, λ 1/0/1, BN frozen) but 8 epochs of batch 64 (64
    steps instead of BackdoorBench's 1,000) at Adam lr 1.5e-3 decayed by a cosine (BackdoorBench: a constant
    1e-4). Measured while exploring (1 thread, same settings): ASR 96.2 → 0.0 / 0.0 / 0.0 / 0.0 / 0.2 / 1.1 /
    2.2 / 2.2 after each epoch, ACC 86.6 → 59.0 / 64.8 / 64.2 / 70.0 / 72.0 / 73.6 / 78.0 / 78.0: SAU wipes
    the backdoor at once, with the clean accuracy, then the clean loss recovers ACC. At this scale a smaller
    lr unlearns less stably: lr 1e-4 left ASR at 68-88 after 4 epochs; lr 1e-3 constant oscillated between
    ASR 9 and 24 over 10 epochs (ACC 80-84); lr 2e-3 cosine kept ASR 0.0 but ACC at 70.4.
    Measured by this test: ACC 86.6 → 78.2, ASR 96.2 → 2.2; 208 s CPU over 2 threads (169 s wall while another
    training shared the 2 cores). Later, on a fixture built by other kernels (ACC 86.4 / 86.8, ASR 96.0 with 1 /
    2 threads): ASR 8.2 / 8.4 (ACC 80.8 / 80.6); with seed 1 ASR 0.2 (ACC 73.2); 10 epochs 6.4 / 2.9 (seeds 0 /
    1), 12 epochs 6.7 / 3.3. SAU's end ASR at this scale spreads over 0-9 with kernels and seed.
    Asserted: ASR < 15 (Table 1's line for a failed defense; was < 10, which the 8.2 above nearly crossed),
    ACC within 15 points of the backdoored model's (SAU's ACC cost).
    """
    bd, clean, before = badnets_reduced
    d = defenses.get("sau")
    t0, c0 = time.time(), time.process_time()
    res = d.run(bd.model, clean, method("supervised"), d.make_config("paper", **PROOF), bd.evaluate)
    secs, cpu = time.time() - t0, time.process_time() - c0
    after = res.records[-1]
    say(f"sau on badnets_reduced: before ACC {before['acc']:.2f} ASR {before['asr']:.2f}; "
        f"after ACC {after['acc']:.2f} ASR {after['asr']:.2f}; shared {after['sau_shared_rate']:.2f}; "
        f"{secs:.1f}s wall, {cpu:.1f}s CPU")
    assert after["asr"] < 15.0
    assert after["acc"] > before["acc"] - 15.0
