import pytest
import torch

from conftest import randomize
from tscray.models import build
from tscray.symmetry import (correlations, identity, invert, match, matched_correlation, permute,
                             random_permutation)

# float-kernel-sensitive: CI reruns this module under another CPU kernel set and thread count (tests/test_kernels.py)
pytestmark = pytest.mark.kernels


def _loader(shape, n_batches=4, batch=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=gen) for _ in range(n_batches)]


CASES = [("mlp", (1, 28, 28), {"in_channels": 1}), ("cnn", (1, 28, 28), {"in_channels": 1}),
         ("preactresnet18", (3, 32, 32), {}), ("resnet18", (3, 32, 32), {})]


@pytest.mark.parametrize("arch,shape,kw", CASES, ids=[c[0] for c in CASES])
def test_align_recovers_a_random_permutation_exactly(arch, shape, kw):
    torch.manual_seed(0)
    a = randomize(build(arch, 10, **kw)).eval()
    p = random_permutation(a, torch.Generator().manual_seed(1))
    b = permute(a, p)
    batches = 2 if "resnet" in arch else 4
    data = _loader(shape, batches, 16)
    q = match(a, b, data, "align")
    live = {g: c.diagonal() != 0 for g, c in correlations(a, a, data).items()}  # dead ReLU units are ambiguous
    for g in p:
        assert live[g].sum() > len(live[g]) // 2
        assert torch.equal(q[g][live[g]], invert(p)[g][live[g]]), f"group {g} not recovered"
    aligned = permute(b, q)
    if all(bool(v.all()) for v in live.values()):
        for k, v in a.state_dict().items():
            assert torch.equal(aligned.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(aligned(data[0]), a(data[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,shape,kw", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_unalign_against_itself_lowers_matched_correlation_and_keeps_function(arch, shape, kw):
    torch.manual_seed(0)
    a = randomize(build(arch, 10, **kw)).eval()
    data = _loader(shape)
    corr = correlations(a, a, data)
    q = match(a, a, data, "unalign")
    un = matched_correlation(corr, q)
    ident = matched_correlation(corr, identity(a))
    gen = torch.Generator().manual_seed(2)
    rand = [matched_correlation(corr, random_permutation(a, gen)) for _ in range(20)]
    assert un < ident
    assert un < min(rand), (un, min(rand))
    b = permute(a, q)
    x = data[0]
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(q[g], identity(a)[g]) for g in q)


def test_bad_objective_is_refused():
    a = build("mlp", 10, in_channels=1)
    with pytest.raises(ValueError, match="align"):
        match(a, a, _loader((1, 28, 28), 1), "MAX")


PROBE_CASES = [("mlp", (1, 28, 28), {"in_channels": 1}), ("cnn", (1, 28, 28), {"in_channels": 1}),
               ("preactresnet18", (3, 32, 32), {}), ("vgg19_bn", (3, 32, 32), {})]


@pytest.mark.parametrize("arch,shape,kw", PROBE_CASES, ids=[c[0] for c in PROBE_CASES])
def test_a_probe_rule_places_probes_on_the_models_own_groups(arch, shape, kw):
    """``auto`` and ``relu`` find the hand-written probes (derive.py's probe rule); ``raw`` reads each group's
    producing conv/linear outputs, on the same groups."""
    from tscray.symmetry import spec_of
    from tscray.symmetry.derive import probes_by_rule

    model = build(arch, 10, **kw)
    x = torch.randn(2, *shape)
    own = {g: set(p) for g, p in spec_of(model).probes.items()}
    assert {g: set(p) for g, p in probes_by_rule(model, x, "auto").items()} == own
    raw = probes_by_rule(model, x, "raw")
    assert raw.keys() == own.keys()
    modules = dict(model.named_modules())
    for plist in raw.values():
        assert all(p.post == "raw" and isinstance(modules[p.module], (torch.nn.Conv2d, torch.nn.Linear)) for p in plist)
    relu = probes_by_rule(model, x, "relu")
    if "resnet" not in arch:
        assert {g: set(p) for g, p in relu.items()} == own


@pytest.mark.parametrize("rule", ["raw", "relu"])
def test_align_recovers_a_permutation_with_probes_placed_by_a_rule(rule):
    torch.manual_seed(0)
    a = randomize(build("cnn", 10, in_channels=1)).eval()
    p = random_permutation(a, torch.Generator().manual_seed(1))
    data = _loader((1, 28, 28))
    q = match(a, permute(a, p), iter(data), "align", probes=rule)  # a one-shot iterator: the first batch is kept
    live = {g: c.diagonal() != 0 for g, c in correlations(a, a, data, probes=rule).items()}
    for g in p:
        assert live[g].sum() > len(live[g]) // 2
        assert torch.equal(q[g][live[g]], invert(p)[g][live[g]]), g
    with pytest.raises(ValueError, match="probes must be a mapping or one of auto, raw, relu"):
        match(a, a, data, probes="post")
