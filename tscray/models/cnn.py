"""A small VGG-style CNN with BatchNorm, sized for CPU runs on 28-32 px images."""

from __future__ import annotations

import torch
from torch import nn

from tscray.models.registry import MODELS
from tscray.symmetry.spec import PermSpec, Probe, conv_bn, linear


@MODELS.register("cnn")
class CNN(nn.Module):
    """[conv3x3 → BN → ReLU] per width, 2x2 max-pool after each of the first ``pools`` convs, global average
    pool, linear head. Pooling early keeps a CPU step cheap (~6M MACs per 28 px image by default)."""

    def __init__(self, num_classes: int, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 64, 128),
                 pools: int = 3) -> None:
        super().__init__()
        self.widths, self.pools = tuple(widths), pools
        chans = [in_channels, *self.widths]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in zip(chans[:-1], chans[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in self.widths)
        self.head = nn.Linear(self.widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = torch.relu(bn(conv(x)))
            if i < self.pools:
                x = nn.functional.max_pool2d(x, 2)
        return self.head(x.mean((2, 3)))

    def permutation_spec(self) -> PermSpec:
        axes: dict = {}
        prev = None
        for i in range(len(self.widths)):
            axes |= conv_bn(f"convs.{i}", f"bns.{i}", f"c{i}", prev)
            prev = f"c{i}"
        axes |= linear("head", None, prev)
        probes = {f"c{i}": [Probe(f"bns.{i}", "relu")] for i in range(len(self.widths))}
        return PermSpec(axes=axes, probes=probes)
