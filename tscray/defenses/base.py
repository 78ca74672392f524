"""What defenses share: the defender's clean data, results, and the registry."""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, Protocol

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


ColumnType = Literal["int", "float", "string"]


class DefenseConfig(Protocol):
    """A defense's config class: a frozen dataclass with a ``preset(name)`` classmethod."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    @classmethod
    def preset(cls, name: str = ...) -> Any: ...


@dataclass(frozen=True)
class Defense:
    """A registered defense: everything the library, sweeps, results and the CLI need to know of it.

    - ``config``: a frozen dataclass with defaults and a ``preset(name)`` classmethod; ``__post_init__``
      raises ValueError naming a bad field.
    - ``run(model, clean, method, cfg, evaluate=None, log=None) -> DefenseResult``: the whole defense.
      Its records carry ``stage: "final"`` for the purified model plus any ``columns`` it declares.
    - ``axes``: sweep grid axes that set config fields (TSC: rounds, t; MCR: t).
    - ``columns``: extra result columns the defense reports (NC's flagged classes, FP's pruned count).
    - ``check_model``: raises :class:`~tscray.defenses.layers.UnsupportedModel` for a model the defense
      cannot handle, before any compute.
    - ``methods``: training methods F it supports (``supervised``, ``simclr``).
    - ``plan``: finer sweep steps (TSC's rounds, MCR's t-independent curve); None: one ``defense`` step.
    - ``version``: bumped when a change alters what the defense computes. Above 1 it is part of its steps'
      params, so stores recompute those steps, and only those (the backdoored models stay).
    """

    name: str
    config: type[DefenseConfig]
    run: Callable[..., DefenseResult]
    axes: tuple[str, ...] = ()
    columns: Mapping[str, ColumnType] = field(default_factory=dict)
    check_model: Callable[[nn.Module], None] | None = None
    methods: tuple[str, ...] = ("supervised",)
    plan: "Planner | None" = None
    summary: str = ""
    version: int = 1

    def make_config(self, preset: str = "paper", **overrides: Any) -> Any:
        """The config of ``preset`` with ``overrides``; unknown fields raise naming the field."""
        base = self.config.preset(preset)
        names = {f.name for f in dataclasses.fields(self.config)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            settable = sorted(names - {*self.axes, "seed", "eval_ts"})  # those are set by the grid and eval
            knobs = [f"{p}_lr" if p else "lr" for p in _optim_fields(self.config).values()]
            more = f", optimiser knobs ({', '.join(knobs)}, ...)" if knobs else ""
            raise ValueError(f"unknown {self.name} setting(s) {unknown}; allowed: {', '.join(settable)}{more}")
        return dataclasses.replace(base, **overrides)


DEFENSES: Registry[Defense] = Registry("defense")


def check_t(t: float, what: str = "t") -> None:
    if not 0.0 < t < 1.0:
        raise ValueError(f"{what} must be strictly between 0 and 1, got {t}")


# ------------------------------------------------------------------ configs as data

def _optim_fields(cls: type) -> dict[str, str]:
    """Optimiser fields of a config and the prefix of their flat keys (``curve_optim`` → ``curve``,
    ``optim`` → ``""``)."""
    from tscray.optim import OptimConfig

    defaults = cls.preset("paper") if hasattr(cls, "preset") else cls()
    return {f.name: f.name[: -len("optim")].rstrip("_") for f in dataclasses.fields(cls)
            if isinstance(getattr(defaults, f.name), OptimConfig)}


def optim_knob(prefixes: dict[str, str], key: str) -> tuple[str, str] | None:
    """``(optimiser field, knob)`` a flat key names (``curve_lr`` → ``("curve_optim", "lr")``), given the
    config's optimiser fields and prefixes (:func:`_optim_fields`); None for any other key."""
    for field_name, prefix in prefixes.items():
        stem = key[len(prefix) + 1:] if prefix and key.startswith(prefix + "_") else (key if not prefix else None)
        if stem in OPTIM_KEYS:
            return field_name, OPTIM_KEYS[stem]
    return None


OPTIM_KEYS = {"optimizer": "name", "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
              "schedule": "schedule", "t_max": "t_max", "l2": "l2",
              "t_max_ratio": "t_max_ratio"}


# Ranges every defense's settings obey, by field name (the name itself or its ``_``-suffix): (lower bound,
# exclusive?, upper bound or None). A config class may declare its own ``RANGES`` (a ClassVar, same form)
# for a field that departs from the rule; anything more specific goes in its __post_init__.
RANGES: dict[str, tuple[float, bool, float | None]] = {
    "batch_size": (1, False, None), "rounds": (1, False, None), "epochs": (0, False, None),
    "iterations": (0, False, None), "steps": (0, False, None), "batches": (0, False, None),
    "lr": (0, True, None), "weight_decay": (0, False, None), "l2": (0, False, None), "momentum": (0, False, 1),
    "t_max": (1, False, None), "ratio": (0, False, 1), "rate": (0, False, 1),
}


def _range_of(name: str, own: Mapping[str, tuple[float, bool, float | None]] | None = None
              ) -> tuple[float, bool, float | None] | None:
    """The range of setting ``name``: the config's own ``RANGES`` entry for it, else the shared rule."""
    if own and name in own:
        return own[name]
    for suffix, rule in RANGES.items():
        if name == suffix or name.endswith("_" + suffix):
            return rule
    return None


def _check_value(key: str, name: str, value: Any, default: Any, problems: list[str],
                 own: Mapping[str, tuple[float, bool, float | None]] | None = None) -> None:
    """One setting against the type of its preset value and the range its name implies (``key``: how the
    user wrote it, named in the message)."""
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = is_int or (isinstance(value, float) and math.isfinite(value))
    if isinstance(default, bool):
        if not isinstance(value, bool):
            problems.append(f"{key}: {shown} is not true/false")
        return
    if isinstance(default, int):
        if not is_int:
            problems.append(f"{key}: {shown} is not an integer")
            return
    elif isinstance(default, float):
        if not is_num:
            problems.append(f"{key}: {shown} is not a number")
            return
    elif isinstance(default, str):
        if not isinstance(value, str):
            problems.append(f"{key}: {shown} is not a string")
        return
    elif default is None and value is not None and _range_of(name, own) is not None and not is_num:
        problems.append(f"{key}: {shown} is not a number")
        return
    rule = _range_of(name, own)
    if rule is None or not is_num:
        return
    lo, open_lo, hi = rule
    if (value <= lo if open_lo else value < lo) or (hi is not None and value > hi):
        span = f"{'(' if open_lo else '['}{lo:g}, {'∞)' if hi is None else f'{hi:g}]'}"
        problems.append(f"{key}: {shown} is outside {span}")


def resolve_config(defense: Defense, preset: str, overrides: Mapping[str, Any], **fixed: Any) -> Any:
    """``defense``'s config: ``preset``, then ``overrides``, then ``fixed`` (grid axes, seed).

    Optimiser knobs are flat keys, ``<prefix>_<knob>``: ``curve_lr``, ``finetune_weight_decay``,
    ``curve_t_max``, ``lr`` for a config whose optimiser field is ``optim``. A nested mapping for an
    optimiser field (``curve_optim: {lr: 0.01}``) works too. Unknown names raise ValueError naming them.
    """
    base = defense.make_config(preset)
    prefixes = _optim_fields(defense.config)
    plain: dict[str, Any] = {}
    optim: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for key, value in overrides.items():
        if key in prefixes and isinstance(value, Mapping):
            nested: Mapping[str, Any] = value
            for k, v in nested.items():
                knob = OPTIM_KEYS.get(k, k)
                optim.setdefault(key, {})[knob] = v
                _check_value(f"{key}.{k}", knob, v, getattr(getattr(base, key), knob, None), problems)
            continue
        flat = optim_knob(prefixes, key)
        if flat is not None:
            field_name, knob = flat
            optim.setdefault(field_name, {})[knob] = value
            _check_value(key, knob, value, getattr(getattr(base, field_name), knob), problems)
        else:
            plain[key] = value
            if hasattr(base, key):
                _check_value(key, key, value, getattr(base, key), problems, getattr(defense.config, "RANGES", None))
    if problems:
        raise ValueError("; ".join(problems))
    for field_name, kw in optim.items():
        _clear_replaced(type(getattr(base, field_name)), kw, kw)
        try:
            plain[field_name] = dataclasses.replace(getattr(base, field_name), **kw)
        except TypeError as err:
            raise ValueError(f"{field_name}: {err}") from None
    _clear_replaced(defense.config, {**plain, **fixed}, plain)
    return defense.make_config(preset, **plain, **fixed)


def _clear_replaced(cls: type, given: Mapping[str, Any], out: dict[str, Any]) -> None:
    """A setting given replaces the preset's other way of giving the same thing (``cls.CLEARS``: setting ->
    the fields it unsets, e.g. ``curve_epochs`` -> ``curve_steps``, ``t_max`` -> ``t_max_ratio``) unless
    those are given too."""
    for key, cleared in getattr(cls, "CLEARS", {}).items():
        if key in given:
            for c in cleared:
                if c not in given:
                    out[c] = None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON-able data (what sweep steps are keyed by). While planning, one dict per config
    object, shared by its callers (who must not change it)."""
    from tscray.plan import memo_for

    return memo_for((cfg,), "config-dict", lambda: _plain(cfg))


_FIELDS: dict[type, tuple[str, ...]] = {}
_LATE: dict[type, frozenset[str]] = {}
_ATOMS = (int, float, str, bool, type(None))


def _plain(obj: Any) -> Any:
    """:func:`dataclasses.asdict`'s result (dataclasses to dicts, containers rebuilt, other values
    deep-copied) without its generic overhead: planning converts a config per seed, a million-trial
    sweep tens of thousands."""
    t = type(obj)
    if t in _ATOMS:
        return obj
    names = _FIELDS.get(t)
    if names is None and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = _FIELDS[t] = tuple(f.name for f in dataclasses.fields(obj))
        _LATE[t] = frozenset(getattr(t, "LATE_FIELDS", ()))
    if names is not None:
        late = _LATE[t]
        if not late:
            return {n: _plain(getattr(obj, n)) for n in names}
        # fields added after results were stored: absent while unset, so older steps keep their keys
        return {n: _plain(v) for n in names if (v := getattr(obj, n)) is not None or n not in late}
    if t is list or t is tuple:
        return t(_plain(v) for v in obj)
    if t is dict:
        return {_plain(k): _plain(v) for k, v in obj.items()}
    # asdict's rules for the rest: namedtuples, container subclasses, defaultdicts
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return t(*[_plain(v) for v in obj])
    if isinstance(obj, (list, tuple)):
        return t(_plain(v) for v in obj)
    if isinstance(obj, dict):
        if isinstance(obj, collections.defaultdict):
            out = t(obj.default_factory)
            for k, v in obj.items():
                out[_plain(k)] = _plain(v)
            return out
        return t((_plain(k), _plain(v)) for k, v in obj.items())
    return copy.deepcopy(obj)


def config_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """The inverse of :func:`config_to_dict`: nested dataclasses rebuilt, lists back to tuples."""
    defaults = cls.preset("paper") if hasattr(cls, "preset") else cls()
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value, default = d[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            value = config_from_dict(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kw[f.name] = value
    return cls(**kw)


# ------------------------------------------------------------------ sweep planning

@dataclass(frozen=True)
class Planner:
    """How a defense splits into sweep steps, when one ``defense`` step would lose reuse.

    ``plan(base, axes, backdoor, common)`` returns ``(stages, final)``: the chain of
    :class:`tscray.plan.Stage` after the backdoor step and the :class:`tscray.plan.Final` output.
    ``base`` is the resolved config without the trial's grid axes, ``axes`` their values (they override
    ``base``'s fields: ``dataclasses.replace(base, **axes)`` is the trial's config); ``common`` holds the
    clean-set keys every step carries (``clean_ratio``, ``clean_seed``, ``curve_ts``), read-only. Both
    ``base`` and ``common`` are one object for many trials, so a planner can cache per object
    (:func:`tscray.plan.memo_for`), as large grids need. ``kinds`` maps each step kind it plans to
    ``fn(step, ctx) -> (tensors, records)``; ``curve_kinds`` are the kinds that fit one curve each (for the
    plan's curve-fit count).
    """

    plan: Callable[..., Any]
    kinds: Mapping[str, Callable[..., Any]]
    curve_kinds: tuple[str, ...] = ()
