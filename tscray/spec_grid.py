"""How a sweep's ``grid`` becomes blocks of axes: a mapping or a list of blocks, dotted field axes
(``defense.clean_ratio``, ``train.attack_kw.wanet.k``) checked as the fields they set, blocks split per
``defense.preset``, ``rounds`` and ``t`` taken from the block's defense recipe, and the union that
validation checks. :mod:`tscray.config` validates the rest of the spec and calls these.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from tscray.config import (FIELD_AXIS_SECTIONS, GRID_AXES, PRESETS, DefenseSpec, EvalSpec, Grid, SpecError,
                           SSLSpec, TrainSpec, _defense_names, _grid_checks, _section, _short, dataset_entry,
                           validate)


def grid_blocks(raw: Any, problems: list[str]) -> tuple[Grid, ...]:
    """``grid``: one mapping of axes (their product), or a list of such blocks (the union of their
    products: Table 1's attacks each at their own poison rates). Dotted keys are field axes; their values
    are checked by :func:`check_field_axes` once the rest of the spec is known."""
    if isinstance(raw, list):
        if not raw:
            problems.append("grid: empty list; give a mapping of axes or a list of them")
            return (Grid(),)
        for i, block in enumerate(raw):
            if block is None or block == {}:  # (it added a trial of every axis's default)
                problems.append(f"grid[{i}]: empty block; give at least one axis")
        blocks = tuple(_grid_block(b, f"grid[{i}]", problems) for i, b in enumerate(raw) if b not in (None, {}))
        return blocks or (Grid(),)
    return (_grid_block(raw, "grid", problems),)


def block_names(raw: Any) -> list[str]:
    """How errors name each block :func:`grid_blocks` returns (empty blocks, refused, are not among them)."""
    if isinstance(raw, list) and raw:
        return [f"grid[{i}]" for i, b in enumerate(raw) if b not in (None, {})] or ["grid"]
    return ["grid"]


def is_path(key: Any) -> bool:
    return isinstance(key, str) and "." in key


def _grid_block(raw: Any, where: str, problems: list[str]) -> Grid:
    std = {k: v for k, v in raw.items() if not is_path(k)} if isinstance(raw, dict) else raw
    grid = _section(Grid, _dataset_paths(std), where, problems, _grid_checks())
    axes = []
    for path, value in raw.items() if isinstance(raw, dict) else ():
        if not is_path(path):
            continue
        values = value if isinstance(value, list) else [value]
        if not values:
            problems.append(f"{where}.{path}: empty list; a grid axis needs at least one value")
            continue
        if len(set(map(canon_value, values))) != len(values):
            problems.append(f"{where}.{path}: duplicate values {_short(values)}")
            continue
        axes.append((path, tuple(values)))
    return dataclasses.replace(grid, field_axes=tuple(axes))


def option_owner(path: str) -> str | None:
    """``attack`` or ``arch`` where dotted ``path`` sets one attack's or architecture's options
    (``train.attack_kw.wanet.k``, ``train.arch_kw.resnet18.width``: the per-attack and per-architecture
    forms), else None."""
    parts = path.split(".")
    if len(parts) < 3 or parts[0] != "train" or parts[1] not in ("attack_kw", "arch_kw"):
        return None
    if parts[1] == "attack_kw":
        from tscray.attacks import ATTACKS
        from tscray.ssl.attacks import SSL_ATTACKS

        return "attack" if parts[2] in ATTACKS or parts[2] in SSL_ATTACKS else None
    from tscray import models
    from tscray.models import external

    return "arch" if parts[2] in models.names() or external.is_external(parts[2]) else None


def _defense_axes(name: str) -> tuple[str, ...]:
    """The grid axes (rounds, t) defense ``name`` takes; for another defense they are plain settings."""
    from tscray import defenses

    return defenses.get(name).axes


def float_axes(g: Grid) -> Grid:
    """Integers written for a float setting made floats (1 and 1.0 are one setting: one trial id, as for
    the named axes); done once the values are checked, so errors quote them as written."""
    if not g.field_axes:
        return g
    return dataclasses.replace(g, field_axes=tuple(
        (path, tuple(float(v) if type(v) is int else v for v in values) if _is_float_field(path) else values)
        for path, values in g.field_axes))


def _is_float_field(path: str) -> bool:
    """Whether dotted ``path`` names a float setting (a section field, a defense's field or optimiser knob)."""
    import typing

    from tscray.defenses.base import _optim_fields, optim_knob
    from tscray.optim import OptimConfig

    def hint(cls: type, name: str) -> Any:
        try:
            return typing.get_type_hints(cls).get(name)
        except Exception:  # an annotation that does not resolve: leave the values as written
            return None
    parts = path.split(".")
    sections = {"train": TrainSpec, "defense": DefenseSpec, "eval": EvalSpec, "ssl": SSLSpec}
    if len(parts) == 2 and parts[0] in sections:
        return hint(sections[parts[0]], parts[1]) is float
    if len(parts) != 3 or parts[0] != "defense" or parts[1] not in _defense_names():
        return False
    from tscray import defenses

    cls, key = defenses.get(parts[1]).config, parts[2]
    if key in {f.name for f in dataclasses.fields(cls)}:
        return hint(cls, key) is float
    flat = optim_knob(_optim_fields(cls), key)
    return flat is not None and hint(OptimConfig, flat[1]) is float


def canon_value(v: Any) -> str:
    """A value as the duplicate check compares it: 1 and 1.0 are one value (the field's type makes them equal)."""
    import json
    if isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    return json.dumps(v, sort_keys=True, default=repr)


def without_field_axes(raw: dict[str, Any]) -> dict[str, Any]:
    grid = raw.get("grid")

    def strip(b: Any) -> Any:
        return {k: v for k, v in b.items() if not is_path(k)} if isinstance(b, dict) else b

    if isinstance(grid, list):
        return {**raw, "grid": [strip(b) for b in grid]}
    return {**raw, "grid": strip(grid)} if "grid" in raw else dict(raw)


def _path_parts(path: str) -> list[str]:
    """A dotted path's keys; ``data_kw.<dataset>.<option>`` keeps the dataset whole, since a path to the
    user's own data has dots of its own (``data_kw./data/digits.npz.image_size``)."""
    parts = path.split(".")
    if parts[0] == "data_kw" and len(parts) > 3:
        return [parts[0], ".".join(parts[1:-1]), parts[-1]]
    return parts


def set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested mapping, creating the mappings on the way."""
    parts = _path_parts(path)
    d = raw
    for i, part in enumerate(parts[:-1]):
        nxt = d.get(part)
        if nxt is None:
            nxt = d[part] = {}
        elif not isinstance(nxt, dict):
            raise ValueError(f"{'.'.join(parts[:i + 1])} is {_short(nxt)}, not a mapping")
        d = nxt
    d[parts[-1]] = value


def _about(problem: str, path: str) -> str | None:
    """A problem of a spec with ``path`` set, as the text that follows the axis' name in the grid (None when
    it concerns another field)."""
    name, _, rest = problem.partition(": ")
    if name == path or name.startswith((path + ".", path + "[")):
        return f"{name[len(path):]}: {rest}"
    if path.startswith(name + "."):  # a section-level problem naming the field ("defense.tsc: t: ...")
        tail = path[len(name) + 1:] + ": "
        return ": " + (rest[len(tail):] if rest.startswith(tail) else rest)
    return None


def check_field_axes(raw: dict[str, Any], grids: tuple[Grid, ...], source: str, check_data: bool,
                      problems: list[str]) -> None:
    """Each value of each dotted grid axis, validated as that field of this spec: a spec with the value set
    is validated, and its problems about that field are reported at the axis (``grid.train.epochs[1]: ...``)."""
    base = without_field_axes(raw)
    base_problems: set[str] = set()
    try:
        validate(base, source, check_data)
    except SpecError as err:
        base_problems = set(err.problems)
    names = block_names(raw.get("grid"))
    for b, g in enumerate(grids):
        for path, values in g.field_axes:
            where = f"{names[b] if b < len(names) else 'grid'}.{path}"
            head = path.split(".")[0]
            if head not in FIELD_AXIS_SECTIONS or "" in _path_parts(path):
                problems.append(f"{where}: not a field axis; a dotted grid axis names a field of "
                                f"{', '.join(FIELD_AXIS_SECTIONS)} (e.g. defense.clean_ratio, train.epochs, "
                                "defense.tsc.curve_epochs)")
                continue
            parts = path.split(".")
            if (len(parts) == 3 and parts[0] == "defense" and parts[1] in _defense_names()
                    and parts[2] in (*_defense_axes(parts[1]), "seed", "eval_ts")):
                axis = {"eval_ts": "eval.curve_ts (not a grid axis)"}.get(parts[2], f"the grid axis {parts[2]}")
                problems.append(f"{where}: set through {axis}, not a field axis")
                continue
            if path == "train.method":
                problems.append(f"{where}: train.method is one per sweep (supervised and SSL trials differ in "
                                "kind); run one sweep per method")
                continue
            owner = option_owner(path)
            if owner is not None and parts[2] not in getattr(g, owner):
                kind = "attack" if owner == "attack" else "architecture"
                problems.append(f"{where}: options of {kind} {parts[2]}, which is not in this block "
                                f"({', '.join(getattr(g, owner))}): it would apply to no trial")
                continue
            if len(parts) >= 2 and parts[0] == "defense" and parts[1] not in g.defense and parts[1] in _defense_names():
                problems.append(f"{where}: a setting of {parts[1]}, which is not a defense of this block "
                                f"({', '.join(g.defense)}): it would apply to no trial")
                continue
            found: dict[str, list[int]] = {}
            for i, v in enumerate(values):
                sub = copy.deepcopy(base)
                try:
                    set_path(sub, path, v)
                except ValueError as err:
                    found.setdefault(f": {err}", []).append(i)
                    continue
                try:
                    validate(sub, source, check_data)
                except SpecError as err:
                    for p in err.problems:
                        msg = _about(p, path) if p not in base_problems else None
                        if msg is not None:
                            found.setdefault(msg, []).append(i)
            for msg, idx in found.items():
                if len(values) == 1 or len(idx) == len(values):  # the same for every value: say it once
                    problems.append(f"{where}{msg}")
                else:
                    problems.extend(f"{where}[{i}]{msg}" for i in idx)


def _dataset_paths(block: Any) -> Any:
    if not isinstance(block, dict) or "dataset" not in block:
        return block
    value = block["dataset"]
    entries = [dataset_entry(v) for v in value] if isinstance(value, list) else dataset_entry(value)
    return {**block, "dataset": entries}


def union(grids: tuple[Grid, ...]) -> Grid:
    """Every value any block uses, per axis, in first-use order (what validation checks)."""
    if len(grids) == 1:
        return grids[0]
    values = {a: list(dict.fromkeys(v for g in grids for v in getattr(g, a))) for a in GRID_AXES}
    fields: dict[str, dict[str, Any]] = {}
    for g in grids:
        for path, vs in g.field_axes:
            fields.setdefault(path, {}).update((canon_value(v), v) for v in vs)
    return Grid(**{k: tuple(v) for k, v in values.items()},
                field_axes=tuple((p, tuple(vs.values())) for p, vs in fields.items()))


def preset_axes(raw: Any, grids: tuple[Grid, ...], preset: str) -> tuple[Grid, ...]:
    """A grid block that names no ``rounds`` or ``t`` takes them from its defense's recipe under the spec's
    preset (TSC's ``small``: E_TSC 4, t 0.5; ``ssl``: 2, 0.25), not the paper's 3 and 0.4 whatever the preset
    says. The recipe is TSC's where the block has TSC, else that of the block's one defense with these axes
    (MCR: t 0.4 under ``small``, a preset it lacks, whose t 0.5 is TSC's; 0.25 under ``ssl``).

    A block sweeping ``defense.preset`` is split into one block per preset, each taking the ``rounds`` and
    ``t`` it does not name from its own preset (one shared value would run the ``small`` trials at the
    paper's E_TSC and t)."""
    from tscray import defenses

    def recipe(owner: str, name: str) -> Any:
        config = defenses.get(owner).config
        for candidate in (name, "paper"):  # (a defense without the preset runs its paper recipe)
            try:
                return config.preset(candidate)
            except (ValueError, TypeError):
                continue
        return None

    blocks = raw if isinstance(raw, list) else [raw]
    if len(blocks) != len(grids):
        return grids
    out: list[Grid] = []
    for block, g in zip(blocks, grids):
        named = set(block) if isinstance(block, dict) else set()
        with_axes = [d for d in g.defense if d != "none" and d in _defense_names() and _defense_axes(d)]
        owner = "tsc" if "tsc" in g.defense else (with_axes[0] if len(with_axes) == 1 else None)
        names = dict(g.field_axes).get("defense.preset")
        if owner is None:
            parts: list[tuple[Grid, Any]] = [(g, None)]
        elif names is None or {"rounds", "t"} <= named:
            parts = [(g, preset)]
        else:
            parts = [(dataclasses.replace(g, field_axes=tuple((k, (v,) if k == "defense.preset" else vs)
                                                              for k, vs in g.field_axes)), v) for v in names]
        for part, name in parts:
            cfg = recipe(owner, name) if owner is not None and isinstance(name, str) else None
            if cfg is None or name not in PRESETS:
                out.append(part)  # (an unknown preset: already reported)
                continue
            out.append(dataclasses.replace(
                part, rounds=g.rounds if "rounds" in named or not hasattr(cfg, "rounds") else (cfg.rounds,),
                t=g.t if "t" in named or not hasattr(cfg, "t") else (cfg.t,)))
    return tuple(out)


