"""SSL encoders (backbone + projection head): a permutation preserves the projection exactly and reorders the
backbone features by their group."""

import pytest
import torch

from conftest import randomize
from tscray import models
from tscray.models.encoder import SSLEncoder
from tscray.symmetry import match, permute, random_permutation, spec_of

CASES = {"simclr-cnn": (dict(in_channels=1, widths=(8, 16, 16, 32)), (4, 1, 28, 28), 5),
         "simclr-resnet18": (dict(in_channels=3), (2, 3, 16, 16), 13),
         "simclr-mlp": (dict(in_channels=1, image_size=28), (4, 1, 28, 28), 3),
         # external backbones: their specs are derived from the graph and verified on the data's shape
         "simclr-torchvision:resnet18": (dict(in_channels=1, input_hw=(28, 28)), (2, 1, 28, 28), 13),
         "simclr-torchvision:mobilenet_v2": (dict(in_channels=3, input_hw=(16, 16), width_mult=0.25),
                                             (2, 3, 16, 16), 25)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_spec_covers_every_axis_and_permutation_preserves_outputs_and_features(name):
    kw, shape, groups = CASES[name]
    torch.manual_seed(0)
    model = randomize(models.build(name, 10, proj_dim=12, **kw), seed=1).double()
    spec = spec_of(model)
    spec.check(model)
    assert set(model.state_dict()) == set(spec.axes)
    assert len(spec.groups()) == groups and "proj" in spec.groups()
    assert spec.axes["head.3.weight"][0] is None  # the projection keeps its order
    perm = random_permutation(model, torch.Generator().manual_seed(2))
    permuted = permute(model, perm)
    assert not torch.equal(model.state_dict()["head.0.weight"], permuted.state_dict()["head.0.weight"])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(model, mode)()
            getattr(permuted, mode)()
            z, zp = model(x), permuted(x)
            assert z.shape == (shape[0], 12)
            assert torch.allclose(z, zp, rtol=1e-10, atol=1e-10), mode
            f, fp = model.features(x), permuted.features(x)
            assert f.shape == (shape[0], model.feature_dim)
            # features move with the backbone's last group: same values, reordered (probes/kNN unaffected)
            assert torch.allclose(f.index_select(1, perm[model.feature_group]), fp, rtol=1e-10, atol=1e-10), mode
            assert not torch.allclose(f, fp)


def test_unalign_matching_runs_on_an_encoder_and_keeps_its_function(embedded):
    from tscray.data.tensors import Loader
    torch.manual_seed(0)
    model = randomize(models.build("simclr-cnn", 10, in_channels=1, widths=(8, 8, 16, 16), proj_dim=8)).eval()
    loader = Loader(embedded.train.subset(range(64)), embedded.prep, 32)
    perm = match(model, model, loader, "unalign")
    assert set(perm) == set(spec_of(model).groups())
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perm.values())
    x = next(iter(loader))[0]
    with torch.no_grad():
        assert torch.allclose(model(x), permute(model, perm).eval()(x), atol=1e-5)


def test_registry_names_and_bad_settings():
    assert {"simclr-cnn", "simclr-resnet18"} <= set(models.names())
    enc = models.build("simclr-cnn", 10, in_channels=1)
    assert isinstance(enc, SSLEncoder) and enc.backbone_name == "cnn"
    assert not any(isinstance(m, torch.nn.Linear) for m in enc.backbone.modules())  # classifier removed
    with pytest.raises(ValueError, match="proj_dim"):
        SSLEncoder("cnn", 1, proj_dim=0)
    with pytest.raises(ValueError, match="plain architecture"):
        SSLEncoder("simclr-cnn", 1)


def test_an_external_encoder_is_named_validated_and_refused_like_any_architecture():
    from tscray.config import SpecError, validate

    raw = {"name": "s", "grid": {"arch": ["simclr-torchvision:resnet18"], "attack": ["badencoder"], "defense": ["tsc"]},
           "train": {"method": "simclr", "epochs": 1}}
    validate(raw, check_data=False)
    with pytest.raises(SpecError, match="torchvision has no classification model 'resnet7'"):
        validate({**raw, "grid": {**raw["grid"], "arch": ["simclr-torchvision:resnet7"]}}, check_data=False)
    with pytest.raises(SpecError, match="a classifier"):  # an encoder is refused for supervised training
        validate({**raw, "train": {"epochs": 1}}, check_data=False)
