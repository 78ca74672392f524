"""VGG19-BN as torchvision builds it (``torchvision.models.vgg19_bn(num_classes=...)``).

``features``: configuration "E" (16 conv3x3 → BN → ReLU, five 2x2 max-pools), then
``AdaptiveAvgPool2d((7, 7))`` (so any image size ≥ 32 px works) and the classifier
Linear(512·7·7, 4096) → ReLU → Dropout → Linear(4096, 4096) → ReLU → Dropout → Linear(4096, classes).
Module names and initialisation match torchvision, so its checkpoints load unchanged.

Permutation symmetry: one group per conv (``c0``..``c15``), one per hidden classifier layer
(``fc0``, ``fc1``). The flattened 512×7×7 map feeds the first Linear, whose input axis is
``Expand("c15", 49)`` (channel-major flattening). Probes: after BN + ReLU for convs, the ReLU of
each hidden Linear for the classifier groups.
"""

from __future__ import annotations

import torch
from torch import nn

from tscray.models.registry import MODELS
from tscray.symmetry.spec import Expand, PermSpec, Probe, conv_bn, linear

CFG_E: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
POOL = 7


@MODELS.register("vgg19_bn")
class VGG(nn.Module):
    """VGG with BatchNorm; ``cfg`` defaults to VGG-19 (configuration E), ``hidden`` to 4096."""

    def __init__(self, num_classes: int, in_channels: int = 3, cfg: tuple[int | str, ...] = CFG_E,
                 hidden: int = 4096, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.conv_bn: list[tuple[int, int]] = []  # (conv index, BN index) in features
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            self.conv_bn.append((len(layers), len(layers) + 1))
            layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
            c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((POOL, POOL))
        self.classifier = nn.Sequential(
            nn.Linear(c * POOL * POOL, hidden), nn.ReLU(), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                assert m.bias is not None  # every conv here has a bias
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))

    def permutation_spec(self) -> PermSpec:
        axes: dict = {}
        probes: dict[str, list[Probe]] = {}
        prev: str | None = None
        for i, (conv, bn) in enumerate(self.conv_bn):
            g = f"c{i}"
            axes |= conv_bn(f"features.{conv}", f"features.{bn}", g, prev, conv_bias=True)
            probes[g] = [Probe(f"features.{bn}", "relu")]
            prev = g
        assert prev is not None, "a VGG has at least one conv"
        axes |= linear("classifier.0", "fc0", Expand(prev, POOL * POOL))
        axes |= linear("classifier.3", "fc1", "fc0")
        axes |= linear("classifier.6", None, "fc1")
        probes["fc0"] = [Probe("classifier.0", "relu")]
        probes["fc1"] = [Probe("classifier.3", "relu")]
        return PermSpec(axes=axes, probes=probes)
