"""Where a defense finds the layers it works on, read from the model's permutation spec and graph.

Defenses must accept any registered architecture, so none of them names a module: the classifier is
the 2-D weight whose output axis the spec leaves unpermuted, its input axis is the feature group
(Fine-Pruning's channels, FST's head), BatchNorm layers are found by type (ANP), and attention
layers are the last outputs at each spatial resolution (NAD). A model without the layer a defense
needs is refused with :class:`UnsupportedModel` naming what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tscray.data.tensors import Preprocess
from tscray.nnutil import eval_mode
from tscray.symmetry.permute import spec_of
from tscray.symmetry.spec import Expand


class UnsupportedModel(ValueError):
    """The model lacks a layer the defense needs (e.g. ANP on a model without BatchNorm)."""


@dataclass(frozen=True)
class Classifier:
    """The output layer: its module path, the module, and how its input axis maps to feature units.

    ``repeat`` is 1 when each input entry is one unit (pooled features) and k when the input is a
    flattened map of ``units`` channels × k positions laid out unit-major.
    """

    name: str
    module: nn.Linear
    units: int
    repeat: int

    def unit_columns(self, units: torch.Tensor) -> torch.Tensor:
        """Input columns of the classifier that belong to feature ``units``."""
        units = torch.as_tensor(units, dtype=torch.long)
        offsets = torch.arange(self.repeat)
        return (units[:, None] * self.repeat + offsets[None, :]).reshape(-1)


def classifier(model: nn.Module) -> Classifier:
    """The model's classifier: the last Linear whose output axis its permutation spec leaves unpermuted."""
    try:
        spec = spec_of(model)
    except (AttributeError, TypeError) as err:
        raise UnsupportedModel(f"{type(model).__name__} has no permutation spec to locate its classifier") from err
    modules = dict(model.named_modules())
    found: Classifier | None = None
    for key, axes in spec.axes.items():
        if not key.endswith(".weight") or len(axes) != 2 or axes[0] is not None:
            continue
        name = key[: -len(".weight")]
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            continue
        ax = axes[1]
        repeat = ax.repeat if isinstance(ax, Expand) else 1
        found = Classifier(name, module, module.in_features // repeat, repeat)
    if found is None:
        raise UnsupportedModel(f"{type(model).__name__}: no Linear output layer with an unpermuted output axis")
    return found


def batchnorms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm layer with affine parameters, in module order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


def require_batchnorm(model: nn.Module, defense: str) -> None:
    """Refuse models without affine BatchNorm layers."""
    if not batchnorms(model):
        raise UnsupportedModel(f"{defense} needs BatchNorm layers; {type(model).__name__} has none")


@torch.no_grad()
def stage_outputs(model: nn.Module, example: torch.Tensor, count: int = 3) -> list[str]:
    """Module paths of the model's last ``count`` stage outputs: for each spatial resolution of its 4-D
    activations, the outermost module that produces the last one (``layer2``/``layer3``/``layer4`` of a
    ResNet, not the next block's pre-activation BatchNorm; the last BatchNorm before each pooling of a
    plain CNN). 1×1 maps (global pools: their normalised attention is constant) and maps larger than
    one already seen (VGG's adaptive pool upsampling a small input) are skipped. NAD distils attention
    at these layers."""
    order: list[tuple[str, tuple[int, int]]] = []
    handles = []
    for name, module in model.named_modules():
        if name == "":
            continue

        def hook(_m: nn.Module, _inp: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                order.append((name, (out.shape[2], out.shape[3])))
        handles.append(module.register_forward_hook(hook))
    try:
        with eval_mode(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    best: dict[tuple[int, int], tuple[int, int, str]] = {}  # size -> (depth, position, name)
    smallest: int | None = None
    for pos, (name, size) in enumerate(order):
        area = size[0] * size[1]
        if area <= 1 or (smallest is not None and area > smallest):
            continue
        smallest = area if smallest is None else min(smallest, area)
        depth = name.count(".")
        if size not in best or depth <= best[size][0]:  # the latest among the outermost modules
            best[size] = (depth, pos, name)
    names = [name for _, _, name in sorted(best.values(), key=lambda v: v[1])]
    if not names:
        raise UnsupportedModel(f"{type(model).__name__} has no 4-D (convolutional) activations")
    return names[-count:]


def input_bounds(prep: Preprocess, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) of valid normalised inputs, shaped (1, C, 1, 1): pixels 0 and 1 after
    normalisation. Trigger reconstructions and adversarial perturbations stay inside them."""
    mean = torch.tensor(prep.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(prep.std, device=device).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std
