"""Sweep specs: YAML → validated :class:`SweepSpec`, checked in full before anything runs.

Every problem is reported at once, each naming its field (``grid.t[2]: 1.5 is outside (0, 1)``),
through :class:`SpecError`; the CLI turns that into exit code 2 and writes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


GRID_AXES = ("dataset", "arch", "attack", "poison_rate", "seed", "defense", "rounds", "t")
# Sections whose fields can also be grid axes, by dotted path (``defense.clean_ratio``, ``train.epochs``,
# ``defense.tsc.curve_epochs``, ``data_kw.cifar10.train_per_class``): they change what a trial computes.
FIELD_AXIS_SECTIONS = ("train", "defense", "ssl", "data_kw")
# Grid axes that set a defense's config fields; a defense declares which it uses (Defense.axes).
DEFENSE_AXES = ("rounds", "t")
REAL_DATA = ("cifar10", "gtsrb", "svhn", "stl10", "imagenet100")
SWEEP_METHODS = ("supervised", "simclr")


class SpecError(ValueError):
    """A sweep spec with one or more problems; ``problems`` lists them, each naming a field."""

    def __init__(self, problems: list[str], source: str = "sweep spec") -> None:
        # a backstop for values quoted in full somewhere: no problem line runs past 300 characters
        self.problems = [p if len(p) <= 300 else p[:297] + "..." for p in problems]
        problems = self.problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Grid:
    """The axes of the ablation matrix; every trial is one point of their product."""

    dataset: tuple[str, ...] = ("fashion-mnist-embedded",)
    arch: tuple[str, ...] = ("cnn",)
    attack: tuple[str, ...] = ("badnets",)
    poison_rate: tuple[float, ...] = (0.1,)
    seed: tuple[int, ...] = (0,)
    defense: tuple[str, ...] = ("tsc",)
    rounds: tuple[int, ...] = (3,)
    t: tuple[float, ...] = (0.4,)
    field_axes: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # dotted spec fields as axes: (path, values)

    def to_dict(self) -> dict[str, Any]:
        """The block as written in YAML (field axes under their dotted paths)."""
        out: dict[str, Any] = {a: list(getattr(self, a)) for a in GRID_AXES}
        out.update({path: list(values) for path, values in self.field_axes})
        return out


@dataclass(frozen=True)
class TrainSpec:
    """The attacker's training recipe."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    arch_kw: dict[str, Any] = field(default_factory=dict)
    attack_kw: dict[str, Any] = field(default_factory=dict)
    target: int = 0
    method: str = "supervised"
    method_kw: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "sgd"


def attack_kw_for(train: "TrainSpec", attack: str) -> dict[str, Any]:
    """Options of one attack: ``train.attack_kw`` is either one mapping for every attack of the grid, or a
    mapping from attack names to their own options (``{wanet: {k: 4}, lc: {steps: 10}}``)."""
    kw = train.attack_kw
    if kw and all(isinstance(v, dict) for v in kw.values()) and set(kw) <= set(_all_attack_names()):
        return dict(kw.get(attack, {}))
    return dict(kw)


def arch_kw_for(train: "TrainSpec", arch: str) -> dict[str, Any]:
    """Options of one architecture: ``train.arch_kw`` is either one mapping for every architecture of the
    grid, or a mapping from architecture names to their own options (``{cnn: {widths: [...]},
    "torchvision:mobilenet_v2": {width_mult: 0.25}}``)."""
    from tscray import models
    from tscray.models import external

    kw = train.arch_kw
    if kw and all(isinstance(v, dict) for v in kw.values()) and \
            all(k in models.names() or external.is_external(k) for k in kw):
        return dict(kw.get(arch, {}))
    return dict(kw)


def _all_attack_names() -> list[str]:
    from tscray import attacks
    from tscray.ssl.attacks import SSL_ATTACKS
    return sorted(attacks.ATTACKS.names() + SSL_ATTACKS.names())


@dataclass(frozen=True)
class SSLSpec:
    """Self-supervised sweeps (``train.method: simclr``): the downstream task that measures an encoder.

    ``train`` is then the SimCLR pre-training recipe, the grid's attacks are SSL attacks (badencoder,
    ctrl) and architectures are encoders (``simclr-cnn``, ``simclr-resnet18``...). ACC/ASR are a linear
    probe's on ``downstream`` (default: the pre-training dataset), trained on its training split.
    """

    downstream: str = ""
    probe_epochs: int = 100
    probe_lr: float = 0.01
    probe_batch_size: int = 256
    knn_k: int = 200


@dataclass(frozen=True)
class DefenseSpec:
    """Defense recipe: a preset, the defender's clean subset, and per-defense overrides of config fields
    (``defense: {tsc: {curve_epochs: 100}, nc: {...}}``), resolved once at validation into typed configs."""

    preset: str = "paper"
    clean_ratio: float = 0.05
    clean_seed: int = 0
    clean_balanced: bool = False  # a class-balanced clean subset instead of a uniformly random one
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def config(self, name: str, **fixed: Any) -> Any:
        """Defense ``name``'s resolved config with ``fixed`` fields (grid axes, seed) set."""
        from tscray import defenses
        from tscray.defenses.base import resolve_config

        if name not in self.configs:
            return resolve_config(defenses.get(name), self.preset, self.overrides.get(name, {}), **fixed)
        return dataclasses.replace(self.configs[name], **fixed)

    def to_dict(self) -> dict[str, Any]:
        """The section as written in YAML (overrides under each defense's name)."""
        return {"preset": self.preset, "clean_ratio": self.clean_ratio, "clean_seed": self.clean_seed,
                **({"clean_balanced": True} if self.clean_balanced else {}), **{k: dict(v) for k, v in self.overrides.items()}}


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation settings: t values along each curve (Figure 3); batch size."""

    curve_ts: tuple[float, ...] = ()
    batch_size: int = 512


@dataclass(frozen=True)
class Resources:
    """Per-step resources. ``workers: 0`` means as many as the cluster holds."""

    gpus_per_step: float = 0.0
    cpus_per_step: int = 1
    threads: int = 1
    workers: int = 0
    max_concurrent_trials: int = 8
    precision: str = "auto"
    channels_last: str = "auto"  # auto: on CUDA only; on: also on CPU (faster there for small conv nets); off
    max_failures: int = 2
    step_retries: int = 2
    memory_gb_per_step: float = 2.0  # what Ray reserves per shard worker (0: declare nothing)
    memory_gb_per_trial: float = 0.25  # per light Tune trial
    # torch threads per step kind (e.g. {backdoor: 2}: the model every trial waits for gets the cores); such a
    # step holds ceil(n / threads) workers of the pool while it runs, so no core is oversubscribed
    step_threads: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    grid: Grid = field(default_factory=Grid)
    grids: tuple[Grid, ...] = ()
    train: TrainSpec = field(default_factory=TrainSpec)
    defense: DefenseSpec = field(default_factory=DefenseSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    ssl: SSLSpec = field(default_factory=SSLSpec)
    resources: Resources = field(default_factory=Resources)
    storage: str = "runs/{name}"
    mlflow_uri: str | None = None
    data_root: str | None = None
    data_kw: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the validated document without the grid's field axes: what :meth:`with_fields` sets them in
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def with_fields(self, values: dict[str, Any]) -> "SweepSpec":
        """This spec with dotted fields set (one grid point's field axes), validated like the spec itself
        (the values were checked, data included, when the sweep was validated)."""
        from tscray import spec_grid

        raw = copy.deepcopy(self.source)
        for path, value in values.items():
            spec_grid.set_path(raw, path, value)
        return validate(raw, "grid point", check_data=False)

    def storage_path(self, override: str | None = None) -> str:
        """The sweep's storage: a URI as given, or an absolute local path."""
        raw = override or self.storage.format(name=self.name)
        return raw if "://" in raw else str(Path(raw).expanduser().resolve())

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        out = {k: (v.to_dict() if isinstance(v, (DefenseSpec, Grid)) else dataclasses.asdict(v)
                   if dataclasses.is_dataclass(v) and not isinstance(v, type) else v) for k, v in d.items()}
        del out["grids"]
        if self.grids:  # the blocks as written: validating this again gives the same trials, not their union's
            out["grid"] = [g.to_dict() for g in self.grids]
        return out


# ---------------------------------------------------------------- validation

Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _names(known: Callable[[], list[str]], what: str) -> Check:
    def check(v: Any) -> str | None:
        names = known()
        if not isinstance(v, str):
            return f"{_short(v)} is not a {what} name (a string); allowed: {', '.join(names)}"
        return None if v in names else f"unknown {what} {_short(v)}; allowed: {', '.join(names)}"
    return check


def _arch_check(v: Any) -> str | None:
    """A registered architecture, or an importable external builder (``torchvision:NAME``, ``pkg.mod:fn``)."""
    from tscray import models
    from tscray.models import encoder, external

    if isinstance(v, str) and external.is_external(v):
        try:
            external.builder(encoder.external_backbone(v) or v)
        except external.ArchError as err:
            return str(err)
        return None
    return _names(models.names, "architecture")(v)


def _range(lo: float, hi: float, lo_open: bool, hi_open: bool, integer: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if not (_is_int(v) if integer else _is_num(v)):
            return f"{_short(v)} is not {'an integer' if integer else 'a number'}"
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if ok:
            return None
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        hi_s = "∞" if hi == math.inf else (f"{hi:,}" if isinstance(hi, int) and hi >= 10**6 else f"{hi:g}")
        return f"{_short(v)} is outside {lb}{lo:g}, {hi_s}{rb}"
    return check


PRESETS = ("paper", "released", "small", "ssl")  # defense.preset's values
MAX_SEED = 2**32 - 1  # numpy's and every seeded generator's range (2**64 passed, then torch overflowed mid-run)
MAX_ROUNDS = 1000  # planning makes a step per round: 10**20 rounds were accepted, then ate all memory


def _grid_checks() -> dict[str, Check]:

    return {
        "dataset": _dataset_check,
        "arch": _arch_check,
        "attack": _names(_all_attack_names, "attack"),
        "poison_rate": _range(0, 1, False, False),
        "seed": _range(0, MAX_SEED, False, False, integer=True),
        "defense": _names(_defense_names, "defense"),
        "rounds": _range(1, MAX_ROUNDS, False, False, integer=True),
        "t": _range(0, 1, True, True),
    }


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields a YAML section may set (not the ones validation fills in)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in ("field_axes", "source", "grids")}


def _check_scalar(path: str, value: Any, default: Any, problems: list[str]) -> Any:
    """Type-check a scalar against the type of its default; returns the (coerced) value."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            problems.append(f"{path}: {_short(value)} is not true/false")
    elif isinstance(default, int):
        if not _is_int(value):
            problems.append(f"{path}: {_short(value)} is not an integer")
    elif isinstance(default, float):
        if not _is_num(value):
            problems.append(f"{path}: {_short(value)} is not a number")
        else:
            value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            problems.append(f"{path}: {_short(value)} is not a string")
    elif isinstance(default, dict):
        if not isinstance(value, dict):
            problems.append(f"{path}: {_short(value)} is not a mapping")
    return value


def _step_threads(v: Any) -> str | None:
    """``resources.step_threads``: known step kinds mapped to thread counts >= 1."""
    from tscray.steps import kinds

    known = sorted(kinds())
    for kind, n in v.items():
        if kind not in known:
            return f"unknown step kind {_short(kind)}; allowed: {', '.join(known)}"
        if not _is_int(n) or n < 1:
            return f"{kind}: {_short(n)} is not an integer >= 1"
    return None


def _section(cls: type, raw: Any, path: str, problems: list[str],
             checks: dict[str, Check] | None = None) -> Any:
    """Build dataclass ``cls`` from ``raw``, collecting problems (unknown keys, types, ranges)."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"{path}: expected a mapping, got {type(raw).__name__}")
        return cls()
    fields = _fields(cls)
    defaults = cls()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in fields:
            problems.append(f"{where}: unknown key; allowed: {', '.join(fields)}")
            continue
        default = getattr(defaults, key)
        if isinstance(default, tuple):
            items = value if isinstance(value, list) else [value]
            if not items and cls is Grid:
                problems.append(f"{where}: empty list; a grid axis needs at least one value")
                continue
            out = []
            for i, item in enumerate(items):
                msg = checks[key](item) if checks and key in checks else None
                if msg:
                    problems.append(f"{where}[{i}]: {msg}" if isinstance(value, list) else f"{where}: {msg}")
                    continue  # a bad value (maybe unhashable) never reaches the later checks
                out.append(float(item) if isinstance(item, int) and not isinstance(item, bool)
                           and key in ("poison_rate", "t", "curve_ts") else item)
            if len(set(map(repr, out))) != len(out):
                problems.append(f"{where}: duplicate values {_short(items)}")
            values[key] = tuple(out)
        elif value is None and key in ("mlflow_uri", "data_root"):
            values[key] = None
        else:
            n = len(problems)
            values[key] = _check_scalar(where, value, default, problems)
            if checks and key in checks and values[key] is not None and len(problems) == n:
                msg = checks[key](value)
                if msg:
                    problems.append(f"{where}: {msg}")
    try:
        return dataclasses.replace(defaults, **values)
    except (TypeError, ValueError) as err:
        problems.append(f"{path}: {err}")
        return defaults


def dataset_entry(value: Any) -> Any:
    """A grid ``dataset`` value as the name trials carry: a registered name as is; the user's own data
    (``{path: ...}`` or a string that is a path) as its absolute path, so every worker reads the same file."""
    from tscray.data import DATASETS, custom

    if isinstance(value, dict) and list(value) == ["path"] and isinstance(value["path"], str) and value["path"]:
        value = value["path"]
        if value in DATASETS:  # {path: cifar10} means a file or folder called cifar10
            return str(Path(value).expanduser().resolve())
    if isinstance(value, str) and value.strip() and value not in DATASETS and custom.is_path(value):
        return str(Path(value).expanduser().resolve())  # ("" named the current folder)
    return value


def _dataset_check(v: Any) -> str | None:
    """A registered dataset name or a path to the user's own data (read and checked by ``_check_data``)."""
    from tscray.data import DATASETS

    if isinstance(v, str) and (v in DATASETS or Path(v).is_absolute()):
        return None
    if isinstance(v, dict) and list(v) == ["path"]:
        return f"{_short(v)}: path must be a non-empty string (an .npz file or an image folder)"
    if isinstance(v, dict):
        return (f"{_short(v)}: a dataset mapping takes one key, path (an .npz file or an image folder)")
    return (f"unknown dataset {_short(v)}; allowed: {', '.join(DATASETS.names())}, or a path to your own data "
            "(an .npz file or an image folder)")


def _defense_names() -> list[str]:
    from tscray import defenses
    return [*defenses.DEFENSES.names(), "none"]


def _defense_section(raw: Any, grid: Grid, problems: list[str]) -> DefenseSpec:
    """``defense``: preset, clean subset, and one mapping of overrides per registered defense."""
    from tscray import defenses

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"defense: expected a mapping, got {type(raw).__name__}")
        return DefenseSpec()
    scalars = ("preset", "clean_ratio", "clean_seed", "clean_balanced")
    for key in raw:
        if key not in scalars and key not in defenses.DEFENSES:
            problems.append(f"defense.{str(key)[:40]}: unknown key; allowed: {', '.join(scalars)}, and one "
                            f"mapping of settings per defense ({', '.join(defenses.DEFENSES.names())})")
    spec = _section(DefenseSpec, {k: v for k, v in raw.items() if k in scalars}, "defense",
                    problems, {"preset": _names(lambda: list(PRESETS), "preset"),
                               "clean_ratio": _range(0, 1, True, False),
                               "clean_seed": _range(0, MAX_SEED, False, False, integer=True)})
    overrides: dict[str, dict[str, Any]] = {}
    configs: dict[str, Any] = {}
    for name in defenses.DEFENSES.names():
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            problems.append(f"defense.{name}: expected a mapping of settings, got {_short(value)}")
            continue
        d = defenses.get(name)
        value = dict(value or {})
        reserved = {*d.axes, "eval_ts", "seed"}
        for key in sorted(reserved & set(value)):
            where = "eval.curve_ts" if key == "eval_ts" else f"the grid axis {key}"
            problems.append(f"defense.{name}.{key}: set through {where}, not here")
            value.pop(key)
        overrides[name] = value
        if name not in grid.defense and not value:
            continue
        try:
            configs[name] = _resolve(d, spec.preset, value)
        except (ValueError, TypeError) as err:
            problems.append(f"defense.{name}: {err}")
    overrides = {k: v for k, v in overrides.items() if v}
    return dataclasses.replace(spec, overrides=overrides, configs=configs)


def _resolve(d: Any, preset: str, overrides: dict[str, Any]) -> Any:
    """A defense's config from a preset and overrides (which may name a preset the defense lacks: then
    the defense's ``paper`` preset stands in, as for defenses without an SSL recipe)."""
    from tscray.defenses.base import resolve_config

    try:
        d.config.preset(preset)
    except ValueError:
        preset = "paper"
    return resolve_config(d, preset, overrides)


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error never prints a whole document."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(raw: Any, source: str = "sweep spec", check_data: bool = True) -> SweepSpec:
    """Validate a parsed YAML document and return the spec; raise :class:`SpecError` listing every problem."""
    from tscray import spec_grid

    problems: list[str] = []
    if not isinstance(raw, dict):
        raise SpecError([f"top level: expected a mapping of sections, got {type(raw).__name__}"], source)
    top = _fields(SweepSpec)
    for key in raw:
        if key not in top:
            problems.append(f"{key}: unknown key; allowed: {', '.join(top)}")
    name = raw.get("name")
    if (not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\ ")
            or not name.isprintable()):
        problems.append(f"name: {_short(name)} must be a non-empty string without spaces, slashes or control "
                        "characters, and not . or .. (it names the default storage folder)")
        name = "invalid"
    grids = spec_grid.grid_blocks(raw.get("grid"), problems)
    grid = spec_grid.union(grids)
    train = _section(TrainSpec, raw.get("train"), "train", problems, {
        "epochs": _range(0, math.inf, False, True, integer=True),
        "batch_size": _range(1, math.inf, False, True, integer=True),
        "lr": _range(0, math.inf, True, True), "target": _range(0, math.inf, False, True, integer=True),
        "momentum": _range(0, math.inf, False, True), "weight_decay": _range(0, math.inf, False, True),
        "method": _names(lambda: list(SWEEP_METHODS), "training method"),
        "optimizer": _names(lambda: ["sgd", "adam"], "optimizer")})
    raw_ssl = raw.get("ssl")
    if isinstance(raw_ssl, dict) and "downstream" in raw_ssl:
        raw_ssl = {**raw_ssl, "downstream": dataset_entry(raw_ssl["downstream"])}
    ssl = _section(SSLSpec, raw_ssl, "ssl", problems, {
        "downstream": lambda v: None if v == "" else _dataset_check(v),
        "probe_epochs": _range(1, math.inf, False, True, integer=True), "probe_lr": _range(0, math.inf, True, True),
        "probe_batch_size": _range(1, math.inf, False, True, integer=True),
        "knn_k": _range(1, math.inf, False, True, integer=True)})
    defense = _defense_section(raw.get("defense"), grid, problems)
    given, grids = grids, spec_grid.preset_axes(raw.get("grid"), grids, defense.preset)
    grid = spec_grid.union(grids)
    ev = _section(EvalSpec, raw.get("eval"), "eval", problems, {"curve_ts": _range(0, 1, False, False),
                                                                  "batch_size": _range(1, math.inf, False, True, integer=True)})
    raw_res = raw.get("resources")
    if isinstance(raw_res, dict) and isinstance(raw_res.get("channels_last"), bool):
        # true/false, its old values (true was the default: NHWC on CUDA only). YAML 1.1 also reads an unquoted
        # on/off as true/false, so "on" must be quoted
        raw_res = {**raw_res, "channels_last": "auto" if raw_res["channels_last"] else "off"}
    res = _section(Resources, raw_res, "resources", problems, {
        "gpus_per_step": _range(0, math.inf, False, True), "cpus_per_step": _range(1, math.inf, False, True, True),
        "threads": _range(1, math.inf, False, True, True), "workers": _range(0, math.inf, False, True, True),
        "max_concurrent_trials": _range(1, math.inf, False, True, True),
        "precision": _names(lambda: ["auto", "fp32", "bf16"], "precision"),
        "channels_last": _names(lambda: ["auto", "on", "off"], "channels_last"),
        "max_failures": _range(0, math.inf, False, True, True), "step_retries": _range(0, math.inf, False, True, True),
        "memory_gb_per_step": _range(0, math.inf, False, True), "memory_gb_per_trial": _range(0, math.inf, False, True),
        "step_threads": _step_threads})
    scalars = {}
    for key in ("storage", "mlflow_uri", "data_root"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            problems.append(f"{key}: {_short(raw[key])} is not a string")
        elif key in raw:
            scalars[key] = raw[key]
    if isinstance(scalars.get("storage"), str):
        _check_storage(scalars["storage"], name if isinstance(name, str) else "", problems)
    if isinstance(scalars.get("mlflow_uri"), str):
        from tscray.tracking import mlflow_uri_problem

        if (why := mlflow_uri_problem(scalars["mlflow_uri"])) is not None:
            problems.append(f"mlflow_uri: {why}")
    data_kw = _check_data_kw(raw.get("data_kw"), grid, ssl, problems)
    blocks = list(zip(spec_grid.block_names(raw.get("grid")), given))  # (named as written)
    if not problems:
        _check_method(blocks, grid, train, raw, problems)
        _check_defenses(blocks, train, problems)
    if any(g.field_axes for g in given):
        spec_grid.check_field_axes(raw, given, source, check_data, problems)  # (as written: blocks not split by preset)
        grids = tuple(spec_grid.float_axes(g) for g in grids)
        grid = spec_grid.union(grids)
    spec = SweepSpec(name=name, grid=grid, grids=grids if len(grids) > 1 else (), train=train, defense=defense, eval=ev, ssl=ssl, resources=res,
                     data_kw=data_kw, source=spec_grid.without_field_axes(raw), **scalars)
    if check_data and not problems:
        _check_data(spec, blocks, problems)
    if not problems:
        _check_arch_kw(spec, problems)
    if check_data and not problems:
        _check_external_archs(spec, problems)
    if problems:
        raise SpecError(problems, source)
    return spec


MAX_IMAGE_SIZE = 4096  # a larger side is a typo, not an image a classifier here trains on (4096² × 3 bytes each)
DATA_KW = {"image_size": int, "download": bool, "train_per_class": int, "test_per_class": int, "workers": int,
           "cache_dir": str, "test_ratio": float, "split_seed": int, "mean": list, "std": list}


def _check_storage(raw: str, name: str, problems: list[str]) -> None:
    """``storage``: its only placeholder is ``{name}``; a local path must not run through a file."""
    try:
        path = raw.format(name=name)
    except (KeyError, IndexError, ValueError) as err:
        problems.append(f"storage: {_short(raw)} has a bad placeholder ({type(err).__name__}: {_short(str(err))}); "
                        "the only placeholder is {name}")
        return
    if not path.strip():
        problems.append("storage: empty path")
        return
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if not rest.strip("/"):
            problems.append(f"storage: {_short(path)} names no bucket or folder after {scheme}://")
        return
    p = Path(path).expanduser().absolute()
    for parent in (p, *p.parents):
        if parent.exists():
            if not parent.is_dir():
                problems.append(f"storage: {_short(path)} runs through {parent}, which is a file, not a folder")
            break


def _check_data_kw(raw: Any, grid: Grid, ssl: SSLSpec, problems: list[str]) -> dict[str, dict[str, Any]]:
    """``data_kw``: per dataset of the sweep, its load options (``image_size``, ``download``...)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"data_kw: expected a mapping of dataset name to options, got {type(raw).__name__}")
        return {}
    used = {*grid.dataset, ssl.downstream} - {""}
    out: dict[str, dict[str, Any]] = {}
    for name, kw in raw.items():
        name = dataset_entry(name)
        if name not in used:
            problems.append(f"data_kw.{name}: not a dataset of this sweep ({', '.join(sorted(used))})")
            continue
        if not isinstance(kw, dict):
            problems.append(f"data_kw.{name}: expected a mapping of options, got {_short(kw)}")
            continue
        problems += data_options_problems(name, kw, f"data_kw.{name}.")
        out[name] = dict(kw)
    return out


def data_options_problems(name: str, kw: dict[str, Any], prefix: str) -> list[str]:
    """What is wrong with dataset ``name``'s load options ``kw`` (sweeps' ``data_kw``, the CLI's ``--data-kw``),
    each problem prefixed with where the option was written."""
    accepted = _loader_options(name)
    problems = []
    for key, value in kw.items():
        want = DATA_KW.get(key)
        if want is None or key not in accepted:
            problems.append(f"{prefix}{key}: unknown option; {name} accepts: {', '.join(accepted)}")
        elif want is int and key == "split_seed" and (not _is_int(value) or not 0 <= value < 2**63):
            problems.append(f"{prefix}{key}: {_short(value)} is not a non-negative integer")
        elif want is int and key == "image_size" and (not _is_int(value) or not 1 <= value <= MAX_IMAGE_SIZE):
            problems.append(f"{prefix}{key}: {_short(value)} is not an integer in 1..{MAX_IMAGE_SIZE}")
        elif want is int and key not in ("split_seed", "image_size") and (not _is_int(value) or value < 1):
            problems.append(f"{prefix}{key}: {_short(value)} is not a positive integer")
        elif want is float and (not _is_num(value) or not 0 < value < 1):
            problems.append(f"{prefix}{key}: {_short(value)} is not a number in (0, 1)")
        elif want is list and (not isinstance(value, list) or not value or not all(map(_is_num, value))):
            problems.append(f"{prefix}{key}: {_short(value)} is not a list of finite numbers, one per channel")
        elif key == "std" and not all(v > 0 for v in value):
            problems.append(f"{prefix}{key}: {_short(value)} must be positive")
        elif want is bool and not isinstance(value, bool):
            problems.append(f"{prefix}{key}: {_short(value)} is not true/false")
        elif want is str and (not isinstance(value, str) or not value):
            problems.append(f"{prefix}{key}: {_short(value)} is not a non-empty path")
    return problems


def _loader_options(name: str) -> list[str]:
    import inspect

    from tscray import data
    from tscray.data import custom
    try:
        loader = custom.load_path if name not in data.DATASETS and custom.is_path(name) else data.DATASETS.get(name)
        params = inspect.signature(loader).parameters
    except KeyError:
        return []
    return [k for k in params if k in DATA_KW]


def _check_method(blocks: list[tuple[str, Grid]], grid: Grid, train: TrainSpec, raw: dict[str, Any],
                  problems: list[str]) -> None:
    """Attacks and architectures must fit the training method (classifiers vs self-supervised encoders);
    each is named at its block and position."""
    from tscray import attacks
    from tscray.ssl.attacks import SSL_ATTACKS

    ssl = train.method != "supervised"
    allowed = SSL_ATTACKS.names() if ssl else attacks.ATTACKS.names()
    for where, g in blocks:
        for i, a in enumerate(g.attack):
            if a not in allowed:
                kind = "self-supervised" if ssl else "supervised"
                problems.append(f"{where}.attack[{i}]: {a!r} is not a {kind} attack (train.method: {train.method}); "
                                f"allowed: {', '.join(allowed)}")
        for i, a in enumerate(g.arch):
            if ssl != a.startswith("simclr-"):
                want = "an encoder (simclr-<backbone>)" if ssl else "a classifier (not simclr-*)"
                problems.append(f"{where}.arch[{i}]: {a!r} is not {want} for train.method: {train.method}")
    if not ssl and raw.get("ssl") is not None:
        problems.append("ssl: applies only with train.method: simclr")
    _check_method_kw(train, problems)
    registry = SSL_ATTACKS if ssl else attacks.ATTACKS
    for a in grid.attack:
        if a in allowed:
            try:
                registry.get(a)(**attack_kw_for(train, a))
            except (TypeError, ValueError, OSError) as err:  # (OSError: a trigger or pattern file not found)
                problems.append(f"train.attack_kw: attack {a!r}: {err}")


def _check_method_kw(train: TrainSpec, problems: list[str]) -> None:
    """``train.method_kw`` builds the method as a worker will (an unknown option or a temperature of -5 had
    passed the dry run and errored every trial, "run the same command again to retry"); supervised sweeps
    read none (their options were silently dropped)."""
    from tscray import methods

    if not train.method_kw:
        return
    if train.method == "supervised":
        problems.append(f"train.method_kw: supervised training takes no options here, got "
                        f"{', '.join(map(str, train.method_kw))}")
        return
    kw = dict(train.method_kw)
    if train.method == "simclr":  # (the worker adds the dataset's normalisation)
        kw = {"mean": (0.5,), "std": (0.5,), **kw}
    try:
        methods.build(train.method, **kw)
    except (TypeError, ValueError) as err:
        problems.append(f"train.method_kw: method {train.method!r}: {err}")


def _check_defenses(blocks: list[tuple[str, Grid]], train: TrainSpec, problems: list[str]) -> None:
    """Every defense of a block supports the training method and every architecture of that block (a
    defense is not paired with another block's architectures: no trial does that)."""
    from tscray import defenses, models
    from tscray.defenses.layers import UnsupportedModel

    built: dict[str, Any] = {}  # one model per architecture, however many blocks name it
    for where, g in blocks:
        for i, name in enumerate(g.defense):
            if name == "none":
                continue
            d = defenses.get(name)
            if train.method not in d.methods:
                problems.append(f"{where}.defense[{i}]: {name} does not support train.method: {train.method} "
                                f"(it supports {', '.join(d.methods)})")
                continue
            if d.check_model is None:
                continue
            for arch in g.arch:
                try:
                    if arch not in built:
                        built[arch] = models.build(arch, 10, 3, **arch_kw_for(train, arch))
                except (TypeError, ValueError):
                    continue  # reported by the architecture's own check
                model = built[arch]
                try:
                    d.check_model(model)
                except UnsupportedModel as err:
                    problems.append(f"{where}.defense[{i}]: {name} cannot purify arch {arch!r}: {err}")


def _check_data(spec: SweepSpec, blocks: list[tuple[str, Grid]], problems: list[str]) -> None:
    """Datasets read from disk need an existing data root; the user's own data is read and checked now, so
    a bad file fails here and not after compute started (named at the first block and position using it)."""
    from tscray import data
    from tscray.data import data_root

    where: dict[str, str] = {}
    for block, g in blocks:
        for i, d in enumerate(g.dataset):
            where.setdefault(d, f"{block}.dataset[{i}]")
    where.setdefault(spec.ssl.downstream, "ssl.downstream")
    counts: dict[str, int | None] = {}
    labels: dict[str, Any] = {}  # training labels of the user's data (read here anyway)
    for name in dict.fromkeys((*spec.grid.dataset, spec.ssl.downstream)):
        if name and name not in data.DATASETS:
            try:
                ds = data.load(name, **spec.data_kw.get(name, {}))
                counts[name], labels[name] = ds.num_classes, ds.train.y
            except (ValueError, TypeError, FileNotFoundError) as err:
                problems.append(f"{where.get(name, 'grid.dataset')}: {err}")
        elif name:
            counts[name] = data.declared_classes(name)
    # the target is a class of the labelled data: the grid's datasets, or an SSL sweep's downstream task
    labelled = [spec.ssl.downstream or d for d in spec.grid.dataset] if spec.train.method != "supervised" \
        else list(spec.grid.dataset)
    for name in dict.fromkeys(labelled):
        n = counts.get(name)
        if n is not None and spec.train.target >= n:
            problems.append(f"train.target: {spec.train.target} is not a class of {name} (its classes are 0..{n - 1})")
    if spec.train.method == "supervised" and labels and not problems:
        _check_rates(spec, blocks, labels, problems)

    needs = [d for d in (*spec.grid.dataset, spec.ssl.downstream) if d in REAL_DATA]
    if not needs:
        return
    root = data_root(spec.data_root)
    if root is None:
        problems.append(f"data_root: datasets {needs} read from a local root; set data_root or $TSCRAY_DATA")
    elif not root.is_dir():
        problems.append(f"data_root: {root} does not exist or is not a directory (needed by {needs})")


def _check_rates(spec: SweepSpec, blocks: list[tuple[str, Grid]], labels: dict[str, Any],
                 problems: list[str]) -> None:
    """Every poison rate fits the images its attack may poison on the user's data (a clean-label attack: the
    target class's), so that an impossible rate fails here and not on a worker after the attack's resource
    was computed."""
    import torch

    from tscray import attacks

    found: dict[str, None] = {}
    built: dict[str, Any] = {}  # one attack per name, whatever the blocks and datasets
    for block, g in blocks:
        targets = next((vs for path, vs in g.field_axes if path == "train.target"), (spec.train.target,))
        for d in g.dataset:
            if d not in labels:
                continue
            y = torch.as_tensor(labels[d])
            per = torch.bincount(y).tolist()
            for a in g.attack:
                if a not in built:
                    try:
                        built[a] = attacks.build(a, **attack_kw_for(spec.train, a))
                    except (TypeError, ValueError, OSError, KeyError):
                        built[a] = None  # (named by _check_method)
                atk = built[a]
                if atk is None:
                    continue
                for i, rate in enumerate(g.poison_rate):
                    for target in targets:
                        if not isinstance(target, int) or not 0 <= target < len(per):
                            continue
                        eligible = per[target] if atk.clean_label else len(y) - per[target]
                        why = atk.rate_problem(rate, len(y), eligible, target)
                        if why is not None:
                            found[f"{block}.poison_rate[{i}]: on {d}, {why}"] = None
    problems.extend(found)


def _check_arch_kw(spec: SweepSpec, problems: list[str]) -> None:
    """Every registered architecture of the grid must accept its ``train.arch_kw`` (one mapping for all, or
    one per architecture)."""
    from tscray import models
    from tscray.models import external

    for arch in spec.grid.arch:
        if external.is_external(arch):
            continue  # built per dataset by _check_external_archs
        try:
            models.build(arch, 10, 3, **arch_kw_for(spec.train, arch))
        except (TypeError, ValueError) as err:
            problems.append(f"train.arch_kw: architecture {arch!r} does not take {_short(arch_kw_for(spec.train, arch))}: "
                            f"{str(err)[:200]}")


def _check_external_archs(spec: SweepSpec, problems: list[str]) -> None:
    """An external architecture is built for every dataset of the grid and its derived permutation spec
    verified now, so a model TSC cannot permute fails here and not after its backdoor was trained."""
    from tscray import data, models
    from tscray.models import external
    from tscray.symmetry.derive import DeriveError, SpecMismatch

    archs = [a for a in spec.grid.arch if external.is_external(a)]
    for name in dict.fromkeys(spec.grid.dataset) if archs else ():
        try:
            ds = data.load(name, **spec.data_kw.get(name, {}))
        except (ValueError, TypeError, FileNotFoundError):
            continue  # the dataset's own check reports it
        for arch in archs:
            try:
                models.build(arch, ds.num_classes, ds.in_channels, input_hw=ds.input_hw,
                             **arch_kw_for(spec.train, arch))
            except (external.ArchError, DeriveError, SpecMismatch, TypeError, ValueError) as err:
                problems.append(f"grid.arch: {arch!r} on {name}: {err}")


def load_spec(path: str | Path, check_data: bool = True) -> SweepSpec:
    """Read and validate a sweep YAML file."""
    path = Path(path)
    if path.is_dir() or not path.exists():  # (a pipe, such as <(cat spec.yaml), is read like a file)
        raise SpecError([f"file: {path} is a folder, not a YAML file" if path.is_dir() else f"file: {path} does not exist"],
                        str(path))
    from tscray import spec_yaml

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError([f"file: {path} is unreadable ({err})"], str(path)) from None
    try:
        raw = spec_yaml.load(text, str(path))
    except spec_yaml.SpecYAMLError as err:
        raise SpecError([str(err)], str(path)) from None
    if raw is None:
        raise SpecError([f"file: {path} is empty (nothing but blanks or comments)"], str(path))
    return validate(raw, str(path), check_data)
