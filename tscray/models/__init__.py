"""Model architectures, one module each, with their permutation specs beside them.

``build(name, num_classes, in_channels=3, **kw)`` constructs a registered architecture, or an external
one named ``torchvision:NAME`` / ``package.module:builder`` (:mod:`tscray.models.external`). Every model
has ``permutation_spec()`` returning a :class:`tscray.symmetry.PermSpec`: written beside the registered
definitions, derived from the graph and verified for external ones.
"""

from __future__ import annotations

import functools
import typing
from typing import Any

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
    builder = MODELS.get(name)
    _check_options(builder, kw)
    return builder(num_classes=num_classes, in_channels=in_channels, **kw)


@functools.lru_cache(maxsize=None)
def _hints(builder: Any) -> dict[str, Any]:
    """The builder's parameter annotations, resolved once per builder ({} where one does not resolve: the
    builder then checks its own options)."""
    try:
        target = builder.__init__ if isinstance(builder, type) else builder  # type: ignore[misc]
        return typing.get_type_hints(target)
    except Exception:
        return {}


def _check_options(builder: Any, kw: dict[str, object]) -> None:
    """Options of the types the builder declares (``widths: {'0': 8}`` reached a conv as a channel count
    ``'0'`` and failed inside torch with 'not all arguments converted during string formatting')."""
    hints = _hints(builder)
    for key, value in kw.items():
        hint = hints.get(key)
        if hint is int and (type(value) is not int):
            raise ValueError(f"option {key!r} must be an integer, got {value!r}"[:200])
        if hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"option {key!r} must be a number, got {value!r}"[:200])
        if hint == tuple[int, ...] and (not isinstance(value, (list, tuple)) or not value
                                        or any(type(v) is not int or v < 1 for v in value)):
            raise ValueError(f"option {key!r} must be a non-empty list of positive integers, got {value!r}"[:200])


def names() -> list[str]:
    """Registered architecture names."""
    return MODELS.names()


__all__ = ["MODELS", "build", "names"]
