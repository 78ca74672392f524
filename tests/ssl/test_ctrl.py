"""CTRL's frequency trigger: shape, dtype, bounds, invisibility, the DCT it uses, and target-only poisoning."""

import pytest
import torch
from scipy.fft import dctn

from tscray.data.tensors import ImageData
from tscray.ssl import CTRLTrigger, ctrl


def test_block_dct_is_the_orthonormal_dct_and_inverts():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    whole = ctrl.block_dct(x, 16)
    assert torch.allclose(whole, torch.from_numpy(dctn(x.numpy(), axes=(2, 3), norm="ortho")), atol=1e-10)
    blocks = ctrl.block_dct(x, 8)
    assert torch.allclose(blocks[..., :8, 8:], torch.from_numpy(dctn(x[..., :8, 8:].numpy(), axes=(2, 3),
                                                                     norm="ortho")), atol=1e-10)
    assert torch.allclose(ctrl.block_dct(blocks, 8, inverse=True), x, atol=1e-10)


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (4, 3, 32, 32), (3, 3, 64, 64)])
def test_trigger_shape_dtype_bounds_and_visibility(shape):
    x = torch.randint(20, 236, shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = CTRLTrigger()(x)
    assert y.shape == x.shape and y.dtype == torch.uint8 and not torch.equal(x, x.clone().zero_())
    diff = (y.int() - x.int()).abs()
    assert diff.float().mean() > 1.0  # it is there ...
    assert int(diff.max()) <= 2 * 100 * 2 / min(32, shape[-1]) * 1.7 + 1  # ... and small (two coefficients)
    assert torch.equal(CTRLTrigger()(x), y)  # deterministic
    saturated = CTRLTrigger(magnitude=5000)(x)
    assert int(saturated.min()) >= 0 and int(saturated.max()) <= 255


def test_rgb_trigger_lives_in_the_chrominance():
    x = torch.randint(60, 196, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    y = CTRLTrigger()(x)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    dy = ((y.float() - x.float()) * luma).sum(1)
    assert float(dy.abs().max()) <= 1.5  # rounding only: Y is untouched
    assert float((y.float() - x.float()).abs().mean()) > 1.0


def test_window_and_positions():
    t = CTRLTrigger()
    assert t.window_for(28, 28) == 28 and t.positions_for(28) == [(13, 13), (27, 27)]
    assert t.window_for(64, 64) == 32 and t.positions_for(32) == [(15, 15), (31, 31)]
    with pytest.raises(ValueError, match="divisible"):
        CTRLTrigger(window=8, positions=((3, 3), (7, 7))).window_for(28, 28)
    with pytest.raises(ValueError, match="outside"):
        CTRLTrigger(window=8)
    with pytest.raises(ValueError, match="uint8"):
        t(torch.zeros(1, 1, 8, 8))


def test_poison_only_target_class_at_the_rate(embedded):
    poisoned, idx = ctrl.poison(embedded.train, target=2, rate=0.02, seed=0)
    n = len(embedded.train)
    assert len(idx) == int(0.02 * n) and (embedded.train.y[idx] == 2).all()
    changed = (poisoned.x != embedded.train.x).flatten(1).any(1)
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(idx.tolist())
    assert changed.sum() >= len(idx) - 1
    assert torch.equal(poisoned.y, embedded.train.y)  # clean-label
    assert torch.equal(ctrl.poison(embedded.train, 2, 0.02, seed=0)[1], idx)
    with pytest.raises(ValueError, match="poisons none"):
        ctrl.poison(embedded.train, 2, rate=1e-5)
    with pytest.raises(ValueError, match="class 2 has"):
        ctrl.poison(ImageData(embedded.train.x[:20], embedded.train.y[:20]), 2, rate=1.0)
