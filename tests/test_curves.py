import copy

import pytest
import torch
from torch.nn import functional as F

from conftest import randomize
from tscray.curves import BezierCurve, fit, update_bn
from tscray.data import Loader
from tscray.methods import build as method
from tscray.models import build
from tscray.optim import OptimConfig

# float-kernel-sensitive: CI reruns this module under another CPU kernel set and thread count (tests/test_kernels.py)
pytestmark = pytest.mark.kernels


def _pair(arch="cnn", **kw):
    torch.manual_seed(0)
    a = randomize(build(arch, 10, in_channels=1, **kw), seed=1)
    b = randomize(build(arch, 10, in_channels=1, **kw), seed=2)
    return a, b


def test_endpoints_are_exactly_the_models_buffers_included():
    a, b = _pair()
    curve = BezierCurve(a, b)
    with torch.no_grad():
        for p in curve.bend:
            p.add_(torch.randn_like(p))  # a trained bend must not leak into the endpoints
    for t, model in ((0.0, a), (1.0, b)):
        w = curve.weights(t)
        for k, v in model.named_parameters():
            assert torch.equal(w[k], v), (t, k)
        pt = curve.point(t)
        for k, v in model.state_dict().items():
            assert torch.equal(pt.state_dict()[k], v), (t, k)


def test_gradients_reach_only_the_bend():
    a, b = _pair()
    curve = BezierCurve(a, b).train()
    out = curve(torch.randn(8, 1, 28, 28), 0.3)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in curve.bend)
    assert all(p.grad is None for p in curve.base.parameters())
    assert {n for n, p in curve.named_parameters() if p.requires_grad} == {f"bend.{i}" for i in range(len(curve.bend))}
    assert all(p.grad is None for p in a.parameters()) and all(p.grad is None for p in b.parameters())


def test_a_channels_last_curve_keeps_every_weights_strides_and_its_gradients():
    """A binary op on two channels-last weights of a 1-channel conv comes out NCHW-strided; the curve
    must hand the conv the model's own strides, or every activation after it falls back to NCHW."""
    a, b = _pair()
    ref = BezierCurve(a, b).train()
    a, b = (m.to(memory_format=torch.channels_last) for m in (a, b))
    curve = BezierCurve(a, b).train()
    base = dict(curve.base.named_parameters())
    assert base["convs.0.weight"].shape[1] == 1  # the ambiguous layout this guards
    for t in (0.0, 0.3, 1.0):
        for k, w in curve.weights(t).items():
            assert w.stride() == base[k].stride(), (t, k)
    assert all(p.stride() == base[k].stride() for k, p in zip(curve.names, curve.bend))
    x = torch.randn(8, 1, 28, 28)
    for c in (ref, curve):
        c(x, 0.3).square().mean().backward()
    torch.testing.assert_close(curve(x, 0.3), ref(x, 0.3), atol=1e-5, rtol=1e-5)
    for p, q in zip(curve.bend, ref.bend):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("t", [0.1, 0.25, 0.5, 0.9])
def test_midpoint_bend_is_linear_interpolation(t):
    a, b = _pair()
    w = BezierCurve(a, b).weights(t)
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(w[k], (1 - t) * pa + t * pb, atol=1e-6, rtol=1e-6)


def test_point_recomputes_batchnorm_statistics_exactly(embedded):
    a, b = _pair()
    loader = Loader(embedded.train, embedded.prep, batch_size=97)  # uneven last batch
    pt = BezierCurve(a, b).point(0.4, loader)
    assert not torch.equal(pt.bns[0].running_mean, a.bns[0].running_mean)
    with torch.no_grad():
        acts = torch.cat([pt.convs[0](x) for x, _ in loader]).double()
    ch = acts.transpose(0, 1).reshape(acts.shape[1], -1)
    torch.testing.assert_close(pt.bns[0].running_mean, ch.mean(1).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pt.bns[0].running_var, ch.var(1, unbiased=True).float(), atol=1e-6, rtol=1e-5)
    # the batch size must not matter for the first BatchNorm's exact statistics (it would for a moving average;
    # deeper ones see activations normalised with each batch's own statistics, which do depend on it)
    again = update_bn(copy.deepcopy(pt), Loader(embedded.train, embedded.prep, batch_size=256)).bns[0]
    torch.testing.assert_close(again.running_mean, pt.bns[0].running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(again.running_var, pt.bns[0].running_var, atol=1e-6, rtol=1e-5)


def _exact_bn_inputs(model, loader):
    """Each BatchNorm's inputs over the loader in a train-mode forward, in float64, channel-major."""
    seen = {m: [] for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    hooks = [m.register_forward_pre_hook(lambda m, inp: seen[m].append(inp[0].detach().double())) for m in seen]
    model.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    for h in hooks:
        h.remove()
    return {m: torch.cat(v).transpose(0, 1).reshape(v[0].shape[1], -1) for m, v in seen.items()}


def test_update_bn_gives_every_batchnorm_the_exact_moments_of_the_whole_loader(embedded):
    a, b = _pair()
    # t = 0.5 of two random models: batch means that differ between batches are what an average of per-batch
    # variances would drop
    loader = Loader(embedded.train, embedded.prep, batch_size=128)  # an uneven last batch
    pt = BezierCurve(a, b).point(0.5, loader)
    ref = BezierCurve(a, b).point(0.5, loader)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.3
    update_bn(ref, loader)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.momentum == 0.3 and m.num_batches_tracked.item() == 0  # restored; counter reset
    exact = _exact_bn_inputs(copy.deepcopy(pt), loader)  # the refreshed buffers do not change a train forward
    for m, bn in zip(exact, pt.bns):
        ch = exact[m]
        torch.testing.assert_close(bn.running_mean, ch.mean(1).float(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bn.running_var, ch.var(1).float(), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="two values"):
        update_bn(copy.deepcopy(pt), [])


def test_interior_point_of_batchnorm_model_needs_a_loader():
    a, b = _pair()
    with pytest.raises(ValueError, match="bn_loader"):
        BezierCurve(a, b).point(0.5)
    with pytest.raises(ValueError, match="t must be"):
        BezierCurve(a, b).point(1.5)


def test_endpoints_of_different_architectures_are_refused():
    with pytest.raises(ValueError, match="architecture"):
        BezierCurve(build("cnn", 10, in_channels=1), build("cnn", 10, in_channels=1, widths=(8, 8, 8, 8)))


def test_fitting_lowers_the_loss_in_the_middle_of_the_curve(embedded):
    torch.manual_seed(0)
    a = build("mlp", 10, in_channels=1, hidden=(64,))
    b = build("mlp", 10, in_channels=1, hidden=(64,))
    sup = method("supervised")
    loader = Loader(embedded.train, embedded.prep, 64, shuffle=True, seed=0)
    from tscray.train import train
    for m in (a, b):
        train(m, loader, sup, 3, OptimConfig(lr=0.05))
    curve = BezierCurve(a, b)

    def mid_loss():
        with torch.no_grad():
            return sum(float(F.cross_entropy(curve(x, 0.5), y)) for x, y in loader)
    before = mid_loss()
    fit(curve, loader, sup, 3, OptimConfig(lr=0.05), seed=0)
    assert mid_loss() < 0.8 * before


def test_update_bn_skips_empty_batches_and_a_failed_refresh_leaves_the_statistics_as_they_were():
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    update_bn(bn, [x[:4], x[4:]])
    want = bn[0].running_mean.clone(), bn[0].running_var.clone()
    update_bn(bn, [x[:4], x[:0], x[4:]])  # an empty batch between (it used to subtract a variance)
    torch.testing.assert_close((bn[0].running_mean, bn[0].running_var), want)
    torch.testing.assert_close(bn[0].running_var, x.transpose(0, 1).reshape(3, -1).var(1))

    def broken():
        yield x[:4]
        raise OSError("the loader failed")

    for loader, err in ((broken(), OSError), ([], ValueError)):
        with pytest.raises(err):
            update_bn(bn, loader)
        torch.testing.assert_close((bn[0].running_mean, bn[0].running_var), want)
        assert bn[0].momentum == 0.1
