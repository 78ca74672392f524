"""PreActResNet-18 exactly as BackdoorBench defines it (``models/preact_resnet.py``).

CIFAR-style: a 3x3 stem conv with no BatchNorm after it, pre-activation blocks (BN → ReLU
before each conv, the projection shortcut applied to the activated input), stages of
64/128/256/512 channels with strides 1/2/2/2, no final BN or ReLU, adaptive average pool and a
linear head. Module names match BackdoorBench's, so its checkpoints load unchanged.

Permutation symmetry: everything added into one residual stream (the stem conv for stage 1, each
block's ``conv2`` and ``shortcut`` conv) shares that stage's stream group ``s{k}``; a block's
``bn1`` normalises the *incoming* stream; the shortcut conv maps stream k-1 → k; each block owns
one inner group (``conv1`` out, ``bn2``, ``conv2`` in). Probes read raw conv outputs (before any
BN), as the released TSC code does for this architecture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tscray.models.registry import MODELS
from tscray.symmetry.spec import PermSpec, Probe, bn_entries, conv_bn, linear


class PreActBlock(nn.Module):
    """Pre-activation BasicBlock: bn1 → relu → (shortcut) / conv1 → bn2 → relu → conv2, plus shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.has_shortcut = stride != 1 or in_planes != self.expansion * planes
        if self.has_shortcut:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.has_shortcut else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        # Not in place: a raw probe on conv2 keeps a reference to its output.
        return out + shortcut


@MODELS.register("preactresnet18")
class PreActResNet(nn.Module):
    """BackdoorBench's PreActResNet with PreActBlocks; ``num_blocks`` defaults to ResNet-18's [2, 2, 2, 2]."""

    def __init__(self, num_classes: int, in_channels: int = 3,
                 num_blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.num_blocks = tuple(num_blocks)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, self.num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, self.num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, self.num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, self.num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * PreActBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.avgpool(out)
        return self.linear(out.flatten(1))

    def permutation_spec(self) -> PermSpec:
        axes: dict = conv_bn("conv1", None, "s1", None)
        probes: dict[str, list[Probe]] = {"s1": [Probe("conv1")]}
        stream = "s1"
        for k in range(1, 5):
            out_stream = f"s{k}"
            probes.setdefault(out_stream, [])
            for i, block in enumerate(getattr(self, f"layer{k}")):
                name, inner = f"layer{k}.{i}", f"b{k}.{i}"
                axes |= bn_entries(f"{name}.bn1", stream)
                axes |= conv_bn(f"{name}.conv1", f"{name}.bn2", inner, stream)
                axes |= conv_bn(f"{name}.conv2", None, out_stream, inner)
                probes[inner] = [Probe(f"{name}.conv1")]
                probes[out_stream].append(Probe(f"{name}.conv2"))
                if block.has_shortcut:
                    axes |= conv_bn(f"{name}.shortcut.0", None, out_stream, stream)
                    probes[out_stream].append(Probe(f"{name}.shortcut.0"))
                elif stream != out_stream:
                    raise AssertionError("identity shortcut between different streams")
                stream = out_stream
        axes |= linear("linear", None, stream)
        return PermSpec(axes=axes, probes=probes)
