"""SimCLR as a training method: NT-Xent against a direct computation, views, and training through a curve."""

import math

import pytest
import torch

from tscray import methods
from tscray.curves import BezierCurve, fit
from tscray.methods.simclr import color_jitter, nt_xent, resized_crop
from tscray.models import build
from tscray.optim import OptimConfig
import tscray.models.encoder  # noqa: F401  (registers simclr-* models)


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """NT-Xent written out term by term (SimCLR, eq. 1, averaged over all 2N anchors)."""
    z = [v / v.norm() for v in torch.cat([z1, z2]).double()]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / tau) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_nt_xent_matches_direct_computation(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(reference_nt_xent(z1, z2, tau), rel=1e-5)


def test_nt_xent_is_lower_for_aligned_views():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(16, 8, generator=g)
    aligned = nt_xent(z1, z1 + 0.05 * torch.randn(16, 8, generator=g))
    unrelated = nt_xent(z1, torch.randn(16, 8, generator=g))
    assert float(aligned) < float(unrelated) - 1.0
    with pytest.raises(ValueError, match="shape"):
        nt_xent(z1, z1[:4])


def test_views_are_seeded_batched_and_bounded():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 16, 16, generator=g)
    a = methods.build("simclr", mean=(0.0,) * 3, std=(1.0,) * 3, seed=3).view(x)
    b = methods.build("simclr", mean=(0.0,) * 3, std=(1.0,) * 3, seed=3).view(x)
    m = methods.build("simclr", mean=(0.0,) * 3, std=(1.0,) * 3, seed=3)
    first, second = m.view(x), m.view(x)
    assert a.shape == x.shape and torch.equal(a, b)  # same seed, same views
    assert not torch.equal(first, second)  # the generator advances
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0  # pixel-space jitter clamps like torchvision
    # a full-area crop without flip is the identity; flip mirrors
    full = resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(full, x, atol=1e-5)
    gray = color_jitter(x, torch.Generator().manual_seed(0), strength=0.0, p=0.0, gray_p=1.0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])


def test_views_work_on_one_channel_normalised_batches():
    x = torch.randn(5, 1, 28, 28)
    v = methods.build("simclr", mean=(0.3,), std=(0.35,)).view(x)
    assert v.shape == x.shape and torch.isfinite(v).all() and not torch.equal(v, x)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        methods.build("simclr", temperature=0.0)
    with pytest.raises(ValueError, match="crop_scale"):
        methods.build("simclr", crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="both mean and std"):
        methods.build("simclr", mean=(0.5,))


def test_simclr_trains_an_encoder_through_a_bezier_curve(embedded):
    torch.manual_seed(0)
    a = build("simclr-cnn", 10, in_channels=1, widths=(4, 8, 8, 8), proj_dim=8)
    torch.manual_seed(1)
    b = build("simclr-cnn", 10, in_channels=1, widths=(4, 8, 8, 8), proj_dim=8)
    from tscray.data.tensors import Loader
    loader = Loader(embedded.train.subset(range(120)), embedded.prep, 40, shuffle=True, seed=0)
    method = methods.build("simclr", mean=embedded.prep.mean, std=embedded.prep.std)
    losses = []
    curve = fit(BezierCurve(a, b), loader, method, 2, OptimConfig(name="adam", lr=5e-3, weight_decay=1e-6, l2=5e-5),
                progress=lambda e, n, loss: losses.append(loss))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    mid = [(p0 + p1) / 2 for p0, p1 in zip(curve.endpoint("start"), curve.endpoint("end"))]
    assert any(not torch.allclose(m, p) for m, p in zip(mid, curve.bend))  # the bend was trained
    point = curve.point(0.5, loader)
    assert point(torch.randn(3, 1, 28, 28)).shape == (3, 8)
