"""Model architectures, one module each, with their permutation specs beside them.

``build(name, num_classes, in_channels=3, **kw)`` constructs a registered architecture, or an external
one named ``torchvision:NAME`` / ``package.module:builder`` (:mod:`tscray.models.external`). Every model
has ``permutation_spec()`` returning a :class:`tscray.symmetry.PermSpec`: written beside the registered
definitions, derived from the graph and verified for external ones.
"""

from __future__ import annotations

from torch import nn

from tscray.models.registry import MODELS
from tscray.models import cnn, mlp, preactresnet, resnet, vgg  # noqa: F401  (registration)
from tscray.models import encoder  # noqa: F401,E402  (SimCLR encoders over the architectures above)
from tscray.models import external


def build(name: str, num_classes: int, in_channels: int = 3, input_hw: tuple[int, int] | None = None,
          **kw: object) -> nn.Module:
    """Construct architecture ``name``; ``input_hw`` (the data's image size) is needed only to derive an
    external architecture's spec (registered ones ignore it)."""
    backbone = encoder.external_backbone(name)
    if backbone is not None:
        return encoder.SSLEncoder(backbone, in_channels, num_classes=num_classes, input_hw=input_hw, **kw)  # type: ignore[arg-type]  # backbone options
    if external.is_external(name):
        return external.build(name, num_classes, in_channels, input_hw, **kw)
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kw)


def names() -> list[str]:
    """Registered architecture names."""
    return MODELS.names()


__all__ = ["MODELS", "build", "names"]
