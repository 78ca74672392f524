"""Shared test helpers: small models with randomised BatchNorm statistics and a clean loader."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

torch.set_num_threads(int(os.environ.get("TSCRAY_TEST_THREADS", "2")))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN running stats, affine parameters and biases, so tests can't pass on defaults 0/1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "bias")) or (name.endswith("weight") and t.dim() == 1):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model


@pytest.fixture
def embedded():
    from tscray.data import load
    return load("fashion-mnist-embedded", train_per_class=60, test_per_class=20)
