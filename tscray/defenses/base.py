"""What defenses share: the defender's clean data, results, and the registry."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from tscray.curves import BezierCurve
from tscray.data.tensors import ImageData, Loader, Preprocess
from tscray.registry import Registry

Log = Callable[[str], None]
Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class CleanData:
    """The defender's small clean set and how to batch it."""

    data: ImageData
    prep: Preprocess
    device: torch.device | str = "cpu"

    def loader(self, batch_size: int, seed: int, shuffle: bool = True, augment: bool = True) -> Loader:
        """Augmented batches of the clean set (shuffled for training; fixed order for matching)."""
        return Loader(self.data, self.prep, batch_size, shuffle=shuffle, augment=augment, seed=seed,
                      device=self.device)


@dataclass
class DefenseResult:
    """The purified model, every round's output (``outputs[r-1]`` is what an E = r run returns),
    the model taken at each stage (``points[(round, stage)]``, e.g. ``(1, "stage1")`` is θt), and
    one record per evaluated model (round, stage, t of the point, t along the curve)."""

    model: nn.Module
    outputs: list[nn.Module] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    points: dict[tuple[int, str], nn.Module] = field(default_factory=dict)


def evaluate_curve(curve: BezierCurve, ts: Iterable[float], bn_loader: Iterable, evaluate: Evaluate,
                   **tags: Any) -> list[dict[str, Any]]:
    """ACC/ASR of the points at ``ts`` along a curve (Figure 3), one record each."""
    rows = []
    for t in ts:
        point = curve.point(t, bn_loader)
        rows.append({**tags, "t_curve": float(t), **evaluate(point)})
    return rows


@dataclass(frozen=True)
class Defense:
    """A registered defense: its config type (with presets) and its run function."""

    name: str
    config: type
    run: Callable[..., DefenseResult]

    def make_config(self, preset: str = "paper", **overrides: Any) -> Any:
        """The config of ``preset`` with ``overrides``; unknown fields raise naming the field."""
        base = self.config.preset(preset)
        names = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown {self.name} setting(s) {unknown}; allowed: {sorted(names)}")
        return dataclasses.replace(base, **overrides)


DEFENSES: Registry[Defense] = Registry("defense")


def check_t(t: float, what: str = "t") -> None:
    if not 0.0 < t < 1.0:
        raise ValueError(f"{what} must be strictly between 0 and 1, got {t}")
