"""Feature Shift Tuning: the head is re-initialised at its original norm, the penalty turns it away from
the original direction faster than plain fine-tuning, the norm holds after every step, and it runs on
every supervised architecture. The slow proof is on BadNets."""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import pytest
import torch
from torch import nn

from tscray import defenses, models
from tscray.data import clean_subset
from tscray.defenses import CleanData, fst, layers
from tscray.methods import build as method

from conftest import randomize

FST = defenses.get("fst")


@pytest.fixture
def setting(embedded):
    torch.manual_seed(0)
    model = randomize(models.build("cnn", 10, in_channels=1, widths=(8, 8, 16, 16)))
    clean = CleanData(embedded.train.subset(clean_subset(len(embedded.train), 0.2, 0)), embedded.prep)
    return model, clean


def test_reinit_keeps_the_norm_and_draws_a_new_head():
    torch.manual_seed(0)
    head = nn.Linear(64, 10)
    with torch.no_grad():
        head.weight.mul_(7.0)  # a trained head's norm differs from the initialiser's
    before = head.weight.detach().clone()
    original, norm = fst.reinit_head(head, torch.Generator().manual_seed(3))
    assert torch.equal(original, before) and norm == pytest.approx(float(before.norm()))
    assert float(head.weight.detach().norm()) == pytest.approx(norm, rel=1e-6)
    assert abs(fst.cosine(head.weight, before)) < 0.3, "the new head should be unrelated to the old one"
    bound = 1 / math.sqrt(64)
    assert head.bias.abs().max() <= bound and head.bias.abs().max() > bound / 4
    again = nn.Linear(64, 10)
    with torch.no_grad():
        again.weight.copy_(before)
    fst.reinit_head(again, torch.Generator().manual_seed(3))
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)


def test_penalty_gradient_is_alpha_times_the_original_weight():
    w = torch.randn(10, 16, requires_grad=True)
    w0 = torch.randn(10, 16)
    fst.shift_penalty(w, w0, 0.2).backward()
    assert torch.allclose(w.grad, 0.2 * w0)
    assert float(fst.shift_penalty(w0, w0, 0.5)) == pytest.approx(0.5 * float((w0 * w0).sum()))


def test_project_norm_rescales_to_the_given_norm():
    w = torch.randn(10, 16) * 3
    d = w / w.norm()
    fst.project_norm(w, 2.5)
    assert float(w.norm()) == pytest.approx(2.5, rel=1e-6) and torch.allclose(w / w.norm(), d)


def tuned_head(model: nn.Module, clean: CleanData, alpha: float, epochs: int = 2) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(tuned head weight, original head weight, original norm) after FST's tuning from the same re-init."""
    tuned = copy.deepcopy(model)
    head = layers.classifier(tuned)
    original, norm = fst.reinit_head(head.module, torch.Generator().manual_seed(0))
    cfg = FST.make_config(alpha=alpha, epochs=epochs, batch_size=32)
    fst.tune(tuned, head.name, original, norm, clean, method("supervised"), cfg)
    return head.module.weight.detach(), original, norm


def test_penalty_pushes_the_head_away_from_the_original_direction(setting):
    """Same re-init, same batches (16 SGD steps): FST's alpha 0.2 ends with a smaller <w, w_orig> than plain
    tuning of the re-initialised head (alpha 0). Measured: 0.193 vs 0.314, ||w_orig||² = 3.23; the margin
    asked is 0.02·||w_orig||² = 0.065."""
    model, clean = setting
    plain, original, norm = tuned_head(model, clean, 0.0)
    shifted, _, _ = tuned_head(model, clean, 0.2)
    ip = lambda w: float((w * original).sum())  # noqa: E731
    assert ip(shifted) < ip(plain) - 0.02 * norm ** 2
    assert fst.cosine(shifted, original) < fst.cosine(plain, original)


def test_norm_is_preserved_after_the_steps(setting):
    model, clean = setting
    for alpha in (0.0, 0.2, 5.0):
        w, _, norm = tuned_head(model, clean, alpha, epochs=1)
        assert float(w.norm()) == pytest.approx(norm, rel=1e-5)


def test_run_leaves_the_model_alone_is_deterministic_and_reports(setting):
    model, clean = setting
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FST.make_config(epochs=1, batch_size=50)
    a = FST.run(model, clean, method("supervised"), cfg, evaluate=lambda m: {"acc": 1.0})
    b = FST.run(model, clean, method("supervised"), cfg)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    rec = a.records[-1]
    assert (rec["defense"], rec["round"], rec["stage"], rec["acc"]) == ("fst", 1, "final", 1.0)
    assert set(FST.columns) <= set(rec) and -1.0 <= rec["fst_head_cos"] <= 1.0
    assert float(a.model.head.weight.detach().norm()) == pytest.approx(float(model.head.weight.detach().norm()), rel=1e-5)
    assert not torch.equal(a.model.convs[0].weight, model.convs[0].weight), "FST tunes the whole model"


SMALL_KW = {"cnn": dict(widths=(8, 8, 16, 16)), "mlp": dict(image_size=28, hidden=(32, 16)),
            "vgg19_bn": dict(cfg=(8, "M", 8, "M", 16, "M", 16, "M"), hidden=32)}


@pytest.mark.parametrize("name", [n for n in models.names() if not n.startswith("simclr-")])
def test_runs_on_every_supervised_architecture(name, embedded):
    torch.manual_seed(0)
    model = models.build(name, 10, in_channels=1, **SMALL_KW.get(name, {}))
    FST.check_model(model)
    clean = CleanData(embedded.train.subset(clean_subset(len(embedded.train), 0.02, 0)), embedded.prep)
    head = layers.classifier(model)
    norm = float(head.module.weight.detach().norm())
    res = FST.run(model, clean, method("supervised"), FST.make_config(epochs=1, batch_size=12))
    assert float(layers.classifier(res.model).module.weight.detach().norm()) == pytest.approx(norm, rel=1e-4)


def test_check_model_refuses_a_model_without_a_classifier_spec():
    with pytest.raises(layers.UnsupportedModel, match="permutation spec"):
        FST.check_model(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))


@pytest.mark.parametrize("field,value", [("alpha", -0.1), ("epochs", -1), ("batch_size", 0)])
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FST.make_config("paper", **{field: value})


def test_presets_are_the_papers_and_the_readmes():
    paper, released = FST.make_config("paper"), FST.make_config("released")
    assert (paper.alpha, paper.epochs, paper.batch_size) == (0.2, 10, 128)
    assert (paper.optim.name, paper.optim.lr, paper.optim.momentum, paper.optim.weight_decay,
            paper.optim.schedule) == ("sgd", 0.01, 0.9, 0.0, "cosine")
    assert released == dataclasses.replace(paper, alpha=0.1)
    with pytest.raises(ValueError, match="unknown FST preset"):
        FST.make_config("nope")


# --- the end-to-end proof -----------------------------------------------------------------------------


@pytest.mark.slow
def test_fst_removes_badnets(badnets_reduced, say):
    """FST on the shared BadNets cnn (10% poison, target 0) with the paper's CIFAR-10 settings unchanged
    (alpha 0.2, SGD lr 0.01 momentum 0.9, cosine, 10 epochs, batch 128: 40 steps on the 500-image clean
    set, cheap on CPU as it is).

    Measured (2 threads): before ACC 86.6 / ASR 96.2; after ACC 76.2 / ASR 0.4, cos(w, w_orig) -0.16.
    The backdoor is gone, at a cost in ACC of ~10 points the paper does not see on CIFAR-10 ResNet-18
    (its head is re-learnt from 500 images here; 20 or 40 epochs gave the same ACC, 76.4 / 77.6, and
    plain tuning of the re-initialised head, alpha 0, 79.0 with ASR 4.4). Asserted: ASR below 5 (the
    paper's FST leaves ~1-2% on BadNets), ACC within 15 points, and the head turned away from its
    original direction (cosine below 0).
    """
    bd, clean, before = badnets_reduced
    t0 = time.time()
    res = FST.run(bd.model, clean, method("supervised"), FST.make_config("paper"), evaluate=bd.evaluate)
    secs = time.time() - t0
    after = res.records[-1]
    say(f"fst on badnets_reduced: before ACC {before['acc']:.2f} ASR {before['asr']:.2f}; after ACC "
        f"{after['acc']:.2f} ASR {after['asr']:.2f}, cos(w, w_orig) {after['fst_head_cos']:.2f}; {secs:.1f}s")
    assert after["asr"] < 5.0
    assert after["acc"] > before["acc"] - 15.0
    assert after["fst_head_cos"] < 0.0
