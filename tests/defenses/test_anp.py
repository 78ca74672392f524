"""ANP (Adversarial Neuron Pruning): the mask/noise mechanism on tiny models, and the BadNets proof."""

from __future__ import annotations

import copy
import dataclasses
import time

import pytest
import torch

from conftest import randomize
from tscray import defenses, models
from tscray.data import clean_subset
from tscray.defenses import CleanData
from tscray.defenses.anp import (ANPConfig, NeuronPerturbation, ascent_step, neuron_affine, optimize_masks,
                                 prune_neurons, prune_selection)
from tscray.defenses.layers import UnsupportedModel, batchnorms
from tscray.methods import build as method

TINY = dict(iterations=3, batch_size=16, log_every=1)


def tiny_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize(models.build("cnn", 10, in_channels=1, widths=(8, 8, 16, 16)), seed)


@pytest.fixture
def clean(embedded):
    return CleanData(embedded.train.subset(clean_subset(len(embedded.train), 0.2, 0)), embedded.prep)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the optimisation's constraints -----------------------------------------------------------------------


def test_masks_stay_in_unit_interval_and_noise_in_budget_after_every_step(clean):
    """A large mask lr drives masks into both bounds; every step leaves them in [0, 1] and δ, ξ in [−ε, ε]."""
    eps = 0.25  # exact in float32: the bound is checked with ==
    cfg = ANPConfig(iterations=8, anp_eps=eps, batch_size=32,
                    mask_optim=dataclasses.replace(ANPConfig().mask_optim, lr=20.0))
    seen = {"steps": 0, "low": 0, "noise_at_bound": 0}

    def check(i, state):
        seen["steps"] += 1
        for m in state.masks:
            m = m.detach()
            assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0, f"step {i}: mask outside [0, 1]"
            seen["low"] += int((m < 0.5).sum())
        for t in state.noise_w + state.noise_b:
            assert float(t.abs().max()) <= eps, f"step {i}: noise outside [-eps, eps]"
            seen["noise_at_bound"] += int((t.abs() == eps).sum())

    optimize_masks(tiny_cnn(), clean, method("supervised"), cfg, on_step=check)
    assert seen["steps"] == 8
    assert seen["low"] > 0, "masks never moved: the clamp was not exercised"
    assert seen["noise_at_bound"] > 0, "the ascent step never reached the budget"


def test_released_preset_leaves_noise_unprojected(clean):
    """The released code does not project: one ε step from a uniform start exceeds ε somewhere."""
    eps = 0.25  # exact in float32: the bound is checked with ==
    cfg = dataclasses.replace(ANPConfig.preset("released"), anp_eps=eps, **TINY)
    peak = []
    optimize_masks(tiny_cnn(), clean, method("supervised"), cfg,
                   on_step=lambda i, s: peak.append(max(float(t.abs().max()) for t in s.noise_w + s.noise_b)))
    assert max(peak) > eps and max(peak) <= 2 * eps + 1e-6


def test_ascent_step_moves_along_the_gradient_sign_and_projects():
    noise = torch.tensor([0.0, 0.3, -0.3, 0.1])
    grad = torch.tensor([1.0, 1.0, -2.0, -0.5])
    assert torch.equal(ascent_step(noise, grad, 0.2, 0.4, project=True), torch.tensor([0.2, 0.4, -0.4, -0.1]))
    assert torch.allclose(ascent_step(noise, grad, 0.2, 0.4, project=False), torch.tensor([0.2, 0.5, -0.5, -0.1]))


def test_neuron_affine_is_the_papers_parametrisation():
    g, b = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    m, d, x = torch.tensor([1.0, 0.25]), torch.tensor([0.1, -0.2]), torch.tensor([-0.4, 0.2])
    w, bb = neuron_affine(g, b, m, d, x)
    assert torch.allclose(w, g * (m + d)) and torch.allclose(bb, b * (1 + x))
    w, bb = neuron_affine(g, b, m)
    assert torch.equal(w, g * m) and torch.equal(bb, b)


@pytest.mark.parametrize("train_bn", [False, True])
def test_zero_noise_and_full_masks_give_the_original_model_exactly(train_bn):
    model = tiny_cnn()
    model.train(train_bn)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    state = NeuronPerturbation(model)
    state.reset_noise(0.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(state.forward(perturbed=True)(x), ref)
        assert torch.equal(state.forward(perturbed=False)(x), ref)
        state.reset_noise(0.4, torch.Generator().manual_seed(1))  # the substitution does take effect
        assert not torch.allclose(state.forward(perturbed=True)(x), ref)


def test_a_zero_mask_is_the_pruned_neuron():
    """Masking neuron k to 0 and pruning it (γ_k = 0) give the same function: what ANP learns is what it cuts."""
    model = tiny_cnn().eval()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    state = NeuronPerturbation(model)
    sel = [torch.zeros(m.numel(), dtype=torch.bool) for m in state.masks]
    sel[1][[0, 3]] = True
    sel[3][5] = True
    with torch.no_grad():
        for m, s in zip(state.masks, sel):
            m[s] = 0.0
        masked = state.forward(perturbed=False)(x)
    pruned = tiny_cnn().eval()
    prune_neurons(pruned, sel)
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked, atol=1e-6)


# --- pruning ----------------------------------------------------------------------------------------------


def test_pruning_zeroes_exactly_the_neurons_at_or_below_the_threshold():
    model = tiny_cnn()
    before = tiny_cnn()
    gen = torch.Generator().manual_seed(3)
    masks = [torch.rand(bn.num_features, generator=gen) for _, bn in batchnorms(model)]
    masks[0][2] = 0.2  # ties go to pruning (the authors' ``<=``)
    masks[2][1] = 0.2001
    sel = prune_selection(masks, "threshold", threshold=0.2)
    count = prune_neurons(model, sel)
    expected = sum(int((m <= 0.2).sum()) for m in masks)
    assert count == expected > 2
    sd, sb = model.state_dict(), before.state_dict()
    for (name, _), m in zip(batchnorms(model), masks):
        w, w0 = sd[f"{name}.weight"], sb[f"{name}.weight"]
        assert torch.equal(w[m <= 0.2], torch.zeros(int((m <= 0.2).sum())))
        assert torch.equal(w[m > 0.2], w0[m > 0.2])
    assert sd[f"{batchnorms(model)[0][0]}.weight"][2] == 0 and sd[f"{batchnorms(model)[2][0]}.weight"][1] != 0
    for k in sd:  # nothing but BN weights changes: biases, running statistics, convs, head
        if not any(k == f"{name}.weight" for name, _ in batchnorms(model)):
            assert torch.equal(sd[k], sb[k]), k


def test_pruning_by_number_and_fraction_takes_the_smallest_masks():
    masks = [torch.tensor([0.9, 0.1, 0.5]), torch.tensor([0.3, 0.05]), torch.tensor([0.7, 0.2, 0.6, 0.8, 1.0])]
    sel = prune_selection(masks, "number", number=3)
    assert [s.tolist() for s in sel] == [[False, True, False], [False, True], [False, True, False, False, False]]
    sel = prune_selection(masks, "fraction", fraction=0.4)  # 4 of 10
    assert sum(int(s.sum()) for s in sel) == 4 and bool(sel[1][0])
    assert sum(int(s.sum()) for s in prune_selection(masks, "number", number=50)) == 10


# --- the defense's contract -------------------------------------------------------------------------------


def test_run_leaves_the_input_unchanged_and_reports_its_columns(clean):
    model = tiny_cnn()
    ref = tiny_cnn()
    anp = defenses.get("anp")
    cfg = anp.make_config("paper", pruning_by="fraction", pruning_fraction=0.25, **TINY)
    lines = []
    res = anp.run(model, clean, method("supervised"), cfg, evaluate=lambda m: {"acc": 50.0}, log=lines.append)
    assert states_equal(model, ref)
    rec = res.records[-1]
    assert rec["defense"] == "anp" and rec["stage"] == "final" and rec["round"] == 1 and rec["acc"] == 50.0
    assert set(anp.columns) <= set(rec)
    assert rec["anp_neurons"] == 8 + 8 + 16 + 16 and rec["anp_pruned"] == 12
    assert res.model is res.outputs[0] and res.model is not model and lines
    zeroed = sum(int(((bn.weight == 0) & (bn0.weight != 0)).sum())
                 for (_, bn), (_, bn0) in zip(batchnorms(res.model), batchnorms(model)))
    assert zeroed == rec["anp_pruned"]
    for k, v in model.state_dict().items():  # running statistics are the input's
        if "running" in k:
            assert torch.equal(res.model.state_dict()[k], v), k


def test_run_is_deterministic_given_the_seed(clean):
    anp = defenses.get("anp")
    cfg = anp.make_config("paper", pruning_by="number", pruning_number=10, **TINY)
    a = anp.run(tiny_cnn(), clean, method("supervised"), cfg)
    b = anp.run(tiny_cnn(), clean, method("supervised"), cfg)
    assert states_equal(a.model, b.model)


def test_no_iterations_and_zero_budget_prune_nothing(clean):
    """Masks start at 1 > threshold: with ε = 0 and no updates, ANP returns the model as it was."""
    model = tiny_cnn()
    anp = defenses.get("anp")
    res = anp.run(model, clean, method("supervised"), anp.make_config("paper", iterations=0, anp_eps=0.0))
    assert res.records[-1]["anp_pruned"] == 0 and states_equal(res.model, model)


def test_the_mlp_is_refused(clean):
    anp = defenses.get("anp")
    mlp = models.build("mlp", 10, in_channels=1, image_size=28)
    with pytest.raises(UnsupportedModel, match="BatchNorm"):
        anp.check_model(mlp)
    with pytest.raises(UnsupportedModel, match="BatchNorm"):
        anp.run(mlp, clean, method("supervised"), anp.make_config("paper", **TINY))


SMALL = {"cnn": dict(in_channels=1, widths=(8, 8, 16, 16)), "mlp": dict(in_channels=1, image_size=28),
         "vgg19_bn": dict(in_channels=1, cfg=(8, "M", 16, "M"), hidden=16),
         "preactresnet18": dict(in_channels=1, num_blocks=(1, 1, 1, 1))}
HEAVY = {"resnet18", "resnet50"}


@pytest.mark.parametrize("name", [n for n in models.names() if not n.startswith("simclr-")])
def test_every_bn_architecture_runs(name, clean):
    model = models.build(name, 10, **SMALL.get(name, dict(in_channels=1)))
    anp = defenses.get("anp")
    if name == "mlp":
        with pytest.raises(UnsupportedModel):
            anp.check_model(model)
        return
    anp.check_model(model)
    batch = 2 if name in HEAVY else 4  # BN in train mode needs > 1 value per channel; 2 keeps resnet50 quick
    cfg = anp.make_config("paper", iterations=1, batch_size=batch, pruning_by="number", pruning_number=3)
    res = anp.run(model, clean, method("supervised"), cfg)
    assert res.records[-1]["anp_pruned"] == 3
    assert res.records[-1]["anp_neurons"] == sum(bn.num_features for _, bn in batchnorms(model))
    with torch.no_grad():
        assert res.model.eval()(clean.prep.normalize(clean.data.x[:2])).shape == (2, 10)


@pytest.mark.parametrize("field,value", [("iterations", -1), ("anp_eps", -0.1), ("anp_steps", 0),
                                         ("anp_alpha", 1.5), ("pruning_by", "random"), ("pruning_threshold", 2.0),
                                         ("pruning_number", -3), ("pruning_fraction", 1.2), ("batch_size", 0),
                                         ("log_every", 0)])
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ANPConfig(**{field: value})


def test_presets():
    paper, released = ANPConfig.preset("paper"), ANPConfig.preset("released")
    assert (paper.iterations, paper.anp_eps, paper.anp_alpha, paper.pruning_threshold) == (2000, 0.4, 0.2, 0.2)
    assert (paper.mask_optim.lr, paper.mask_optim.momentum, paper.batch_size) == (0.2, 0.9, 128)
    assert paper.project_noise and not released.project_noise
    with pytest.raises(ValueError, match="paper, released"):
        ANPConfig.preset("nope")


# --- the proof on BadNets ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_anp_removes_badnets(badnets_reduced, say):
    """ANP's masks find the BadNets backdoor in the reduced cnn: pruning the lowest-mask 10% of its BN
    neurons removes it at a small ACC cost, and pruning as many random neurons does not (BackdoorBench,
    PreActResNet-18 CIFAR-10 10%: ASR 95.0 -> 0.73, ACC 91.3 -> 84.2).

    CPU-scale config: 600 iterations at batch 32 instead of 2,000 at 128 (the paper's defaults otherwise:
    ε 0.4, α 0.2, mask lr 0.2), pruning by fraction 0.1 (29 of 288 neurons) instead of the paper's threshold
    0.2. The threshold is not a stable proof on a model this small: the masks are still moving at 600
    iterations and the backdoor sits in the 20-30 lowest, so how many fall under 0.2 decides the result.
    Measured on the fixture built with 1 thread (ACC 86.4, ASR 96.0; CI's xdist workers): threshold 0.2
    pruned 20 / 22 neurons and left ASR 54.2 / 42.7 (seeds 0 / 1), 19 at 1,200 iterations left 38.0, 23 at
    2,000 left 13.8; the lowest 29 left ASR 10.9 (ACC 84.6) at 600, the lowest 30 7.8 / 5.1 (seeds 0 / 1),
    5.3 at 1,200, 4.9 at 2,000. With the 2-thread fixture of a serial run (ACC 86.8), the lowest 29: ASR
    13.1 / 8.9 (seeds 0 / 2), ACC 85.4 / 83.6. Twenty-nine random
    neurons (3 draws) left ASR 92.2-96.4 at ACC 62.6-71.2. An earlier version asserted the threshold run;
    it passed on one machine's kernels (ASR 7.3) and failed on two others (54.2, 57.1).
    Thresholds: ASR <= 25 (worst measured 13.1), ACC within 5 points (worst -3.2), random control ASR >= 80.
    """
    bd, clean, before = badnets_reduced
    anp = defenses.get("anp")
    cfg = anp.make_config("paper", iterations=600, batch_size=32, pruning_by="fraction", pruning_fraction=0.1)
    t0 = time.time()
    res = anp.run(bd.model, clean, method("supervised"), cfg, bd.evaluate)
    secs = time.time() - t0
    after = res.records[-1]
    gen = torch.Generator().manual_seed(0)
    ones = [torch.ones(bn.num_features) for _, bn in batchnorms(bd.model)]
    random_pruned = copy.deepcopy(bd.model)
    prune_neurons(random_pruned, prune_selection([torch.rand(m.shape, generator=gen) for m in ones], "number",
                                                 number=after["anp_pruned"]))
    control = bd.evaluate(random_pruned)
    say(f"\nANP ({cfg.iterations} it x {cfg.batch_size}): ACC {before['acc']:.2f} -> {after['acc']:.2f}, "
        f"ASR {before['asr']:.2f} -> {after['asr']:.2f}, pruned {after['anp_pruned']}/{after['anp_neurons']}, "
        f"{secs:.0f}s; as many random neurons: ACC {control['acc']:.2f} ASR {control['asr']:.2f}")
    assert before["asr"] >= 90.0
    assert after["anp_pruned"] == round(0.1 * after["anp_neurons"])
    assert after["asr"] <= 25.0
    assert after["acc"] >= before["acc"] - 5.0
    assert control["asr"] >= 80.0
