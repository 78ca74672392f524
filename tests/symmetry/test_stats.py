import numpy as np
import pytest
import torch

from tscray.symmetry import CrossCorrelation
from tscray.symmetry.stats import as_units


def test_streaming_correlation_equals_corrcoef_with_uneven_batches_and_constant_columns():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(257, 6, generator=gen, dtype=torch.float64) * 3 + 5
    b = a[:, [2, 0, 1]] * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + torch.randn(257, 3, generator=gen, dtype=torch.float64)
    b = torch.cat([b, torch.full((257, 1), 7.0, dtype=torch.float64)], 1)  # a constant (dead) unit
    a[:, 4] = -1.5  # and a dead unit on the other side
    stats = CrossCorrelation()
    for lo, hi in [(0, 1), (1, 100), (100, 101), (101, 200), (200, 257)]:
        stats.update(a[lo:hi], b[lo:hi])
    got = stats.correlation().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.corrcoef(a.numpy().T, b.numpy().T)[:6, 6:]
    ref = np.nan_to_num(ref, nan=0.0)  # numpy gives NaN for constant columns; we want 0
    assert got.shape == (6, 4)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert np.all(got[4] == 0) and np.all(got[:, 3] == 0)


def test_float32_activations_are_accumulated_in_float64():
    gen = torch.Generator().manual_seed(1)
    a = (torch.randn(5000, 3, generator=gen) + 1e3).float()
    stats = CrossCorrelation()
    for chunk in a.split(7):
        stats.update(chunk, chunk)
    np.testing.assert_allclose(stats.correlation().diagonal().numpy(), 1.0, atol=1e-9)


def test_conv_maps_become_unit_columns():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    u = as_units(x)
    assert u.shape == (8, 3)
    assert torch.equal(u[:, 1].sort().values, x[:, 1].flatten().sort().values)


def test_mismatched_rows_and_empty_stats_raise():
    stats = CrossCorrelation()
    with pytest.raises(ValueError, match="no observations"):
        stats.correlation()
    with pytest.raises(ValueError, match="rows"):
        stats.update(torch.zeros(3, 2), torch.zeros(4, 2))
