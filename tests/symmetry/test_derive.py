"""Permutation specs derived from the graph: equal to the hand-written ones, exact on torchvision and
user-defined models, safe (groups end) or refused on ops that mix channels, broken specs caught."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tscray import models
from tscray._torchvision import torchvision
from tscray.symmetry import match, permute, random_permutation
from tscray.symmetry.derive import DeriveError, SpecMismatch, derivation, derive, verify
from tscray.symmetry.spec import Expand, PermSpec

pytestmark = pytest.mark.kernels  # verification compares float64 outputs: rerun under other CPU kernels

REGISTERED = {  # name -> (build kwargs, example input shape)
    "mlp": (dict(in_channels=1, image_size=28), (2, 1, 28, 28)),
    "cnn": (dict(in_channels=1), (2, 1, 28, 28)),
    "preactresnet18": ({}, (2, 3, 32, 32)),
    "resnet18": ({}, (2, 3, 32, 32)),
    "resnet50": ({}, (2, 3, 32, 32)),
    "vgg19_bn": ({}, (2, 3, 32, 32)),
    "simclr-cnn": (dict(in_channels=1), (2, 1, 28, 28)),
    "simclr-resnet18": ({}, (2, 3, 32, 32)),
}


def canonical(spec: PermSpec) -> dict[str, tuple]:
    """The spec with groups renamed by first use (concatenated groups as their parts): equal specs up to
    renaming give equal results."""
    rename: dict[str, int] = {}
    out = {}
    for key in sorted(spec.axes):
        row: list = []
        for ax in spec.axes[key]:
            if ax is None:
                row.append(None)
                continue
            name, rep = (ax.group, ax.repeat) if isinstance(ax, Expand) else (ax, 1)
            parts = tuple(rename.setdefault(p, len(rename)) for p in spec.concat.get(name, [name]))
            row.append((parts, rep))
        out[key] = tuple(row)
    return out


def example(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_derived_spec_equals_the_hand_written_one(name: str) -> None:
    kw, shape = REGISTERED[name]
    model = models.build(name, 10, **kw)
    derived = derive(model, example(shape), check=False)
    hand = model.permutation_spec()
    assert canonical(derived) == canonical(hand)
    assert len(derived.groups()) == len(hand.groups())


@pytest.mark.parametrize("name", ["mlp", "cnn", "preactresnet18", "resnet18", "simclr-cnn"])
def test_hand_written_specs_pass_the_same_verification(name: str) -> None:
    kw, shape = REGISTERED[name]
    model = models.build(name, 10, **kw)
    verify(model, model.permutation_spec(), example(shape))


def test_probes_follow_the_design_rule() -> None:
    """Plain nets read after BN + ReLU, residual nets read raw producer outputs: as the hand-written specs."""
    def probes(spec: PermSpec) -> list[str]:
        return sorted(str(p) for pl in spec.probes.values() for p in pl)

    for name in ("cnn", "mlp", "resnet18", "preactresnet18"):
        kw, shape = REGISTERED[name]
        model = models.build(name, 10, **kw)
        assert probes(derive(model, example(shape), check=False)) == probes(model.permutation_spec()), name
    model = models.build("vgg19_bn", 10, cfg=(16, "M", 32, "M"), hidden=32)
    assert probes(derive(model, example((2, 3, 32, 32)), check=False)) == probes(model.permutation_spec())


def tv(name: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return torchvision().models.get_model_builder(name)(num_classes=10, weights=None, **kw)


CIFAR_STRIDES = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 1], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                 [6, 320, 1, 1]]  # docs/architectures.md: the setting mobilenet_v2's backdoor took at 28 px

TORCHVISION = {  # name[/variant] -> (kwargs, image size, groups it must find at least, concatenated groups at least)
    "resnet34": ({}, 32, 20, 0),
    "vgg11_bn": ({}, 32, 10, 0),
    "mobilenet_v2": (dict(width_mult=0.25), 32, 20, 0),
    "mobilenet_v2/cifar_strides": (dict(width_mult=0.25, inverted_residual_setting=CIFAR_STRIDES), 28, 20, 0),
    "googlenet": (dict(aux_logits=False, init_weights=True), 64, 50, 9),
    "efficientnet_b0": ({}, 32, 40, 0),
    "shufflenet_v2_x0_5": ({}, 64, 10, 0),
    "squeezenet1_1": ({}, 64, 20, 8),
}


ENDS_GROUPS = {"shufflenet_v2_x0_5"}  # its channel shuffle (view + transpose across channels) ends groups


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_models_get_exact_specs(name: str) -> None:
    kw, size, min_groups, min_concat = TORCHVISION[name]
    model = tv(name.split("/")[0], **kw)
    x = example((2, 3, size, size))
    d = derivation(model, x)
    verify(model, d.spec, x)
    assert len(d.spec.groups()) >= min_groups
    assert len(d.spec.concat) >= min_concat
    assert bool(d.ended) == (name in ENDS_GROUPS), d.ended
    d.spec.check(model)  # covers every entry, every group has a probe


def test_densenet_concatenations_become_block_diagonal_groups() -> None:
    densenet = torchvision().models.densenet.DenseNet
    model = densenet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10)
    spec = derive(model, example((2, 3, 32, 32)))
    # the second layer of the first block reads [stem, layer 1] concatenated, its BN normalises the same
    cat = spec.axes["features.denseblock1.denselayer2.norm1.weight"][0]
    assert cat in spec.concat and spec.concat[cat] == [spec.axes["features.conv0.weight"][0],
                                                       spec.axes["features.denseblock1.denselayer1.conv2.weight"][0]]


class UserNet(nn.Module):
    """What a user might write: residual, concatenation, depthwise conv, squeeze-excitation, flatten head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 1)
        self.dw = nn.Conv2d(14, 28, 3, padding=1, groups=14)  # depthwise, channel multiplier 2
        self.dw_bn = nn.BatchNorm2d(28)
        self.se1, self.se2 = nn.Conv2d(28, 4, 1), nn.Conv2d(4, 28, 1)
        self.head = nn.Linear(28 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.a_bn(self.a(x)))  # residual
        x = torch.cat([x, torch.relu(self.b(x))], dim=1)  # 8 + 6 channels
        x = nn.functional.max_pool2d(torch.relu(self.dw_bn(self.dw(x))), 2)
        s = torch.sigmoid(self.se2(torch.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        x = nn.functional.avg_pool2d(x * s, 2)
        return self.head(x.flatten(1))


def test_a_user_model_gets_an_exact_spec_with_every_construct() -> None:
    torch.manual_seed(0)
    model = UserNet()
    spec = derive(model, example((2, 1, 28, 28)))
    stem = spec.axes["stem.0.weight"][0]
    assert spec.axes["a.weight"][0] == stem  # the residual sum ties a's output to the stream
    cat = spec.axes["dw.weight"][0]
    assert isinstance(cat, Expand) and cat.repeat == 2 and spec.concat[cat.group] == [stem, spec.axes["b.weight"][0]]
    assert spec.axes["dw.weight"][1] is None
    assert spec.axes["se2.weight"][0] == cat  # the excitation scale shares the features' layout
    assert spec.axes["head.weight"] == (None, Expand(cat.group, 2 * 49))
    perm = random_permutation(_with(model, spec), torch.Generator().manual_seed(3))
    moved = permute(_with(model, spec), perm)
    assert not torch.equal(moved.state_dict()["a.weight"], model.state_dict()["a.weight"])
    x = example((4, 1, 28, 28), 5)
    model.eval(), moved.eval()
    torch.testing.assert_close(moved(x), model(x), rtol=1e-5, atol=1e-5)


def _with(model: nn.Module, spec: PermSpec) -> nn.Module:
    from tscray.models.external import DerivedSpec

    model.permutation_spec = DerivedSpec(spec)  # type: ignore[assignment]
    return model


class Mixers(nn.Module):
    """Ops that mix channels: LayerNorm, GroupNorm, a channel slice, a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c5 = nn.Conv2d(4, 6, 1)
        self.ln = nn.LayerNorm(6)
        self.c4 = nn.Linear(6, 5)
        self.fc = nn.Linear(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(torch.relu(self.gn(self.c1(x))))
        x = self.grouped(torch.relu(x))
        x = self.c5(self.c3(x)[:, :4])
        x = self.ln(x.mean((2, 3)))
        return self.fc(torch.relu(self.c4(x)))


def test_channel_mixing_ops_end_their_groups_safely() -> None:
    torch.manual_seed(0)
    model = Mixers()
    d = derivation(model, example((2, 3, 16, 16)))
    spec = d.spec
    verify(model, spec, example((2, 3, 16, 16)))
    assert spec.groups() == ["c4"]  # the only group no mixing op touches
    assert all(ax is None for key in ("c1.weight", "c2.weight", "grouped.weight", "c3.weight", "c5.weight",
                                                             "ln.weight")
               for ax in spec.axes[key])
    assert any("GroupNorm" in e for e in d.ended) and any("slices the channel axis" in e for e in d.ended)
    assert any("groups=2" in e for e in d.ended) and any("LayerNorm" in e for e in d.ended)


def test_strict_refuses_with_the_op_and_module_path() -> None:
    with pytest.raises(DeriveError, match=r"call_module gn: GroupNorm"):
        derive(Mixers(), example((2, 3, 16, 16)), strict=True)


def test_a_broken_spec_is_refused_naming_where_it_breaks() -> None:
    model = models.build("cnn", 10, in_channels=1)
    spec = model.permutation_spec()
    axes = dict(spec.axes)
    axes["bns.1.running_mean"] = (None,)  # the classic mistake: a forgotten BatchNorm buffer
    with pytest.raises(SpecMismatch, match=r"bns\.1"):
        verify(model, PermSpec(axes=axes, probes=spec.probes), example((2, 1, 28, 28)))
    axes = dict(spec.axes)
    axes["head.weight"] = ("c3", "c3")  # the classifier's output permuted with the features
    with pytest.raises(SpecMismatch):
        verify(model, PermSpec(axes=axes, probes=spec.probes), example((2, 1, 28, 28)))
    axes = {k: v for k, v in spec.axes.items() if k != "bns.0.running_var"}
    with pytest.raises(SpecMismatch, match="does not cover 'bns.0.running_var'"):
        verify(model, PermSpec(axes=axes, probes=spec.probes), example((2, 1, 28, 28)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: not traceable
            x = -x
        return self.c(x).mean((2, 3))


def test_an_untraceable_model_is_refused_in_one_line() -> None:
    with pytest.raises(DeriveError, match="torch.fx cannot trace Branchy") as err:
        derive(Branchy(), example((2, 3, 8, 8)))
    assert "\n" not in str(err.value)


class Pools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pool(self.pool(self.c(x)))).flatten(1)


def test_an_input_too_small_for_the_model_is_one_line_naming_the_layer_and_the_cause(capfd) -> None:
    """densenet121 on 28 px failed with torch.fx's 'ShapeProp error for: node=%features_transition3_pool :
    [num_users=17] = call_module[...' and fx printed a whole traceback to stderr before tscray's message."""
    with pytest.raises(DeriveError) as err:
        derive(Pools(), example((2, 3, 4, 4)))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("Pools fails on an input of shape (2, 3, 4, 4) at pool: "), msg
    assert "Output size is too small" in msg and "ShapeProp" not in msg
    assert capfd.readouterr().err == ""


def test_matching_runs_on_a_derived_spec() -> None:
    """Align a permuted copy back to the model: matching with derived probes recovers the permutation."""
    from tscray.symmetry import compose, invert, permute_state

    torch.manual_seed(0)
    model = _with(tv("resnet18"), derive(tv("resnet18"), example((2, 3, 32, 32)), check=False)).eval()
    perm = random_permutation(model, torch.Generator().manual_seed(1))
    moved = permute(model, perm)
    loader = [(example((16, 3, 32, 32), 7), torch.zeros(16, dtype=torch.long))]
    found = match(model, moved, loader, "align")
    back = compose(perm, found)
    for g, p in back.items():
        assert torch.equal(p, torch.arange(len(p))), g
    restored = permute_state(model.permutation_spec(), moved.state_dict(), found)
    for key, t in model.state_dict().items():
        assert torch.equal(restored[key], t), key
    assert invert(invert(perm)).keys() == perm.keys()


def test_derived_model_copies_and_pickles() -> None:
    import pickle

    model = models.build("torchvision:resnet18", 10, 1, input_hw=(28, 28))
    assert model.conv1.in_channels == 1
    spec = model.permutation_spec()
    assert len(spec.groups()) == 12
    assert copy.deepcopy(model).permutation_spec().axes == spec.axes
    assert pickle.loads(pickle.dumps(model)).permutation_spec().axes == spec.axes
