"""BadEncoder: fine-tuning pulls triggered features onto the reference while clean features stay put."""

import pytest
import torch

from tscray import models
from tscray.data.tensors import ImageData
from tscray.ssl import BadEncoderConfig, PatchTrigger, badencoder, extract, reference_images


def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(1).mean())


def test_badencoder_moves_triggered_features_to_the_reference(embedded):
    torch.manual_seed(0)
    clean = models.build("simclr-cnn", 10, in_channels=1, widths=(8, 16, 16, 32), proj_dim=16).eval()
    shadow = embedded.train.subset(range(0, 600, 2))
    ref = reference_images(embedded.train, target=0, n=1)
    trigger = PatchTrigger(6)
    probe = embedded.test.subset(torch.nonzero(embedded.test.y != 0).flatten()[:100])
    triggered = ImageData(trigger(probe.x), probe.y)

    def stats(model):
        f_ref = extract(model, ImageData(ref, torch.zeros(1)), embedded.prep)
        return (mean_cos(extract(model, triggered, embedded.prep), f_ref),
                extract(model, probe, embedded.prep))

    before, clean_feats = stats(clean)
    bd = badencoder(clean, shadow, ref, embedded.prep, trigger, BadEncoderConfig(epochs=4, batch_size=60, lr=0.05))
    after, bd_feats = stats(bd)
    utility = mean_cos(clean_feats, bd_feats)
    print(f"\ncos(triggered, reference): {before:.3f} -> {after:.3f}; cos(clean features, before/after): {utility:.3f}")
    assert after > 0.95 and (1 - after) < 0.4 * (1 - before)  # the cosine distance shrinks several-fold
    assert utility > 0.8
    # the projection head and BatchNorm (eval mode, frozen affine) are untouched
    sd0, sd1 = clean.state_dict(), bd.state_dict()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0 if k.startswith("head.") or ".bns." in k)
    assert any(not torch.equal(sd0[k], sd1[k]) for k in sd0 if "convs" in k)


def test_patch_trigger_and_reference_checks():
    x = torch.zeros(2, 1, 12, 12, dtype=torch.uint8)
    y = PatchTrigger(3, margin=1)(x)
    assert y.dtype == torch.uint8 and int(y.sum()) == 2 * 9 * 255 and x.sum() == 0
    assert (y[:, :, 8:11, 8:11] == 255).all() and (y[:, :, 11] == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        PatchTrigger(12, margin=1)(x)
    with pytest.raises(ValueError, match="reference"):
        badencoder(torch.nn.Linear(2, 2), ImageData(x, torch.zeros(2)), torch.zeros(1, 1, 12, 12), None)
    with pytest.raises(ValueError, match="only 0 images"):
        reference_images(ImageData(x, torch.zeros(2)), target=1)
