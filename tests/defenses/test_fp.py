"""Fine-Pruning: what it prunes (only the classifier's input columns of the least-active feature units),
where it stops (BackdoorBench's accuracy bound, or the cap), that pruned units stay pruned through
fine-tuning, and that it runs on every supervised architecture. The slow proof is on BadNets."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from tscray import defenses, models
from tscray.data import clean_subset
from tscray.data.tensors import ImageData
from tscray.defenses import CleanData, fp, layers
from tscray.methods import build as method
from tscray.symmetry.spec import Expand, PermSpec, conv_bn, linear

from conftest import randomize

FP = defenses.get("fp")


def tiny_cnn(seed: int, clean: CleanData) -> nn.Module:
    """A small cnn with random BN affine parameters and BN statistics measured on the clean images, so every
    feature unit is alive and their mean activations differ."""
    torch.manual_seed(seed)
    model = randomize(models.build("cnn", 10, in_channels=1, widths=(8, 8, 16, 16)), seed)
    with torch.no_grad():
        for bn in model.bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        model.train()
        for x, _ in clean.loader(1000, 0, shuffle=False, augment=False):
            model(x)
        model.eval()
        # a head on standardised features, so the predictions spread over the classes (a random head on
        # raw features predicts nearly one class, and accuracy could not see pruning)
        feats = head_inputs(model, clean)
        mean, std = feats.mean(0), feats.std(0)
        std = std.clamp_min(0.5 * float(std.median()))  # a near-constant unit must not dominate
        gen = torch.Generator().manual_seed(seed)
        model.head.weight.copy_(torch.randn(10, 16, generator=gen) / std)
        model.head.bias.copy_(-model.head.weight @ mean)
    return model


@torch.no_grad()
def self_labelled(model: nn.Module, clean: CleanData, min_classes: int = 4) -> CleanData:
    """The clean images labelled with the model's own predictions: clean accuracy starts at 100%, so any
    change pruning makes to the predictions shows in the accuracy the search reads."""
    model.eval()
    preds = torch.cat([model(x).argmax(1) for x, _ in clean.loader(256, 0, shuffle=False, augment=False)])
    assert preds.unique().numel() >= min_classes, "a model predicting (nearly) one class makes accuracy blind to pruning"
    return CleanData(ImageData(clean.data.x, preds), clean.prep)


@pytest.fixture
def clean(embedded):
    return CleanData(embedded.train.subset(clean_subset(len(embedded.train), 0.2, 0)), embedded.prep)


@torch.no_grad()
def head_inputs(model: nn.Module, clean: CleanData, head_name: str = "head") -> torch.Tensor:
    """The classifier's inputs over the clean set (eval mode), measured independently of fp.py."""
    got = []
    h = model.get_submodule(head_name).register_forward_pre_hook(lambda _m, a: got.append(a[0]))
    model.eval()
    for x, _ in clean.loader(1000, 0, shuffle=False, augment=False):
        model(x)
    h.remove()
    return torch.cat(got)


def head_input_means(model: nn.Module, head_name: str, clean: CleanData) -> torch.Tensor:
    """Mean of the classifier's input over the clean set."""
    return head_inputs(model, clean, head_name).mean(0)


@torch.no_grad()
def accuracy_with_pruned(model: nn.Module, head_name: str, columns: torch.Tensor, clean: CleanData) -> float:
    """Clean accuracy of a copy with ``columns`` of the classifier zeroed, by full forwards."""
    import copy
    m = copy.deepcopy(model).eval()
    m.get_submodule(head_name).weight[:, columns] = 0.0
    right = total = 0
    for x, y in clean.loader(1000, 0, shuffle=False, augment=False):
        right += int((m(x).argmax(1) == y).sum())
        total += len(y)
    return right / total


# --- the pure pieces ----------------------------------------------------------------------------------


def test_prune_counts_follow_backdoorbench_steps_and_the_cap():
    counts = fp.prune_counts(512, 0.01, 0.95)  # PreActResNet-18: ceil(5.12) = 6 units per step
    assert counts[:3] == [6, 12, 18] and counts[-1] == 486 and max(counts) <= 0.95 * 512
    assert fp.prune_counts(16, 0.01, 0.5) == list(range(1, 9))
    assert fp.prune_counts(16, 0.25, 1.0) == [4, 8, 12, 16]
    assert fp.prune_counts(16, 0.01, 0.0) == []


def test_search_keeps_the_last_count_inside_the_bound_and_stops_at_the_first_outside():
    accs = {0: 0.90, 1: 0.88, 2: 0.82, 3: 0.80, 4: 0.89}  # relative drops: 2.2%, 8.9%, 11.1% (stop), -
    asked = []

    def accuracy(n: int) -> float:
        asked.append(n)
        return accs[n]
    kept, trace = fp.search(accuracy, [1, 2, 3, 4], 0.1)
    assert kept == 2 and asked == [0, 1, 2, 3] and trace == [(0, 0.90), (1, 0.88), (2, 0.82), (3, 0.80)]
    # strict bound and BackdoorBench's abs(): a 10% rise stops it too
    assert not fp.within_bound(0.5, 0.375, 0.25) and fp.within_bound(0.5, 0.3751, 0.25)
    assert not fp.within_bound(0.5, 0.625, 0.25)
    assert fp.search(lambda n: 0.9, [], 0.1) == (0, [(0, 0.9)])


# --- pruning on a model -------------------------------------------------------------------------------


def test_pruning_changes_only_the_pruned_units_classifier_columns(clean):
    model = tiny_cnn(0, clean)
    data = self_labelled(model, clean)
    p = fp.prune(model, data, FP.make_config(acc_ratio=0.3, max_prune_ratio=0.5))
    assert 0 < p.pruned <= 8 and p.units == 16
    before, after = model.state_dict(), p.model.state_dict()
    assert set(before) == set(after)
    for k in before:
        if k != "head.weight":
            assert torch.equal(before[k], after[k]), k
    pruned = p.order[:p.pruned]
    kept = p.order[p.pruned:]
    assert torch.all(after["head.weight"][:, pruned] == 0)
    assert torch.equal(after["head.weight"][:, kept], before["head.weight"][:, kept])
    assert torch.equal(p.mask == 0, torch.isin(torch.arange(16), pruned))


def test_prunes_the_least_active_units_first(clean):
    model = tiny_cnn(1, clean)
    data = self_labelled(model, clean)
    means = head_input_means(model, "head", data)
    assert means.unique().numel() == 16, "ties would make 'least active' ambiguous"
    p = fp.prune(model, data, FP.make_config(acc_ratio=1.0, max_prune_ratio=0.5))
    assert p.pruned == 8
    assert torch.equal(p.order, torch.argsort(means))
    zeroed = (p.model.head.weight == 0).all(0).nonzero().flatten()
    assert set(zeroed.tolist()) == set(torch.argsort(means)[:p.pruned].tolist())
    assert means[zeroed].max() < means[p.order[p.pruned:]].min()


def test_stops_at_its_accuracy_bound(clean):
    """A 2% bound on a 16-unit layer stops long before the cap: the kept count is inside the bound and the
    next one outside it, both re-measured here with full forwards."""
    model = tiny_cnn(2, clean)
    data = self_labelled(model, clean)
    cfg = FP.make_config(acc_ratio=0.02)
    p = fp.prune(model, data, cfg)
    cap = fp.prune_counts(16, cfg.once_prune_ratio, cfg.max_prune_ratio)[-1]
    assert p.pruned < cap - 1, f"the bound should have stopped it early (pruned {p.pruned} of cap {cap})"
    acc0 = accuracy_with_pruned(model, "head", p.order[:0], data)
    acc_kept = accuracy_with_pruned(model, "head", p.order[:p.pruned], data)
    acc_next = accuracy_with_pruned(model, "head", p.order[:p.pruned + 1], data)
    assert acc0 == 1.0
    assert fp.within_bound(acc0, acc_kept, 0.02) and not fp.within_bound(acc0, acc_next, 0.02)
    assert p.trace[-1] == (p.pruned + 1, pytest.approx(acc_next))


def test_a_head_leaning_on_dormant_units_stops_before_the_first_step(clean):
    """Make the least-active live units dominate the logits: pruning them flips predictions, so FP keeps
    nothing."""
    model = tiny_cnn(3, clean)
    means = head_input_means(model, "head", clean)
    low = torch.argsort(means)[:4]
    assert (means[low] > 0).all()
    with torch.no_grad():
        model.head.weight[:, low] *= 1000.0
    data = self_labelled(model, clean)
    p = fp.prune(model, data, FP.make_config(once_prune_ratio=0.25))
    assert p.pruned == 0 and p.trace[1][0] == 4 and p.trace[1][1] < 0.9
    assert torch.equal(p.model.head.weight, model.head.weight)


def test_without_a_bound_it_stops_at_the_cap(clean):
    model = tiny_cnn(0, clean)
    p = fp.prune(model, self_labelled(model, clean), FP.make_config(acc_ratio=1.0, max_prune_ratio=0.5))
    assert p.pruned == 8


class FlattenHead(nn.Module):
    """conv → BN → ReLU → 2×2 average pool → flatten → Linear: 4 units of 4 columns each."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.head(x.flatten(1))

    def permutation_spec(self) -> PermSpec:
        return PermSpec(axes=conv_bn("conv", "bn", "c", None) | linear("head", None, Expand("c", 4)))


def test_a_flatten_head_ranks_units_by_their_columns_mean_and_prunes_all_their_columns(clean):
    torch.manual_seed(0)
    model = randomize(FlattenHead())
    head = layers.classifier(model)
    assert (head.units, head.repeat) == (4, 4)
    data = self_labelled(model, clean, min_classes=1)  # no bound here: the cap stops it
    means = head_input_means(model, "head", data).view(4, 4).mean(1)
    p = fp.prune(model, data, FP.make_config(acc_ratio=1.0, once_prune_ratio=0.25, max_prune_ratio=0.5))
    assert p.pruned == 2 and torch.equal(p.order, torch.argsort(means))
    cols = head.unit_columns(p.order[:2])
    assert cols.numel() == 8 and torch.all(p.model.head.weight[:, cols] == 0)
    rest = head.unit_columns(p.order[2:])
    assert torch.equal(p.model.head.weight[:, rest], model.head.weight[:, rest])


# --- the whole defense --------------------------------------------------------------------------------


def test_pruned_columns_stay_zero_through_finetuning(clean):
    model = tiny_cnn(0, clean)
    data = self_labelled(model, clean)
    cfg = FP.make_config(acc_ratio=0.3, max_prune_ratio=0.5, epochs=2, batch_size=32)
    res = FP.run(model, data, method("supervised"), cfg)
    pruned_model = res.points[(1, "pruned")]
    final = [r for r in res.records if r["stage"] == "final"][0]
    n = final["fp_pruned"]
    assert n > 0 and final["fp_units"] == 16
    dead = (pruned_model.head.weight == 0).all(0)
    assert int(dead.sum()) == n
    w = res.model.head.weight
    assert torch.all(w[:, dead] == 0)
    assert not torch.equal(w[:, ~dead], pruned_model.head.weight[:, ~dead]), "fine-tuning changed nothing"
    assert not torch.equal(res.model.convs[0].weight, model.convs[0].weight)


def test_run_leaves_the_model_alone_is_deterministic_and_reports_its_columns(clean):
    model = tiny_cnn(0, clean)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FP.make_config(epochs=1, batch_size=50)
    evaluate = lambda m: {"acc": 50.0}  # noqa: E731
    a = FP.run(model, clean, method("supervised"), cfg, evaluate=evaluate)
    b = FP.run(model, clean, method("supervised"), cfg)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    final = a.records[-1]
    assert final["defense"] == "fp" and final["stage"] == "final" and final["round"] == 1
    assert final["acc"] == 50.0 and isinstance(final["fp_pruned"], int) and final["fp_units"] == 16
    assert set(FP.columns) == {"fp_pruned", "fp_units"} <= set(final) and FP.columns["fp_pruned"] == "int"
    assert [r["stage"] for r in a.records] == ["pruned", "final"] and [r["stage"] for r in b.records] == ["final"]


SMALL_KW = {"cnn": dict(widths=(8, 8, 16, 16)), "mlp": dict(image_size=28, hidden=(32, 16)),
            "vgg19_bn": dict(cfg=(8, "M", 8, "M", 16, "M", 16, "M"), hidden=32)}


@pytest.mark.parametrize("name", [n for n in models.names() if not n.startswith("simclr-")])
def test_runs_on_every_supervised_architecture(name, embedded):
    torch.manual_seed(0)
    model = models.build(name, 10, in_channels=1, **SMALL_KW.get(name, {}))
    FP.check_model(model)
    clean = CleanData(embedded.train.subset(clean_subset(len(embedded.train), 0.02, 0)), embedded.prep)
    res = FP.run(model, clean, method("supervised"), FP.make_config(epochs=1, batch_size=12))
    head = layers.classifier(res.model)
    n = res.records[-1]["fp_pruned"]
    assert res.records[-1]["fp_units"] == head.units
    assert int((head.module.weight == 0).all(0).sum()) >= n


def test_check_model_refuses_a_model_without_a_classifier_spec():
    with pytest.raises(layers.UnsupportedModel, match="permutation spec"):
        FP.check_model(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))


@pytest.mark.parametrize("field,value", [("acc_ratio", -0.1), ("acc_ratio", 1.5), ("once_prune_ratio", 0.0),
                                         ("once_prune_ratio", 2.0), ("max_prune_ratio", 1.1), ("epochs", -1),
                                         ("batch_size", 0)])
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FP.make_config("paper", **{field: value})


def test_presets_are_backdoorbench_defaults():
    paper, released = FP.make_config("paper"), FP.make_config("released")
    assert paper == released
    assert (paper.acc_ratio, paper.once_prune_ratio, paper.epochs, paper.batch_size) == (0.1, 0.01, 100, 256)
    assert (paper.optim.name, paper.optim.lr, paper.optim.momentum, paper.optim.weight_decay,
            paper.optim.schedule) == ("sgd", 0.01, 0.9, 5e-4, "cosine")
    with pytest.raises(ValueError, match="unknown FP preset"):
        FP.make_config("nope")


# --- the end-to-end proof -----------------------------------------------------------------------------


@pytest.mark.slow
def test_fp_on_badnets_prunes_keeps_accuracy_and_reports_asr(badnets_reduced, say):
    """Fine-Pruning on the shared BadNets cnn (10% poison, target 0) with BackdoorBench's CIFAR-10 pruning
    defaults (acc_ratio 0.1, 1% of the units per step, SGD lr 0.01 cosine) but a CPU-scale fine-tuning:
    20 epochs at batch 128 (80 steps on the 500-image clean set) instead of 100 at batch 256 (200 steps,
    2.5× the time). Both were measured and agree: 100 epochs gave ACC 86.2 / ASR 13.3.

    BackdoorBench's leaderboard has FP leaving 57% ASR on PreActResNet-18 CIFAR-10 BadNets 10%. On this
    small cnn (128 feature units) it does better. Measured (2 threads): before ACC 86.6 / ASR 96.2; the
    search pruned 18 of 128 units (clean-set accuracy 86.8% → 78.4%; the next step, 77.8%, broke the 10%
    bound); after pruning ACC 78.4 / ASR 4.9; after fine-tuning ACC 86.2 / ASR 13.6 (fine-tuning lets
    some of the backdoor back). Asserted: pruning happened within the cap, ACC within 3 points of the
    backdoored model's, ASR below 30 (generous: the fine-tuning brings ASR back up) and at least 50
    points below the backdoored model's.
    """
    bd, clean, before = badnets_reduced
    t0 = time.time()
    cfg = FP.make_config("paper", epochs=20, batch_size=128)
    res = FP.run(bd.model, clean, method("supervised"), cfg, evaluate=bd.evaluate)
    secs = time.time() - t0
    pruned, final = res.records
    say(f"fp on badnets_reduced: before ACC {before['acc']:.2f} ASR {before['asr']:.2f}; pruned "
        f"{final['fp_pruned']}/{final['fp_units']} units: ACC {pruned['acc']:.2f} ASR {pruned['asr']:.2f}; "
        f"after fine-tuning ACC {final['acc']:.2f} ASR {final['asr']:.2f}; {secs:.1f}s")
    assert 0 < final["fp_pruned"] <= 0.95 * final["fp_units"]
    assert final["acc"] > before["acc"] - 3.0
    assert final["asr"] < 30.0 and final["asr"] < before["asr"] - 50.0
