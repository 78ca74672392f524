"""Permutation specs of every registered architecture: completeness, exact invariance, probes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tscray import models
from tscray.symmetry import PermSpec, Probe, invert, permute, permute_state, random_permutation, spec_of
from tscray.symmetry.spec import bn_entries, conv_bn, linear

# float-kernel-sensitive: CI reruns this module under another CPU kernel set and thread count (tests/test_kernels.py)
pytestmark = pytest.mark.kernels


SMALL = {"mlp": dict(in_channels=1, image_size=28), "cnn": dict(in_channels=1)}
HEAVY = {"resnet50", "vgg19_bn", "simclr-resnet50"}  # batch 2 keeps this file near a minute on 2 CPU cores
EXPECTED_GROUPS = {"mlp": 2, "cnn": 4, "preactresnet18": 12, "resnet18": 12, "resnet50": 37, "vgg19_bn": 18}
# SimCLR encoders: the backbone without its classifier plus a projection head with one group of its own
SMALL |= {f"simclr-{k}": v for k, v in SMALL.items()}
EXPECTED_GROUPS |= {f"simclr-{k}": v + 1 for k, v in EXPECTED_GROUPS.items() if k != "vgg19_bn"}


def input_shape(name: str) -> tuple[int, ...]:
    batch = 2 if name in HEAVY else 4
    return (batch, 1, 28, 28) if name in SMALL else (batch, 3, 32, 32)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return models.build(name, num_classes=10, **SMALL.get(name, {}))


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-default BN statistics and affine parameters and non-zero biases everywhere."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.2 * torch.randn(n, generator=g))
        elif getattr(m, "bias", None) is not None:
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def no_dropout_train(model: nn.Module) -> nn.Module:
    """Train mode (batch statistics) with dropout off, so two forwards are deterministic."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    return model


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    scale = max(1.0, float(a.abs().max()))
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"max abs difference {err:.3g} at output scale {scale:.3g}"


@pytest.fixture(scope="module", params=models.names())
def case(request):
    """Per architecture: the model and its permuted copy in float32 and float64 (permuted once: VGG is big)."""
    name = request.param
    model = randomise(build(name)).eval()
    perm = random_permutation(model, torch.Generator().manual_seed(2))
    permuted = permute(model, perm)
    pairs = {torch.float32: (model, permuted),
             torch.float64: (copy.deepcopy(model).double(), copy.deepcopy(permuted).double())}
    x = torch.randn(input_shape(name), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return name, pairs, perm, x


def test_spec_is_complete_and_consistent(case):
    name, pairs, _, _ = case
    model = pairs[torch.float32][0]
    spec = spec_of(model)
    spec.check(model)
    state = model.state_dict()
    missing = sorted(set(state) - set(spec.axes))
    assert not missing, f"state-dict entries without a spec: {missing}"
    assert len(spec.groups()) == EXPECTED_GROUPS[name]
    # The classifier's output axis is never permuted (logits keep their order).
    last_weight = [k for k in state if k.endswith("weight") and state[k].dim() == 2][-1]
    assert spec.axes[last_weight][0] is None
    # BatchNorm running statistics carry the same group as the BN's weight.
    for key, axes in spec.axes.items():
        if key.endswith("running_mean") or key.endswith("running_var"):
            assert axes == spec.axes[key.rsplit(".", 1)[0] + ".weight"]


def test_permutation_changes_parameters_and_inverts_exactly(case):
    _, pairs, perm, _ = case
    model, permuted = pairs[torch.float32]
    a, b = model.state_dict(), permuted.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))
    restored = permute_state(spec_of(model), b, invert(perm))
    assert a.keys() == restored.keys()
    for k in a:
        assert torch.equal(a[k], restored[k]), k
    # permute() is permute_state() loaded into a copy.
    small = permute(model, perm).state_dict() if sum(v.numel() for v in a.values()) < 3e7 else b
    assert all(torch.equal(small[k], b[k]) for k in a)


def test_train_outputs_and_running_stats_invariant(case):
    _, pairs, perm, x = case
    model, permuted = pairs[torch.float64]
    spec = spec_of(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
    saved = [{k: v.clone() for k, v in m.state_dict().items() if k in before} for m in (model, permuted)]
    try:
        with torch.no_grad():
            assert_close(no_dropout_train(model)(x), no_dropout_train(permuted)(x), 1e-10)
        # The running statistics updated by the batch are permuted alike.
        a, b = model.state_dict(), permuted.state_dict()
        for k in before:
            group = spec.axes[k][0] if spec.axes[k] else None
            expected = a[k] if group is None else a[k].index_select(0, perm[group])
            assert torch.allclose(b[k], expected, rtol=1e-12, atol=1e-12), k
            assert k.endswith("num_batches_tracked") or not torch.equal(a[k], before[k]), k
    finally:
        for m, s in zip((model, permuted), saved):
            m.load_state_dict(s, strict=False)
            m.eval()


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_eval_outputs_and_probes_invariant(case, dtype, rtol):
    """Same logits in eval mode; each probe fires once per forward and its channels move with its group."""
    _, pairs, perm, x = case
    model, permuted = pairs[dtype]
    spec = spec_of(model)
    acts: dict = {}

    def record(m: nn.Module, tag: str) -> list:
        mods, handles = dict(m.named_modules()), []
        for group, plist in spec.probes.items():
            for i, probe in enumerate(plist):
                def hook(_m, _i, out, key=(tag, group, i), relu=probe.post == "relu"):
                    assert key not in acts, f"probe {key} fired twice in one forward"
                    acts[key] = (torch.relu(out) if relu else out).clone()
                handles.append(mods[probe.module].register_forward_hook(hook))
        return handles

    handles = record(model, "a") + record(permuted, "b")
    try:
        with torch.no_grad():
            assert_close(model.eval()(x.to(dtype)), permuted.eval()(x.to(dtype)), rtol)
    finally:
        for h in handles:
            h.remove()
    for group, plist in spec.probes.items():
        assert plist, f"group {group} has no probes"
        for i in range(len(plist)):
            a, b = acts[("a", group, i)], acts[("b", group, i)]
            assert a.shape[1] == len(perm[group]), (group, plist[i])
            assert_close(a.index_select(1, perm[group]), b, rtol)


class ToyInception(nn.Module):
    """Two conv branches (3 and 5 channels) concatenated into 8, a BN on the 8, a conv consuming them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.branch_a = nn.Conv2d(4, 3, 1)
        self.branch_b = nn.Conv2d(4, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mix = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(torch.cat([self.branch_a(x), self.branch_b(x)], 1)))
        return self.head(torch.relu(self.mix(x)).mean((2, 3)))

    def permutation_spec(self) -> PermSpec:
        axes = (conv_bn("stem", None, "stem", None, conv_bias=True)
                | conv_bn("branch_a", None, "a", "stem", conv_bias=True)
                | conv_bn("branch_b", None, "b", "stem", conv_bias=True)
                | bn_entries("bn", "cat")
                | conv_bn("mix", None, "mix", "cat")
                | linear("head", None, "mix"))
        probes = {g: [Probe(m, "relu")] for g, m in
                  [("stem", "stem"), ("a", "branch_a"), ("b", "branch_b"), ("mix", "mix")]}
        return PermSpec(axes=axes, probes=probes, concat={"cat": ["a", "b"]})


def test_concatenated_group_permutation_invariance():
    torch.manual_seed(0)
    model = randomise(ToyInception()).double()
    spec = spec_of(model)
    spec.check(model)
    assert set(model.state_dict()) == set(spec.axes)
    assert spec.groups() == ["stem", "a", "b", "mix"]
    assert spec.group_sizes(model.state_dict())["cat"] == 8
    perm = random_permutation(model, torch.Generator().manual_seed(4))
    permuted = permute(model, perm)
    # Inversion is pure indexing: exact. Check it before train-mode forwards update BatchNorm statistics
    # (per-channel reductions are not bitwise position-independent on every CPU).
    restored = permute(permuted, invert(perm)).state_dict()
    assert all(torch.equal(v, restored[k]) for k, v in model.state_dict().items())
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(permuted, mode)()
        with torch.no_grad():
            assert_close(model(x), permuted(x), 1e-10)
    # The concatenated axis moves block-diagonally: parts never mix.
    w, wp = model.state_dict()["mix.weight"], permuted.state_dict()["mix.weight"]
    assert torch.equal(wp[:, :3], w[:, :3].index_select(1, perm["a"]).index_select(0, perm["mix"]))
    assert torch.equal(wp[:, 3:], w[:, 3:].index_select(1, perm["b"]).index_select(0, perm["mix"]))
    # After the train-mode forwards both models' running statistics moved; they still correspond.
    restored = permute(permuted, invert(perm)).state_dict()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert_close(v, restored[k], 1e-12)
        else:
            assert torch.equal(v, restored[k])


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_width_scales_every_stage_and_keeps_the_spec(name):
    """``width`` sets stage 1's planes (stages double from it); the spec stays exact on the narrow net."""
    torch.manual_seed(0)
    model = randomise(models.build(name, num_classes=10, in_channels=1, width=8)).double().eval()
    expansion = 4 if name == "resnet50" else 1
    assert model.conv1.out_channels == 8 and model.fc.in_features == 64 * expansion
    assert [getattr(model, f"layer{k}")[0].conv1.out_channels for k in range(1, 5)] == [8, 16, 32, 64]
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in models.build(name, num_classes=10, in_channels=1).parameters()) / 30
    spec = spec_of(model)
    spec.check(model)
    assert set(model.state_dict()) == set(spec.axes)
    assert len(spec.groups()) == EXPECTED_GROUPS[name]
    perm = random_permutation(model, torch.Generator().manual_seed(5))
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), permute(model, perm).eval()(x), 1e-10)


@pytest.mark.parametrize("width", [0, -8, 2.5, True])
def test_resnet_width_must_be_a_positive_integer(width):
    with pytest.raises(ValueError, match="width' must be an integer|width must be a positive integer"):
        models.build("resnet18", num_classes=10, width=width)


@pytest.mark.parametrize("name", ["resnet18"])
def test_resnet_imagenet_stem_permutation_invariance(name):
    """The torchvision-style stem (7x7 stride 2 + max-pool, as BackdoorBench builds resnet18/50) keeps the spec."""
    torch.manual_seed(0)
    model = randomise(models.build(name, num_classes=10, stem="imagenet")).double().eval()
    spec = spec_of(model)
    spec.check(model)
    assert set(model.state_dict()) == set(spec.axes)
    perm = random_permutation(model, torch.Generator().manual_seed(5))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), permute(model, perm).eval()(x), 1e-10)
