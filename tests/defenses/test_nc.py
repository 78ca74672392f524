"""Neural Cleanse: the MAD anomaly index on known norms, NC's λ schedule, that trigger reversal finds the
backdoor's small trigger on a constructed backdoored model, that unlearning stamps only the chosen share and
keeps true labels, that an unflagged model comes back unchanged, and that it runs on every supervised
architecture. The slow proof is on BadNets."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from tscray import defenses, models
from tscray.data import clean_subset
from tscray.data.tensors import ImageData, Loader, Preprocess
from tscray.defenses import CleanData, layers, nc
from tscray.methods import build as method

NC = defenses.get("nc")


# --- the pure pieces ----------------------------------------------------------------------------------


def test_anomaly_index_on_hand_made_norms():
    # median 10 (mean of the middle pair 9.9, 10.1); |x − 10| = 8, 0.2, 0.1, 0.1, 0.2, 1 whose median is
    # 0.2 (the middle pair 0.2, 0.2) → MAD = 1.4826·0.2 and class 0's index 8 / 0.29652 = 26.98
    norms = torch.tensor([2.0, 9.8, 9.9, 10.1, 10.2, 11.0], dtype=torch.float64)
    mad = 1.4826 * 0.2
    expect = torch.tensor([8.0, 0.2, 0.1, 0.1, 0.2, 1.0], dtype=torch.float64) / mad
    assert torch.allclose(nc.anomaly_indices(norms), expect, rtol=1e-9)
    assert float(nc.anomaly_indices(norms)[0]) == pytest.approx(26.98, abs=0.01)
    assert nc.flagged_classes(norms) == [0]
    assert nc.small_side_anomaly(norms) == pytest.approx(8.0 / mad)
    # an odd count: median 5, deviations 4, 1, 0, 1, 2 → MAD 1.4826·1; class 0 at 4/1.4826 = 2.70 > 2
    odd = torch.tensor([1.0, 4.0, 5.0, 6.0, 7.0])
    assert torch.allclose(nc.anomaly_indices(odd), torch.tensor([4.0, 1.0, 0.0, 1.0, 2.0], dtype=torch.float64) / 1.4826)
    assert nc.flagged_classes(odd) == [0]


def test_only_the_small_norm_side_is_flagged_smallest_first():
    # a large outlier (class 1) is not a backdoor; two small outliers are flagged, smallest norm first
    norms = torch.tensor([20.0, 500.0, 100.0, 101.0, 99.0, 100.5, 10.0, 99.5])
    assert nc.flagged_classes(norms) == [6, 0]
    assert nc.flagged_classes(torch.tensor([100.0, 500.0, 99.0, 101.0, 100.0])) == []
    # threshold matters: class 0's index is 2.70 (see above)
    assert nc.flagged_classes(torch.tensor([1.0, 4.0, 5.0, 6.0, 7.0]), threshold=3.0) == []


def test_equal_norms_flag_nothing_and_a_lone_outlier_has_infinite_index():
    assert nc.flagged_classes(torch.full((10,), 7.0)) == []
    assert nc.small_side_anomaly(torch.full((10,), 7.0)) == 0.0
    lone = torch.tensor([1.0] + [7.0] * 9)
    assert nc.flagged_classes(lone) == [0] and nc.small_side_anomaly(lone) == float("inf")


def test_cost_schedule_follows_nc_patience_and_multipliers():
    cfg = nc.NCConfig(patience=3, init_cost=1e-3, cost_multiplier=2.0, early_stop_patience=6)
    s = nc.CostSchedule.of(cfg)
    # two successes: no change yet; the third: ×2
    assert s.update(0.99, 50.0) == (True, False) and s.cost == 1e-3
    s.update(0.99, 40.0)
    s.update(0.99, 45.0)  # succeeds but not a new best
    assert s.cost == pytest.approx(2e-3) and s.up_flag and s.reg_best == 40.0
    # three failures: ÷ 2**1.5
    for _ in range(3):
        assert s.update(0.5, 10.0) == (False, False)  # a small norm without success is never the best
    assert s.cost == pytest.approx(2e-3 / 2 ** 1.5) and s.down_flag and s.reg_best == 40.0
    # both flags set: a >1% better norm resets the early-stop count, then stop after early_stop_patience
    # epochs without a 1% improvement of the best norm (29.9 is only 0.3% better than 30)
    assert s.early_counter == 4
    stops = [s.update(0.99, 30.0)[1]] + [s.update(0.99, 29.9)[1] for _ in range(6)]
    assert stops == [False] * 6 + [True] and s.reg_best == 29.9


def test_stamp_pixels_is_exact_where_the_mask_is_zero_or_one():
    x = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8)
    mask = torch.zeros(6, 6)
    mask[-2:, -2:] = 1.0
    mask[0, 0] = 0.5
    pattern = torch.ones(3, 6, 6)
    out = nc.stamp_pixels(x, mask, pattern)
    assert torch.equal(out[..., -2:, -2:], torch.full_like(out[..., -2:, -2:], 255))
    half = (x[..., 0, 0].float() + 255) / 2  # a half-way mask: the mean, rounded (ties either way)
    assert bool(((out[..., 0, 0].float() - half).abs() <= 0.5).all())
    untouched = mask == 0
    assert torch.equal(out[..., untouched], x[..., untouched])


# --- reversal on a constructed backdoored model -------------------------------------------------------


class BandNet(nn.Module):
    """A hand-made backdoored classifier of 8×8 grey images with 4 classes. Class j's evidence is the mean
    brightness of band j (rows 2j, 2j+1, columns 0-5, 12 pixels); a bright 2×2 patch in the bottom-right corner
    (rows 6-7, columns 6-7, outside every band) adds up to +20 to class 0: the backdoor. Flipping an image to
    class j ≠ 0 needs most of band j (≈ 10 mask pixels); flipping to class 0 needs ≈ 3 corner pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pix = x[:, 0] * 0.5 + 0.5  # normalised with mean 0.5, std 0.5
        bands = pix[:, :, :6].reshape(-1, 4, 2, 6).mean((2, 3))
        patch = pix[:, 6:, 6:].mean((1, 2))
        backdoor = torch.zeros_like(bands)
        backdoor[:, 0] = 40.0 * torch.relu(patch - 0.5)
        return self.scale * bands + backdoor


BAND_PREP = Preprocess(mean=(0.5,), std=(0.5,), crop_padding=0)


def band_images(n: int, seed: int) -> ImageData:
    """Images of each class: their band at 0.9, the other bands at 0.2, the corner dark, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    pix = torch.full((n, 1, 8, 8), 0.2) + 0.05 * torch.randn(n, 1, 8, 8, generator=g)
    for j in range(4):
        pix[y == j, 0, 2 * j:2 * j + 2, :6] = 0.9
    pix[:, 0, 6:, 6:] = 0.1
    return ImageData((pix.clamp(0, 1) * 255).round().to(torch.uint8), y)


def band_reversal(seed: int = 0) -> nc.Reversed:
    data = band_images(32, seed)
    cfg = nc.NCConfig(reverse_epochs=20, batch_size=16, reverse_augment=False, seed=seed)
    loader = Loader(data, BAND_PREP, cfg.batch_size, shuffle=True, seed=seed)
    return nc.reverse_engineer(BandNet(), loader, layers.input_bounds(BAND_PREP), 4, cfg)


def test_reversal_finds_the_backdoor_as_the_smallest_mask_and_flags_its_class():
    model = BandNet()
    data = band_images(64, 0)
    with torch.no_grad():
        x = BAND_PREP.normalize(data.x)
        assert torch.equal(model(x).argmax(1), data.y)  # clean inputs: correct
        x[..., 6:, 6:] = 1.0  # pixel 1.0 in normalised units
        assert bool((model(x).argmax(1) == 0).all())  # the backdoor works
    rev = band_reversal()
    norms = rev.norms
    assert bool(rev.succeeded.all()), norms
    assert int(norms.argmin()) == 0, norms
    assert float(norms[0]) < 5.0 and float(norms[1:].min()) > 2 * float(norms[0]), norms
    assert float(rev.masks[0, 6:, 6:].sum()) > 0.6 * float(norms[0])  # the mask sits on the corner patch
    assert float(rev.patterns[0, 0, 6:, 6:].mean()) > 0.8  # a bright pattern there
    assert nc.flagged_classes(norms) == [0]
    assert rev.masks.min() >= 0 and rev.masks.max() <= 1 and rev.patterns.min() >= 0 and rev.patterns.max() <= 1


def test_class_chunks_do_not_change_the_reversal():
    data = band_images(32, 1)
    out = []
    for chunk in (0, 1, 3):
        cfg = nc.NCConfig(reverse_epochs=5, batch_size=16, reverse_augment=False, class_chunk=chunk)
        loader = Loader(data, BAND_PREP, cfg.batch_size, shuffle=True, seed=0)
        out.append(nc.reverse_engineer(BandNet(), loader, layers.input_bounds(BAND_PREP), 4, cfg))
    for other in out[1:]:
        assert torch.allclose(out[0].masks, other.masks, atol=1e-5)
        assert torch.allclose(out[0].norms, other.norms, atol=1e-3)


# --- unlearning and the two branches of run ---------------------------------------------------------------


@pytest.fixture
def clean(embedded):
    return CleanData(embedded.train.subset(clean_subset(len(embedded.train), 0.1, 0)), embedded.prep)


def corner_trigger(h: int = 28, w: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(h, w)
    mask[-3:, -3:] = 1.0
    return mask, torch.ones(1, h, w)


def test_unlearning_stamps_only_the_chosen_share_and_keeps_true_labels(clean):
    data = clean.data
    n = len(data)
    out, share = nc.unlearning_set(data, [corner_trigger()], 0.2, seed=3)
    keep_n = int(n * 0.8)
    assert len(out) == n and len(share) == n - keep_n
    rest = torch.tensor(sorted(set(range(n)) - set(share.tolist())))
    # the unstamped part: the other images, untouched, with their labels
    got_rest = out.x[:keep_n]
    assert sorted(map(tuple, got_rest.flatten(1).tolist())) == sorted(map(tuple, data.x[rest].flatten(1).tolist()))
    assert sorted(out.y[:keep_n].tolist()) == sorted(data.y[rest].tolist())
    # the share: the same images stamped at the corner only, with their TRUE labels
    stamped = out.x[keep_n:]
    assert torch.equal(out.y[keep_n:], data.y[share])
    assert bool((stamped[..., -3:, -3:] == 255).all())
    assert torch.equal(stamped[..., :-3, :], data.x[share][..., :-3, :])
    n_corner = int((data.x[..., -3:, -3:] == 255).flatten(1).all(1).sum())
    assert int((out.x[..., -3:, -3:] == 255).flatten(1).all(1).sum()) == len(share) + int(
        (data.x[rest][..., -3:, -3:] == 255).flatten(1).all(1).sum()) and n_corner < len(share)
    # two flagged classes: one stamped copy of the same share per trigger; the seed picks the share
    two, share2 = nc.unlearning_set(data, [corner_trigger(), corner_trigger()], 0.2, seed=3)
    assert len(two) == n + len(share) and torch.equal(share2, share)
    assert torch.equal(two.y[keep_n:], data.y[share].repeat(2))
    assert not torch.equal(nc.unlearning_set(data, [corner_trigger()], 0.2, seed=4)[1], share)
    assert len(nc.unlearning_set(data, [corner_trigger()], 0.0, seed=3)[1]) == 0


def fake_reversal(norms: list[float], h: int = 28, w: int = 28):
    def reverse(model, loader, bounds, classes, cfg, log=None):
        k = len(norms)
        masks = torch.zeros(k, h, w)
        masks[:, -3:, -3:] = 1.0
        return nc.Reversed(masks, torch.ones(k, 1, h, w), torch.tensor(norms), torch.ones(k, dtype=torch.bool))
    return reverse


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return models.build("cnn", 10, in_channels=1, widths=(8, 8, 16, 16))


def test_no_flagged_class_returns_the_model_unchanged(clean, monkeypatch):
    monkeypatch.setattr(nc, "reverse_engineer", fake_reversal([10.0, 11.0, 10.5, 9.8, 10.2, 10.9, 9.9, 10.1,
                                                               10.4, 10.6]))
    model = tiny_cnn()
    res = NC.run(model, clean, method("supervised"), NC.make_config("paper", unlearn_epochs=2, batch_size=32),
                 evaluate=lambda m: {"acc": 1.0})
    assert res.model is not model and res.outputs == [res.model]
    for k, v in model.state_dict().items():
        assert torch.equal(res.model.state_dict()[k], v), k
    rec = res.records[-1]
    assert rec["stage"] == "final" and rec["nc_flagged"] == "" and rec["acc"] == 1.0
    assert rec["nc_anomaly_index"] < 2
    assert rec["nc_mask_norms"].split(",")[:3] == ["10.00", "11.00", "10.50"]
    assert set(NC.columns) <= set(rec)


def test_a_flagged_class_is_unlearned_and_the_input_is_untouched(clean, monkeypatch):
    monkeypatch.setattr(nc, "reverse_engineer", fake_reversal([2.0, 11.0, 10.5, 9.8, 10.2, 10.9, 9.9, 10.1,
                                                               10.4, 10.6]))
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = NC.run(model, clean, method("supervised"), NC.make_config("paper", unlearn_epochs=1, batch_size=32))
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert not torch.equal(res.model.convs[0].weight, model.convs[0].weight)
    assert res.records[-1]["nc_flagged"] == "0" and res.records[-1]["nc_anomaly_index"] > 2


def test_run_is_deterministic_given_the_seed(clean):
    small = CleanData(clean.data.subset(torch.arange(20)), clean.prep)
    cfg = NC.make_config("paper", reverse_epochs=2, unlearn_epochs=1, batch_size=10, anomaly_threshold=1e-6)
    a = NC.run(tiny_cnn(), small, method("supervised"), cfg)
    b = NC.run(tiny_cnn(), small, method("supervised"), cfg)
    assert a.records[-1]["nc_mask_norms"] == b.records[-1]["nc_mask_norms"]
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


# --- config, model checks, architectures ------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("reverse_epochs", -1), ("unlearn_epochs", -1), ("mask_lr", 0.0),
                                         ("init_cost", -1e-3), ("unlearning_ratio", 1.5),
                                         ("attack_succ_threshold", 1.2), ("patience", 0),
                                         ("cost_multiplier", 1.0), ("batch_size", 0), ("class_chunk", -1),
                                         ("anomaly_threshold", 0.0), ("early_stop_threshold", -0.1)])
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        NC.make_config("paper", **{field: value})


def test_presets():
    assert NC.make_config("released").unlearn_epochs == 100 and NC.make_config("paper").unlearn_epochs == 40
    cfg = NC.make_config("paper")
    assert (cfg.reverse_epochs, cfg.init_cost, cfg.patience, cfg.cost_multiplier, cfg.unlearning_ratio) == (
        80, 1e-3, 5, 2.0, 0.2)
    with pytest.raises(ValueError, match="paper, released"):
        NC.make_config("nope")


def test_check_model_refuses_models_it_cannot_scan():
    with pytest.raises(layers.UnsupportedModel, match="3 classes"):
        NC.check_model(models.build("cnn", 2, in_channels=1, widths=(8, 8, 16, 16)))
    with pytest.raises(layers.UnsupportedModel):
        NC.check_model(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    NC.check_model(tiny_cnn())


# tiny widths per architecture on 28x28x1 inputs; resnet18/50 take no width argument: their ImageNet stem
# (stride-2 conv + max-pool) quarters the map early, which keeps them cheap
SMALL = {"mlp": dict(image_size=28, hidden=(16,)), "cnn": dict(widths=(4, 4, 8, 8)),
         "preactresnet18": dict(num_blocks=(1, 1, 1, 1)), "vgg19_bn": dict(cfg=(8, "M", 16, "M"), hidden=16),
         "resnet18": dict(stem="imagenet"), "resnet50": dict(stem="imagenet")}


@pytest.mark.parametrize("name", [n for n in models.names() if not n.startswith("simclr")])
def test_every_supervised_architecture_runs(name, embedded):
    torch.manual_seed(0)
    model = models.build(name, 3, in_channels=1, **SMALL.get(name, {}))
    keep = torch.nonzero(embedded.train.y < 3).flatten()[:4]
    clean = CleanData(embedded.train.subset(keep), embedded.prep)
    before = [p.clone() for p in model.parameters()]
    cfg = NC.make_config("paper", reverse_epochs=2, unlearn_epochs=1, batch_size=2, anomaly_threshold=1e-6)
    res = NC.run(model, clean, method("supervised"), cfg)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    rec = res.records[-1]
    assert len(rec["nc_mask_norms"].split(",")) == 3 and rec["nc_flagged"] != ""  # threshold ~0: unlearned


# --- the slow proof on BadNets ----------------------------------------------------------------------------

# CPU-scale reversal: 40 λ-schedule epochs of 2 batches of 10 images (80 Adam steps, 8,000 stamped passes for
# the 10 classes) instead of BackdoorBench's 80 epochs × ~10 batches of 256; mask lr 0.2 and initial cost 1e-2
# (defaults 0.1 and 1e-3) so the masks shrink within 80 steps. Unlearning: 5 epochs at batch 50 (10 steps an
# epoch, as BackdoorBench's 2,500 images at 256) instead of the paper's 40.
E2E = dict(reverse_epochs=40, reverse_batches=2, reverse_batch_size=10, mask_lr=0.2, init_cost=1e-2,
           unlearn_epochs=5, batch_size=50)


@pytest.mark.slow
def test_nc_flags_the_badnets_target_and_unlearning_removes_the_backdoor(badnets_reduced, say):
    """NC on the shared BadNets cnn (10% poison, target 0, 3×3 white corner patch), settings ``E2E`` above.

    The paper reports NC detecting BadNets-style triggers (anomaly index > 2 for the target) and unlearning
    them; BackdoorBench's leaderboard: PreActResNet-18 CIFAR-10 BadNets 10%, ASR 95.0 → 1.3, ACC 91.3 → 89.1.

    At this CPU scale the target's reversed mask is always far smaller than any other class's (norm 1.5-5
    against 26-200), but the clean classes' masks are unconverged after 80 steps and their norms spread
    widely, which puts the target's MAD anomaly index near NC's threshold 2, and where depends on the last
    bits of the model and of the reversal: 2.98 and 1.95 with 2 and 1 threads on the machine the fixture was
    first measured on, 1.40 and 2.94 on another of the same kind (a serial run there failed the old bound
    1.5); 1.4-3.5 over 18 runs. So detection is asserted where it has margin (class 0 smallest by 10x, index
    > 1, the lowest seen 1.40) and the unlearning is run at threshold 1: class 0 flagged first, ASR below 15,
    ACC within 3 points (BackdoorBench's own run loses 2.2). The paper-threshold verdict is reported.
    Unlearning (5 epochs) measured ACC 85.0-86.6 (1.8 points lost at worst), ASR 2.9-4.4.
    """
    bd, clean, before = badnets_reduced
    t0 = time.time()
    res = NC.run(bd.model, clean, method("supervised"), NC.make_config("paper", **E2E, anomaly_threshold=1.0),
                 evaluate=bd.evaluate)
    secs = time.time() - t0
    final = res.records[-1]
    norms = [float(v) for v in final["nc_mask_norms"].split(",")]
    at_2 = final["nc_anomaly_index"] > 2.0
    say(f"nc on badnets_reduced: before ACC {before['acc']:.2f} ASR {before['asr']:.2f}; mask norms "
        f"{final['nc_mask_norms']}; anomaly index {final['nc_anomaly_index']:.2f} (flagged at NC's threshold 2: "
        f"{'yes' if at_2 else 'no'}); flagged at 1 {final['nc_flagged']!r}; after ACC {final['acc']:.2f} "
        f"ASR {final['asr']:.2f}; {secs:.1f}s")
    assert min(range(10), key=norms.__getitem__) == 0
    assert 10 * norms[0] < min(norms[1:]), norms
    assert final["nc_anomaly_index"] > 1.0
    assert final["nc_flagged"].split(",")[0] == "0"
    assert final["asr"] < 15.0 and final["asr"] < before["asr"] - 70.0
    assert final["acc"] > before["acc"] - 3.0
