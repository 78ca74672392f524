"""Self-supervised encoders: a registered backbone minus its classifier, plus a SimCLR projection head.

``forward(x)`` is the projection (what SimCLR's NT-Xent and the curves of TSC see, as the released code
puts encoder + projection head on the curve); ``features(x)`` is the backbone's representation (what
linear probes, kNN monitors and BadEncoder use). The head follows SimCLR's CIFAR definition used by
BadEncoder: Linear(d, d, no bias) → BatchNorm1d → ReLU → Linear(d, proj_dim).

Permutation symmetry: the backbone's own spec (its classifier entries dropped, keys prefixed with
``backbone.``) plus one hidden group ``proj`` for the head; the head's first Linear consumes the backbone's
feature group, its output axis carries no group (the projection keeps its order), so a permutation leaves
``forward`` unchanged exactly and reorders ``features`` by the feature group (``feature_group``): norms,
cosine similarities, kNN votes and the best linear probe are unchanged. A backbone whose classifier consumes an expanded
(flattened) axis is refused (its features would not be one permutable group).

Registered as ``simclr-<backbone>`` for ``cnn``, ``mlp``, ``resnet18``, ``resnet50`` and ``preactresnet18``;
``simclr-<external>`` (``simclr-torchvision:resnet34``, ``simclr-mypkg.nets:build``) wraps any external
architecture, whose spec is derived and verified (:mod:`tscray.models.external`); the dropout right before
its classifier (torchvision's ``Dropout → Linear`` heads) is removed with it. ``num_classes`` is
accepted for the registry's signature and ignored (an encoder has no classes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tscray.models import external
from tscray.models.registry import MODELS
from tscray.symmetry.spec import Expand, PermSpec, Probe, bn_entries, linear


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear classifier to remove")
    return names[-1]


class SSLEncoder(nn.Module):
    """Backbone (a registered architecture without its classifier) + SimCLR projection head."""

    def __init__(self, backbone: str = "cnn", in_channels: int = 3, proj_dim: int = 128,
                 num_classes: int | None = None, input_hw: tuple[int, int] | None = None,
                 **backbone_kw: object) -> None:
        super().__init__()
        if proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {proj_dim}")
        if backbone.startswith("simclr"):
            raise ValueError(f"backbone must be a plain architecture, got {backbone!r}")
        self.backbone_name, self.proj_dim = backbone, proj_dim
        net: Any
        if external.is_external(backbone):  # derived spec, verified on the data's shape (input_hw)
            net = external.build(backbone, 2, in_channels, input_hw, **backbone_kw)
        else:
            net = MODELS.get(backbone)(num_classes=2, in_channels=in_channels, **backbone_kw)
        self._head_name = _last_linear(net)
        spec = net.permutation_spec()
        feat_group = spec.axes[f"{self._head_name}.weight"][1]
        if isinstance(feat_group, Expand) or feat_group is None:
            raise ValueError(f"backbone {backbone!r}: its classifier input is not one permutable group")
        self._backbone_spec, self.feature_group = spec, feat_group
        d = net.get_submodule(self._head_name).in_features
        parent, _, attr = self._head_name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        setattr(owner, attr, nn.Identity())
        if isinstance(owner, nn.Sequential):  # the classifier's own dropout right before it goes too
            names = [n for n, _ in owner.named_children()]
            for name in reversed(names[:names.index(attr)]):  # (torchvision's Dropout + Linear heads)
                if not isinstance(owner.get_submodule(name), nn.modules.dropout._DropoutNd):
                    break
                setattr(owner, name, nn.Identity())
        self.backbone = net
        self.feature_dim = d
        self.head = nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, proj_dim))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's representation (linear probes, kNN, BadEncoder)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def permutation_spec(self) -> PermSpec:
        spec, hn = self._backbone_spec, self._head_name
        axes = {f"backbone.{k}": v for k, v in spec.axes.items() if not k.startswith(f"{hn}.")}
        axes |= {"head.0.weight": ("proj", self.feature_group)} | bn_entries("head.1", "proj")
        axes |= linear("head.3", None, "proj")
        probes = {g: [Probe(f"backbone.{p.module}", p.post) for p in pl] for g, pl in spec.probes.items()}
        probes["proj"] = [Probe("head.1", "relu")]
        concat = {g: list(parts) for g, parts in spec.concat.items()}
        return PermSpec(axes=axes, probes=probes, concat=concat)


def _register(backbone: str) -> None:
    def factory(num_classes: int | None = None, in_channels: int = 3, proj_dim: int = 128,
                **kw: Any) -> SSLEncoder:
        return SSLEncoder(backbone, in_channels, proj_dim, num_classes, **kw)
    factory.__name__ = f"simclr_{backbone}"
    factory.__doc__ = f"SimCLR encoder: {backbone} backbone + projection head."
    MODELS.register(f"simclr-{backbone}")(factory)


for _b in ("cnn", "mlp", "resnet18", "resnet50", "preactresnet18"):
    _register(_b)

PREFIX = "simclr-"


def external_backbone(name: str) -> str | None:
    """The external backbone of an encoder name (``simclr-torchvision:resnet34`` → ``torchvision:resnet34``)."""
    if isinstance(name, str) and name.startswith(PREFIX) and external.is_external(name[len(PREFIX):]):
        return name[len(PREFIX):]
    return None
