import math

import numpy as np
import pytest
import torch
from PIL import Image

from tscray.attacks import ATTACKS, build, poison_test, poison_train
from tscray.data.tensors import ImageData
from tscray.registry import UnknownName

NAMES = ["badnets", "blended", "sig", "wanet"]


def rgb32(n: int = 6) -> torch.Tensor:
    """A synthetic 3×32×32 batch: random texture with mid-range values (room to move both ways)."""
    gen = torch.Generator().manual_seed(123)
    return torch.randint(30, 226, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)


@pytest.fixture(params=["fmnist", "rgb32"])
def images(request, embedded):
    return embedded.train.x[:6] if request.param == "fmnist" else rgb32()


@pytest.mark.parametrize("name", NAMES)
def test_trigger_is_uint8_same_shape_changed_and_deterministic(name, images):
    atk, before = build(name), images.clone()
    out = atk.apply(images)
    assert torch.equal(images, before)  # input untouched (apply returns a copy)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert not torch.equal(out, images)
    assert torch.equal(out, atk.apply(images)) and torch.equal(out, build(name).apply(images))
    assert int(out.min()) >= 0 and int(out.max()) <= 255


@pytest.mark.parametrize("size", [28, 64, 224])
@pytest.mark.parametrize("name", ["blended", "sig", "wanet"])
def test_triggers_work_at_every_size_and_channel_count(name, size):
    for c in (1, 3):
        x = torch.full((2, c, size, size), 120, dtype=torch.uint8)
        out = build(name).apply(x)
        assert out.shape == x.shape and out.dtype == torch.uint8


@pytest.mark.parametrize("name", NAMES)
def test_poisoned_test_set_excludes_target_class(name, embedded):
    pt = poison_test(embedded.test, build(name), target=2)
    keep = embedded.test.y != 2
    assert len(pt) == int(keep.sum()) and torch.all(pt.y == 2)
    assert torch.equal(pt.x, build(name).apply(embedded.test.x[keep]))


def test_unknown_attack_lists_all_names():
    with pytest.raises(UnknownName) as e:
        build("nope")
    for name in NAMES:
        assert name in str(e.value)
    assert set(NAMES) <= set(ATTACKS.names())


# --- blended --------------------------------------------------------------------------------------------

def test_blended_matches_formula_within_rounding(images):
    atk = build("blended")
    assert atk.alpha == 0.2
    _, c, h, w = images.shape
    p = atk.pattern(c, h, w).float()
    assert p.shape == (c, h, w) and p.std() > 10  # a real pattern, not a constant
    want = 0.8 * images.float() + 0.2 * p
    assert (atk.apply(images).float() - want).abs().max() <= 1.0


def test_blended_grayscale_is_the_luminance_of_the_rgb_pattern():
    atk = build("blended")
    gray, rgb = atk.pattern(1, 64, 64).float(), atk.pattern(3, 64, 64).float()  # 64: no resizing
    lum = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    assert (gray - lum).abs().max() <= 1.0


def test_blended_user_pattern_path(tmp_path):
    path = tmp_path / "stripes.png"
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:, ::2] = 255
    Image.fromarray(arr).save(path)
    atk = build("blended", pattern=str(path), alpha=0.5)
    x = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    out = atk.apply(x)
    assert torch.all(out[..., ::2] == 128) and torch.all(out[..., 1::2] == 0)
    assert not torch.equal(out, build("blended", alpha=0.5).apply(x))
    with pytest.raises(FileNotFoundError):
        build("blended", pattern=str(tmp_path / "missing.png"))


# --- sig ------------------------------------------------------------------------------------------------

def test_sig_is_clean_label_and_poisons_only_target_images(embedded):
    atk = build("sig")
    assert atk.clean_label
    p = poison_train(embedded.train, atk, 0.05, target=3, seed=0)
    assert len(p.poison_idx) == round(0.05 * len(embedded.train))
    assert torch.all(embedded.train.y[p.poison_idx] == 3)
    assert torch.equal(p.data.y, embedded.train.y)  # nothing relabelled, nothing appended
    assert torch.equal(p.data.x[p.poison_idx], atk.apply(embedded.train.x[p.poison_idx]))
    untouched = torch.ones(len(embedded.train), dtype=torch.bool)
    untouched[p.poison_idx] = False
    assert torch.equal(p.data.x[untouched], embedded.train.x[untouched])


def test_a_rate_beyond_the_eligible_images_is_an_error_not_a_quiet_cap():
    """SIG at 5% on a set whose target class holds 0.5% poisoned all 0.5% without a word: every rate above it
    trained the same model, and the result rows said 5%."""
    y = torch.tensor([0] * 5 + [1] * 995)  # target class 0: 0.5% of the set
    gen = torch.Generator().manual_seed(0)
    assert len(build("sig").select(y, 0.005, 0, gen)) == 5
    with pytest.raises(ValueError, match=r"sig at rate 0.05 asks 50 poisoned images of 1,000, but only 5 are "
                                         r"images of target class 0 \(0.50% of the set\); a clean-label attack .* "
                                         r"at most 0.005$"):
        build("sig").select(y, 0.05, 0, gen)
    with pytest.raises(ValueError, match="only 5 are images outside target class 1"):
        build("badnets").select(y, 0.5, 1, gen)
    assert len(build("badnets").select(y, 0.005, 1, gen)) == 5


def test_sig_is_a_horizontal_sinusoid():
    for c, size in ((1, 28), (3, 32)):
        x = torch.full((1, c, size, size), 100, dtype=torch.uint8)
        out = build("sig").apply(x).float()
        assert torch.all(out == out[..., :1, :])  # rows identical: constant down each column
        assert torch.all(out == out[:, :1])  # same signal in every channel
        j = torch.arange(size, dtype=torch.float64)
        want = 100 + 40 * torch.sin(2 * math.pi * j * 6 / size)
        assert (out[0, 0, 0].double() - want).abs().max() <= 0.5
        assert len(torch.unique(out[0, 0, 0])) > 5  # columns vary


# --- wanet ----------------------------------------------------------------------------------------------

def test_wanet_moves_pixels_but_keeps_the_image_close(images):
    out, x = build("wanet").apply(images).float(), images.float()
    diff = (out - x).abs().mean()
    one_pixel_shift = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    assert 0 < diff < 0.4 * one_pixel_shift  # a sub-pixel warp (~0.26 px on average at s = 0.5)


def test_wanet_grid_is_seeded():
    a, b, c = build("wanet", seed=0), build("wanet", seed=0), build("wanet", seed=1)
    assert torch.equal(a.grid(32, 32), b.grid(32, 32)) and not torch.equal(a.grid(32, 32), c.grid(32, 32))
    g = a.grid(32, 32)
    assert g.shape == (1, 32, 32, 2) and g.abs().max() <= 1
    assert not torch.equal(g, build("wanet", s=1e-9).grid(32, 32))  # not the identity
    x = rgb32()
    assert not torch.equal(a.apply(x), c.apply(x))


def test_wanet_appends_cross_images_with_true_labels(embedded):
    atk = build("wanet")
    assert atk.cross_ratio == 2
    p = poison_train(embedded.train, atk, 0.05, target=0, seed=0)
    n, k = len(embedded.train), len(p.poison_idx)
    assert k == round(0.05 * n) and len(p.data) == n + 2 * k
    assert torch.all(p.data.y[p.poison_idx] == 0)
    assert torch.equal(p.data.x[p.poison_idx], atk.apply(embedded.train.x[p.poison_idx]))
    cross_x, cross_y = p.data.x[n:], p.data.y[n:]
    # each cross image is a warped copy of a distinct non-poisoned image, with its true label
    flat = embedded.train.x.float().flatten(1)
    nearest = torch.cdist(cross_x.float().flatten(1), flat).argmin(1)
    assert len(torch.unique(nearest)) == 2 * k
    assert not torch.isin(nearest, p.poison_idx).any()
    assert torch.equal(cross_y, embedded.train.y[nearest])
    assert not torch.equal(cross_x, embedded.train.x[nearest])  # warped with trigger + noise
    assert not torch.equal(cross_x, atk.apply(embedded.train.x[nearest]))  # not the bare trigger
    again = poison_train(embedded.train, build("wanet"), 0.05, target=0, seed=0)
    assert torch.equal(again.data.x, p.data.x) and torch.equal(again.data.y, p.data.y)
    assert len(poison_train(embedded.train, atk, 0.0, 0).data) == n


def test_base_attack_adds_no_extra_training_images(embedded):
    for name in ("badnets", "blended", "sig"):
        assert len(poison_train(embedded.train, build(name), 0.1, target=1, seed=0).data) == len(embedded.train)


def test_extra_training_hook_output_is_appended(embedded):
    class Extra(type(build("badnets"))):
        def extra_training(self, train, poison_idx, rate, target, gen):
            return ImageData(train.x[:3], torch.tensor([7, 7, 7]))

    p = poison_train(embedded.train, Extra(), 0.1, target=1, seed=0)
    assert len(p.data) == len(embedded.train) + 3 and torch.all(p.data.y[-3:] == 7)


def test_the_target_travels_with_the_poisoned_model_and_is_never_defaulted(embedded):
    """``evaluator``/``poison_test`` used to default to target 0, so a target-7 model's ASR read ~0%."""
    import inspect

    from tscray.attacks import TrainRecipe, evaluator, train_backdoored
    from tscray.optim import OptimConfig

    for fn in (poison_train, poison_test):
        assert inspect.signature(fn).parameters["target"].default is inspect.Parameter.empty
    with pytest.raises(ValueError, match="needs the model's target class"):
        evaluator(embedded, build("badnets"))
    assert "asr" not in evaluator(embedded, None)(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10)))
    bd = train_backdoored(embedded, "mlp", build("badnets"), 0.1, target=7, seed=0,
                          recipe=TrainRecipe(1, 64, OptimConfig(lr=0.01)), arch_kw={"hidden": (16,)})
    assert (bd.target, bd.rate) == (7, 0.1) and (bd.poisoned.target, bd.poisoned.rate) == (7, 0.1)
    assert torch.equal(bd.poisoned.data.y[bd.poisoned.poison_idx], torch.full((len(bd.poisoned.poison_idx),), 7))
    triggered = poison_test(embedded.test, build("badnets"), bd.target)
    assert len(triggered) == int((embedded.test.y != 7).sum()) and bool((triggered.y == 7).all())


def test_train_backdoored_trains_in_channels_last_when_asked(embedded):
    """The sweep's ``resources.channels_last: on`` reaches backdoor training (it used to build its model in NCHW
    whatever the setting: 1.3x slower on this CPU for the quickstart's cnn)."""
    from tscray.attacks import TrainRecipe, train_backdoored
    from tscray.optim import OptimConfig

    seen = []
    atk = build("badnets")
    train_model = atk.train_model

    def spy(model, *a, **kw):
        seen.append(model.convs[1].weight.is_contiguous(memory_format=torch.channels_last))
        return train_model(model, *a, **kw)

    atk.train_model = spy
    recipe = TrainRecipe(1, 256, OptimConfig(lr=0.01))
    small = {"widths": (8, 8)}
    bd = train_backdoored(embedded, "cnn", atk, 0.1, 0, 0, recipe, arch_kw=small, channels_last=True)
    train_backdoored(embedded, "cnn", atk, 0.1, 0, 0, recipe, arch_kw=small)
    assert seen == [True, False]
    assert 0 <= bd.evaluate(bd.model)["acc"] <= 100
