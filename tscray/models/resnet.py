"""ResNet-18 (BasicBlock) and ResNet-50 (Bottleneck), CIFAR-style by default.

Module names follow torchvision (``conv1``/``bn1`` stem, ``layer1..4``, blocks with ``conv{i}``/
``bn{i}`` and a ``downsample`` Sequential(conv1x1, BN), ``fc`` head; stride on the 3x3 conv of a
Bottleneck, as torchvision's "v1.5"), so torchvision-format checkpoints load unchanged.
``stem="cifar"`` (default) is a 3x3 stride-1 conv with no max-pool; ``stem="imagenet"`` is
torchvision's 7x7 stride-2 conv followed by a 3x3 stride-2 max-pool (what BackdoorBench's
``resnet18`` builds, through torchvision). Every block ends with its own ``out`` ReLU module so the
post-addition activation can be hooked (it holds no state).

Permutation symmetry: everything added into one residual stream shares the stage's stream group
``s{k}``; a ``downsample`` conv + BN maps stream k-1 → k; each BasicBlock has one inner group,
each Bottleneck two. In ResNet-18 the stem conv + BN write straight into stage 1's stream (64 → 64,
identity shortcuts). In ResNet-50 the first block projects 64 → 256, so the stem is its own group
``stem``: 1 + 4 stream groups and 16 × 2 = 32 inner groups.

Probes: ResNet-18 matches on raw conv outputs (before BN) like the released TSC code: inner group
on ``conv1``, stream group on the stem conv and every block's ``conv2`` and ``downsample.0``.
ResNet-50 matches after BN + ReLU: inner groups on ``bn1``/``bn2`` (ReLU), the stem on ``bn1``
(ReLU), a stream group on the ``out`` ReLU of every block of its stage.
"""

from __future__ import annotations

import torch
from torch import nn

from tscray.models.registry import MODELS
from tscray.symmetry.spec import PermSpec, Probe, conv_bn, linear


def _downsample(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """conv3x3 → BN → ReLU → conv3x3 → BN, plus (projected) input, ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        identity = x if self.downsample is None else self.downsample(x)
        return self.out(y + identity)


class Bottleneck(nn.Module):
    """conv1x1 → BN → ReLU → conv3x3 (stride) → BN → ReLU → conv1x1 (×4) → BN, plus input, ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride)
        self.out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        identity = x if self.downsample is None else self.downsample(x)
        return self.out(y + identity)


class ResNet(nn.Module):
    """Stem → four stages (``width`` × 1/2/4/8 planes, 64/128/256/512 by default; strides 1/2/2/2) → global
    average pool → fc."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], num_classes: int,
                 in_channels: int = 3, stem: str = "cifar", width: int = 64) -> None:
        super().__init__()
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"width must be a positive integer (stage 1's planes, 64 in the standard net), "
                             f"got {width!r}")
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.stem = stem
        self.block = block
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.in_planes = width
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))

    def permutation_spec(self) -> PermSpec:
        basic = self.block is BasicBlock
        stem = "s1" if basic else "stem"
        axes: dict = conv_bn("conv1", "bn1", stem, None)
        probes: dict[str, list[Probe]] = {stem: [Probe("conv1")] if basic else [Probe("bn1", "relu")]}
        stream = stem
        for k in range(1, 5):
            out_stream = f"s{k}"
            probes.setdefault(out_stream, [])
            for i, block in enumerate(getattr(self, f"layer{k}")):
                name = f"layer{k}.{i}"
                if basic:
                    inner = f"b{k}.{i}"
                    axes |= conv_bn(f"{name}.conv1", f"{name}.bn1", inner, stream)
                    axes |= conv_bn(f"{name}.conv2", f"{name}.bn2", out_stream, inner)
                    probes[inner] = [Probe(f"{name}.conv1")]
                    probes[out_stream].append(Probe(f"{name}.conv2"))
                else:
                    inner1, inner2 = f"b{k}.{i}.a", f"b{k}.{i}.b"
                    axes |= conv_bn(f"{name}.conv1", f"{name}.bn1", inner1, stream)
                    axes |= conv_bn(f"{name}.conv2", f"{name}.bn2", inner2, inner1)
                    axes |= conv_bn(f"{name}.conv3", f"{name}.bn3", out_stream, inner2)
                    probes[inner1] = [Probe(f"{name}.bn1", "relu")]
                    probes[inner2] = [Probe(f"{name}.bn2", "relu")]
                    probes[out_stream].append(Probe(f"{name}.out", "relu"))
                if block.downsample is not None:
                    axes |= conv_bn(f"{name}.downsample.0", f"{name}.downsample.1", out_stream, stream)
                    if basic:
                        probes[out_stream].append(Probe(f"{name}.downsample.0"))
                elif stream != out_stream:
                    raise AssertionError("identity shortcut between different streams")
                stream = out_stream
        axes |= linear("fc", None, stream)
        return PermSpec(axes=axes, probes=probes)


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, stem: str = "cifar", width: int = 64) -> ResNet:
    """ResNet-18: BasicBlocks [2, 2, 2, 2]; ``width`` 16 is a quarter-width net (1/16 of the compute)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, stem, width)


@MODELS.register("resnet50")
def resnet50(num_classes: int, in_channels: int = 3, stem: str = "cifar", width: int = 64) -> ResNet:
    """ResNet-50: Bottlenecks [3, 4, 6, 3], expansion 4."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, stem, width)
