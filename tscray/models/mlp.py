"""A multi-layer perceptron on flattened inputs; the simplest permutation-symmetric model."""

from __future__ import annotations

import torch
from torch import nn

from tscray.models.registry import MODELS
from tscray.symmetry.spec import PermSpec, Probe, linear


@MODELS.register("mlp")
class MLP(nn.Module):
    """Flatten → [Linear → ReLU] × len(hidden) → Linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 28,
                 hidden: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        dims = [in_channels * image_size * image_size, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.head(x)

    def permutation_spec(self) -> PermSpec:
        axes: dict = {}
        prev = None
        for i in range(len(self.hidden)):
            axes |= linear(f"hidden.{i}", f"h{i}", prev)
            prev = f"h{i}"
        axes |= linear("head", None, prev)
        probes = {f"h{i}": [Probe(f"hidden.{i}", "relu")] for i in range(len(self.hidden))}
        return PermSpec(axes=axes, probes=probes)
