"""Model architectures, one module each, with their permutation specs beside them.

``build(name, num_classes, in_channels=3, **kw)`` constructs a registered architecture. Every
model defines ``permutation_spec()`` returning a :class:`tscray.symmetry.PermSpec`.
"""

from __future__ import annotations

from torch import nn

from tscray.models.registry import MODELS
from tscray.models import cnn, mlp, preactresnet, resnet, vgg  # noqa: F401  (registration)
from tscray.models import encoder  # noqa: F401,E402  (SimCLR encoders over the architectures above)


def build(name: str, num_classes: int, in_channels: int = 3, **kw: object) -> nn.Module:
    """Construct the registered architecture ``name``."""
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kw)


def names() -> list[str]:
    """Registered architecture names."""
    return MODELS.names()


__all__ = ["MODELS", "build", "names"]
