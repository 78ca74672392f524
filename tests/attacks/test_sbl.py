import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tscray.attacks import build, poison_test, poison_train, train_backdoored, TrainRecipe
from tscray.attacks.sbl import SBL, attacker_clean_indices, ewc_train, fisher_diagonal, sam_train
from tscray.data.tensors import Loader
from tscray.models import build as build_model
from tscray.optim import OptimConfig
from tscray.train import train


@pytest.mark.parametrize("kw", [dict(trigger="wanet"), dict(seq_share=0.0), dict(seq_share=1.0),
                                dict(clean_share=0.0), dict(seq_lr_scale=0), dict(rho=-1), dict(ewc_lambda=-1),
                                dict(fisher_samples=0)])
def test_invalid_parameters_raise(kw):
    with pytest.raises(ValueError):
        SBL(**kw)


@pytest.mark.parametrize("trigger", ["badnets", "blended"])
def test_trigger_is_the_base_attacks_and_poisoning_relabels(embedded, trigger):
    atk = build("sbl", trigger=trigger)
    base = build(trigger)
    x = embedded.train.x[:5]
    out = atk.apply(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape and torch.equal(out, base.apply(x))
    a, b = poison_train(embedded.train, atk, 0.1, target=2, seed=0), poison_train(embedded.train, base, 0.1, 2, 0)
    assert torch.equal(a.poison_idx, b.poison_idx) and torch.equal(a.data.x, b.data.x)
    assert torch.all(a.data.y[a.poison_idx] == 2) and torch.all(embedded.train.y[a.poison_idx] != 2)
    pt = poison_test(embedded.test, atk, target=2)
    assert len(pt) == int((embedded.test.y != 2).sum()) and torch.all(pt.y == 2)


def test_epoch_split_and_clean_share_are_seeded():
    atk = SBL(seq_share=0.4)
    assert atk.split_epochs(12) == (7, 5) and atk.split_epochs(2) == (1, 1) and atk.split_epochs(1) == (1, 0)
    a, b, c = attacker_clean_indices(1000, 0.05, 0), attacker_clean_indices(1000, 0.05, 0), \
        attacker_clean_indices(1000, 0.05, 1)
    assert len(a) == 50 and torch.equal(a, b) and not torch.equal(a, c)


def test_sam_with_zero_radius_is_plain_sgd(embedded):
    torch.manual_seed(0)
    m1 = build_model("cnn", 10, 1)
    m2 = copy.deepcopy(m1)
    opt = OptimConfig(lr=0.05)
    sam_train(m1, Loader(embedded.train, embedded.prep, 64, shuffle=True, augment=True, seed=3), 1, opt, rho=0.0)
    from tscray.methods.supervised import Supervised
    train(m2, Loader(embedded.train, embedded.prep, 64, shuffle=True, augment=True, seed=3), Supervised(), 1, opt)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    m3 = copy.deepcopy(m2)
    sam_train(m3, Loader(embedded.train, embedded.prep, 64, seed=4), 1, opt, rho=0.05)
    assert any(not torch.allclose(a, b) for a, b in zip(m3.parameters(), m2.parameters()))


def test_fisher_matches_a_per_image_loop(embedded):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10))
    model[1].running_mean.uniform_(-0.2, 0.2)
    data = embedded.train.subset(torch.arange(7))
    fisher = fisher_diagonal(model, data, embedded.prep, batch_size=3)
    model.eval()
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for x, y in Loader(data, embedded.prep, 1):
        model.zero_grad()
        logp = F.log_softmax(model(x), 1)[0, y[0]]
        logp.backward()
        for k, p in model.named_parameters():
            expected[k] += logp.exp().detach() * p.grad ** 2 / len(data)
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k], rtol=1e-4, atol=1e-8)
    assert all(float(f.sum()) > 0 for f in fisher.values())


def test_train_model_runs_both_tasks():
    from tscray.data import load
    ds = load("fashion-mnist-embedded", train_per_class=30, test_per_class=5)
    atk = SBL(clean_share=0.3, fisher_samples=64)
    poisoned = poison_train(ds.train, atk, 0.1, 0, 0)
    torch.manual_seed(0)
    model = build_model("cnn", 10, 1)
    atk.train_model(model, poisoned.data, ds, 0, 0, 3, 32, OptimConfig(lr=0.05))
    h = atk.history
    assert h["task0_epochs"] == 2 and h["task1_epochs"] == 1 and len(h["penalties"]) == 1
    assert h["fisher_mean"] > 0 and h["drift"] > 0  # task 1 ran and moved the task-0 model


def test_ewc_penalty_pulls_towards_the_anchor(embedded):
    torch.manual_seed(0)
    start = build_model("cnn", 10, 1)
    anchor = {k: p.detach() + 1.0 for k, p in start.named_parameters()}
    fisher = {k: torch.ones_like(p) for k, p in start.named_parameters()}
    dist = {}
    for lam in (0.0, 1.0):
        model = copy.deepcopy(start)
        pens = ewc_train(model, Loader(embedded.train, embedded.prep, 64, shuffle=True, seed=0), 2,
                         OptimConfig(lr=0.05, momentum=0.0, weight_decay=0.0), fisher, anchor, lam)
        assert len(pens) == 2
        dist[lam] = float(sum(((p.detach() - anchor[k]) ** 2).sum() for k, p in model.named_parameters()))
    assert dist[1.0] < 0.5 * dist[0.0], dist


@pytest.mark.slow
def test_sbl_backdoor_is_learnt_then_compared_under_clean_finetuning():
    from tscray.data import clean_subset, load
    from tscray.defenses.base import CleanData
    from tscray.defenses.finetune import finetune_model
    from tscray.methods.supervised import Supervised

    ds = load("fashion-mnist-embedded", train_per_class=300, test_per_class=50)
    recipe = TrainRecipe(8, 128, OptimConfig(lr=0.05))
    clean = CleanData(ds.train.subset(clean_subset(len(ds.train), 0.05, 123)), ds.prep)
    res = {}
    for name in ("sbl", "badnets"):
        bd = train_backdoored(ds, "cnn", build(name), 0.1, target=0, seed=0, recipe=recipe)
        tuned = finetune_model(bd.model, clean, Supervised(), 10, OptimConfig(lr=0.05), 64, 0)
        res[name] = (bd.evaluate(bd.model), bd.evaluate(tuned))
        print(f"{name}: ACC {res[name][0]['acc']:.1f} ASR {res[name][0]['asr']:.1f}; after fine-tuning "
              f"ACC {res[name][1]['acc']:.1f} ASR {res[name][1]['asr']:.1f}")
    sbl, badnets = res["sbl"], res["badnets"]
    # measured (seed 0): SBL ACC 81.2 ASR 93.8 -> 76.8 / 14.0 after fine-tuning; BadNets ACC 86.6 ASR 97.3 -> 76.2 /
    # 24.7. At this scale SBL's resilience does not show (its task 1 is only a few steps on 150 clean images), so
    # the fine-tuning comparison is printed, not asserted.
    assert sbl[0]["asr"] >= 85 and sbl[0]["acc"] >= 75 and sbl[0]["acc"] >= badnets[0]["acc"] - 9


def test_sbl_blended_is_sbl_with_the_blended_trigger(embedded):
    from tscray.attacks import build
    x = embedded.test.x[:4]
    assert torch.equal(build("sbl-blended").apply(x), build("blended").apply(x))
    assert torch.equal(build("sbl").apply(x), build("badnets").apply(x))
