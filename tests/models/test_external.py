"""External architectures (torchvision builders, a user's importable builder): built, given a derived and
verified spec, validated up front in sweeps and refused in one line when they cannot be used."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from tscray import models
from tscray.config import SpecError, validate
from tscray.models import external

USER_MODULE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes, in_channels, width=8):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(2 * width * 14 * 14, num_classes)  # a flattened map: needs the input size

        def forward(self, x):
            return self.head(self.body(x).flatten(1))

    def build_net(num_classes, in_channels=3, width=8):
        return Net(num_classes, in_channels, width)

    def not_a_model(num_classes):
        return 42

    class Untraceable(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            if x.sum() > 0:
                x = -x
            return self.fc(x.flatten(1)[:, :4])

    def untraceable(num_classes):
        return Untraceable(num_classes)
''')


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "tscray_user_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tscray_user_nets"


def test_a_user_builder_gets_a_derived_spec_for_the_data_shape(user_module: str) -> None:
    model = models.build(f"{user_module}:build_net", 10, 1, input_hw=(28, 28), width=4)
    spec = model.permutation_spec()
    assert spec.groups() == ["body.0", "body.4"]
    assert spec.axes["head.weight"][1].repeat == 14 * 14  # type: ignore[union-attr]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_models_are_built_without_weights_for_any_channels() -> None:
    model = models.build("torchvision:resnet18", 7, 1, input_hw=(28, 28))
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert len(model.permutation_spec().groups()) == 12


@pytest.mark.parametrize("name, message", [
    ("torchvision:resnet99", "torchvision has no classification model 'resnet99'"),
    ("no_such_pkg.nets:build", "cannot import 'no_such_pkg.nets'"),
    (":build", "write torchvision:NAME or package.module:builder"),
])
def test_bad_references_are_refused_in_one_line(name: str, message: str) -> None:
    with pytest.raises(external.ArchError, match=message) as err:
        models.build(name, 10)
    assert "\n" not in str(err.value)


def test_builders_that_fail_are_refused(user_module: str) -> None:
    from tscray.symmetry.derive import DeriveError

    with pytest.raises(external.ArchError, match="has no callable 'missing'"):
        models.build(f"{user_module}:missing", 10)
    with pytest.raises(external.ArchError, match="returned int, not a torch Module"):
        models.build(f"{user_module}:not_a_model", 10)
    with pytest.raises(external.ArchError, match="unexpected keyword argument 'depth'"):
        models.build(f"{user_module}:build_net", 10, input_hw=(28, 28), depth=3)
    with pytest.raises(DeriveError, match="torch.fx cannot trace Untraceable"):
        models.build(f"{user_module}:untraceable", 10)


def spec_with(arch: str, **train: object) -> dict:
    return {"name": "ext", "grid": {"arch": [arch], "attack": ["badnets"], "defense": ["tsc"]},
            "train": {"epochs": 1, **train}}


def test_sweeps_take_external_architectures(user_module: str) -> None:
    spec = validate(spec_with(f"{user_module}:build_net", arch_kw={"width": 4}))
    assert spec.grid.arch == (f"{user_module}:build_net",)
    validate(spec_with("torchvision:mobilenet_v2", arch_kw={"width_mult": 0.25}))


@pytest.mark.parametrize("arch, train, message", [
    ("torchvision:nope", {}, "grid.arch[0]: architecture 'torchvision:nope': torchvision has no"),
    ("cnn", {"arch_kw": {"width_mult": 0.5}}, "train.arch_kw: architecture 'cnn' does not take"),
    # (it reached a conv as channel count '0': "not all arguments converted during string formatting")
    ("cnn", {"arch_kw": {"widths": {"0": 8}}}, "option 'widths' must be a non-empty list of positive integers"),
    ("cnn", {"arch_kw": {"widths": [8, 0]}}, "option 'widths' must be a non-empty list of positive integers"),
    ("resnet18", {"arch_kw": {"width": "8"}}, "option 'width' must be an integer, got '8'"),
    ("{mod}:build_net", {"arch_kw": {"width": "x"}}, "grid.arch: '{mod}:build_net' on fashion-mnist-embedded"),
])
def test_sweeps_refuse_unusable_architectures_before_compute(user_module: str, arch: str, train: dict,
                                                             message: str) -> None:
    with pytest.raises(SpecError) as err:
        validate(spec_with(arch.format(mod=user_module), **train))
    assert message.format(mod=user_module) in str(err.value)


def test_each_architecture_of_a_grid_may_have_its_own_options() -> None:
    from tscray.plan import make_plan

    raw = spec_with("cnn", arch_kw={"cnn": {"widths": [8, 8, 8, 8]},
                                    "torchvision:mobilenet_v2": {"width_mult": 0.25}})
    raw["grid"]["arch"] = ["cnn", "torchvision:mobilenet_v2"]
    raw["grid"]["defense"] = ["none"]
    plan = make_plan(validate(raw))
    kw = {s.params["arch"]: s.params["arch_kw"] for s in plan.steps.values() if s.kind == "backdoor"}
    assert kw == {"cnn": {"widths": [8, 8, 8, 8]}, "torchvision:mobilenet_v2": {"width_mult": 0.25}}
