"""From a validated sweep to trials and a graph of content-keyed steps.

A step is keyed by a hash of its kind, its parameters and its inputs' keys, so equal work has
equal keys wherever it appears: trials with E_TSC = 1, 2, 3 share rounds, trials differing only
in t share round 1's first curve (γ1 does not depend on t), and every defense of one backdoored
model shares it. The plan is pure data; :mod:`tscray.steps` computes steps and
:mod:`tscray.cluster` schedules them.

Planning is linear in trials: while :func:`make_plan` runs, equal steps are one object (their key is
hashed once), stages and backdoor steps are shared, resolved defense configs are reused, and a nested
dict already serialised (a defense's config) is not serialised again (:func:`memo`).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

from tscray.config import SweepSpec, arch_kw_for, attack_kw_for

# Bump when a step's computation changes meaning, so old artifacts are not reused for it.
STEP_VERSION = 1


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class _Memo:
    """Caches that live while one plan is made."""

    def __init__(self) -> None:
        self.values: dict[Any, Any] = {}
        self.json: dict[int, tuple[Any, str]] = {}  # id(dict) -> (the dict, kept alive; its JSON)


_ACTIVE: _Memo | None = None


def memo(key: Any, make: Any) -> Any:
    """``make()``, computed once per ``key`` while a plan is being made (always computed otherwise)."""
    m = _ACTIVE
    if m is None:
        return make()
    try:
        return m.values[key]
    except KeyError:
        value = m.values[key] = make()
        return value


def _canon(obj: Any) -> str:
    """Canonical JSON (sorted keys, no spaces). While planning, a dict value seen before is not serialised
    again: the output is byte-identical to ``json.dumps(obj, sort_keys=True, separators=(",", ":"))``."""
    m = _ACTIVE
    if m is None or not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        return _dumps(obj)
    parts = []
    for k in sorted(obj):
        v = obj[k]
        if isinstance(v, (dict, list)):
            hit = m.json.get(id(v))
            if hit is None or hit[0] is not v:
                hit = m.json[id(v)] = (v, _canon(v) if isinstance(v, dict) else _dumps(v))
            text = hit[1]
        else:
            text = _scalar(v)
        parts.append(f"{_STR(k)}:{text}")
    return "{" + ",".join(parts) + "}"


_STR = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _scalar(v: Any) -> str:
    """``json.dumps(v)`` for the scalar types step params hold, without the encoder's overhead."""
    t = type(v)
    if t is str:
        return _STR(v)
    if t is bool:
        return "true" if v else "false"
    if t is int:
        return int.__repr__(v)
    if t is float and v == v and v not in (float("inf"), float("-inf")):
        return float.__repr__(v)
    if v is None:
        return "null"
    return _dumps(v)


@dataclass(frozen=True)
class Step:
    """One unit of work: ``kind`` with JSON-able ``params`` applied to the outputs of ``inputs``."""

    kind: str
    params_json: str
    inputs: tuple["Step", ...] = ()

    @staticmethod
    def make(kind: str, params: dict[str, Any], inputs: tuple["Step", ...] = ()) -> "Step":
        """The step; while planning, an equal step made before is returned (one object per key)."""
        params_json = _canon(params)
        if _ACTIVE is None:
            return Step(kind, params_json, inputs)
        return memo(("step", kind, params_json, tuple(i.key for i in inputs)), lambda: Step(kind, params_json, inputs))

    @cached_property
    def ancestors(self) -> tuple["Step", ...]:
        """This step and all its ancestors, inputs first, each once (computed once per step)."""
        seen: dict[str, Step] = {}
        for i in self.inputs:
            for a in i.ancestors:
                seen.setdefault(a.key, a)
        seen.setdefault(self.key, self)
        return tuple(seen.values())

    @cached_property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @cached_property
    def key(self) -> str:
        h = hashlib.sha256(_canon([STEP_VERSION, self.kind, self.params_json, [i.key for i in self.inputs]]).encode())
        return h.hexdigest()[:24]

    def walk(self) -> Iterator["Step"]:
        """This step and all its ancestors, inputs first, each once."""
        return iter(self.ancestors)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params_json, "inputs": [i.to_dict() for i in self.inputs]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Step":
        return Step(d["kind"], d["params"], tuple(Step.from_dict(i) for i in d["inputs"]))


@dataclass(frozen=True)
class Stage:
    """A step of a trial's chain: its round, and the record stages whose ACC/ASR the trial reports to Tune
    once the step is done (in preference order; empty: nothing to report)."""

    step: Step
    round: int
    report: tuple[str, ...] = ()


@dataclass(frozen=True)
class Final:
    """A trial's output model: the step and artifact holding it, and the record stages (in preference
    order) that evaluated it."""

    key: str
    artifact: str
    stages: tuple[str, ...] = ("final",)


@dataclass(frozen=True)
class Trial:
    """One grid point: its parameters, its chain of steps, its output model, and the defense's resolved
    settings (JSON; recorded in every result row, not part of the id)."""

    params: dict[str, Any]
    chain: tuple[Stage, ...]
    final: Final = Final("", "")
    settings: str = "{}"

    @cached_property
    def id(self) -> str:
        return hashlib.sha256(_canon(self.params).encode()).hexdigest()[:12]

    @property
    def steps(self) -> list[Step]:
        return [s.step for s in self.chain]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (what travels in a Tune config)."""
        return {"id": self.id, "params": self.params, "settings": self.settings,
                "final": [self.final.key, self.final.artifact, list(self.final.stages)],
                "chain": [{"step": s.step.to_dict(), "round": s.round, "report": list(s.report)}
                          for s in self.chain]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Trial":
        key, artifact, stages = d["final"]
        chain = tuple(Stage(Step.from_dict(s["step"]), s["round"], tuple(s.get("report", ()))) for s in d["chain"])
        return Trial(d["params"], chain, Final(key, artifact, tuple(stages)), d.get("settings", "{}"))


def root_step(step: Step) -> Step:
    """The backdoor step at the root of ``step``'s graph (defense steps take it as their first input)."""
    s = step
    while s.kind != "backdoor":
        s = s.inputs[0]
    return s


def root_params(step: Step) -> dict[str, Any]:
    """Parameters of the backdoor step at the root of ``step``'s graph (dataset, arch, attack...)."""
    return root_step(step).params


def _applies(path: str, defense: str) -> bool:
    """Whether dotted field axis ``path`` changes a trial of ``defense``: ``defense.<name>.*`` only that
    defense's, other ``defense.*`` fields every defense's (not an undefended model's), the rest every trial."""
    from tscray.defenses import DEFENSES

    parts = path.split(".")
    if parts[0] != "defense":
        return True
    if len(parts) > 2 and parts[1] in DEFENSES:
        return defense == parts[1]
    return defense != "none"


def relevant(point: dict[str, Any]) -> dict[str, Any]:
    """Drop grid axes that do not apply to the point's defense (those it does not declare, and field axes
    of other defenses), so equal trials collapse."""
    from tscray.config import DEFENSE_AXES
    from tscray.defenses import DEFENSES

    name = point["defense"]
    used = DEFENSES.get(name).axes if name != "none" else ()
    return {k: v for k, v in point.items()
            if ("." in k and _applies(k, name)) or ("." not in k and (k not in DEFENSE_AXES or k in used))}


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Distinct grid points (irrelevant axes dropped), in grid order; field axes (``defense.clean_ratio``)
    follow the named axes, under their dotted paths."""
    from tscray.config import DEFENSE_AXES, GRID_AXES
    from tscray.defenses import DEFENSES

    method = spec.train.method
    seen: set[Any] = set()
    out = []
    for g in spec.grids or (spec.grid,):
        names = (*GRID_AXES, *(path for path, _ in g.field_axes))
        di = names.index("defense")
        drop: dict[str, tuple[int, ...]] = {}  # defense -> positions of the axes that do not apply to it
        for combo in itertools.product(*[getattr(g, a) for a in GRID_AXES], *[vs for _, vs in g.field_axes]):
            d = combo[di]
            if d not in drop:
                used = DEFENSES.get(d).axes if d != "none" else ()
                drop[d] = tuple(i for i, a in enumerate(names) if (a in DEFENSE_AXES and a not in used)
                                or ("." in a and not _applies(a, d)))
            gone = drop[d]
            kept = tuple((a, v) for i, (a, v) in enumerate(zip(names, combo)) if i not in gone)
            k: Any = kept
            try:
                if k in seen:
                    continue
                seen.add(k)
            except TypeError:  # an unhashable value (a dataset or a field axis given as a mapping)
                k = _dumps(kept)
                if k in seen:
                    continue
                seen.add(k)
            p = dict(kept)
            if method != "supervised":  # (supervised trials keep the ids they always had)
                p["method"] = method
            out.append(p)
    return out


def _with_data_kw(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Add the dataset's load options (``data_kw``) to a root step's params, only when it has some (so
    keys of sweeps without options are unchanged)."""
    kw = spec.data_kw.get(params["dataset"])
    return {**params, "data_kw": kw} if kw else params


def resource_step(spec: SweepSpec, p: dict[str, Any]) -> Step | None:
    """The attack's precomputed resource (surrogate, generator, trigger...), if it needs one.

    Keyed by what the attack says it depends on, so models that differ in architecture, epochs or
    (for most attacks) poison rate share it.
    """
    from tscray import attacks

    kw = attack_kw_for(spec.train, p["attack"])
    params = attacks.build(p["attack"], **kw).resource_params(p["poison_rate"])
    if params is None:
        return None
    return Step.make("attack_resource", _with_data_kw(spec, {
        "dataset": p["dataset"], "attack": p["attack"], "attack_kw": kw,
        "target": spec.train.target, "seed": p["seed"], "rate": p["poison_rate"] if "rate" in params else None,
        "resource": params}))


def pretrain_step(spec: SweepSpec, p: dict[str, Any]) -> Step:
    """A clean self-supervised encoder: what BadEncoder fine-tunes, shared by every such trial of a seed."""
    tr = spec.train
    return Step.make("ssl_pretrain", _with_data_kw(spec, {
        "dataset": p["dataset"], "arch": p["arch"], "arch_kw": arch_kw_for(tr, p["arch"]), "seed": p["seed"], "method": tr.method,
        "method_kw": tr.method_kw, "epochs": tr.epochs, "batch_size": tr.batch_size, "lr": tr.lr,
        "weight_decay": tr.weight_decay, "optimizer": tr.optimizer}))


def ssl_backdoor_step(spec: SweepSpec, p: dict[str, Any]) -> Step:
    """A backdoored encoder (BadEncoder on the clean encoder, or CTRL's poisoned pre-training)."""
    from tscray.ssl import attacks as ssl_attacks

    tr = spec.train
    pre = pretrain_step(spec, p)
    kw = attack_kw_for(tr, p["attack"])
    atk = ssl_attacks.build(p["attack"], **kw)
    params = {**pre.params, "attack": p["attack"], "attack_kw": kw, "poison_rate": p["poison_rate"],
              "target": tr.target, "ssl": {**dataclasses.asdict(spec.ssl),
                                                        "downstream_kw": spec.data_kw.get(spec.ssl.downstream, {})}}
    return Step.make("backdoor", params, (pre,) if atk.needs_clean_encoder else ())


def backdoor_step(spec: SweepSpec, p: dict[str, Any]) -> Step:
    tr = spec.train
    if tr.method != "supervised":
        return ssl_backdoor_step(spec, p)
    res = resource_step(spec, p)
    return Step.make("backdoor", _with_data_kw(spec, {
        "dataset": p["dataset"], "arch": p["arch"], "arch_kw": arch_kw_for(tr, p["arch"]), "attack": p["attack"],
        "attack_kw": attack_kw_for(tr, p["attack"]), "poison_rate": p["poison_rate"], "target": tr.target,
        "seed": p["seed"],
        "epochs": tr.epochs, "batch_size": tr.batch_size, "lr": tr.lr, "momentum": tr.momentum,
        "weight_decay": tr.weight_decay}), (res,) if res is not None else ())


def _clean(spec: SweepSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"clean_ratio": spec.defense.clean_ratio, "clean_seed": spec.defense.clean_seed}
    if spec.defense.clean_balanced:  # (only when set, so keys of other sweeps are unchanged)
        out["clean_balanced"] = True
    return out


def plan_trial(spec: SweepSpec, p: dict[str, Any]) -> Trial:
    """The chain of steps one grid point needs: the backdoored model, then its defense's steps (one
    ``defense`` step running the whole defense, or the finer steps its :class:`Planner` declares)."""
    from tscray.defenses import DEFENSES
    from tscray.defenses.base import config_to_dict

    fields = {k: v for k, v in p.items() if "." in k}
    variant = _dumps(fields) if fields else ""  # the point's field axes: its own spec, its own caches
    if fields:
        whole = spec
        spec = memo(("spec", variant), lambda: whole.with_fields(fields))
    root = tuple(p.get(a) for a in ("dataset", "arch", "attack", "poison_rate", "seed", "method"))
    try:
        bd = memo(("backdoor", root, variant), lambda: backdoor_step(spec, p))
    except TypeError:  # an unhashable dataset entry: no sharing, same result
        bd = backdoor_step(spec, p)
    first = memo(("stage0", bd.key), lambda: Stage(bd, 0, ("backdoored",)))
    name = p["defense"]
    if name == "none":
        return Trial(p, (first,), memo(("final0", bd.key), lambda: Final(bd.key, "model", ("backdoored",))))
    d = DEFENSES.get(name)
    axes = {a: p[a] for a in d.axes}

    def resolve() -> tuple[Any, dict[str, Any], str]:
        # the grid axes are top-level scalar fields: resolve once per (defense, seed), then replace them
        base, base_dict = memo(("config", name, p["seed"], variant), lambda: (
            lambda c: (c, config_to_dict(c)))(spec.defense.config(name, seed=p["seed"])))
        cfg = dataclasses.replace(base, **axes) if axes else base
        as_dict = {**base_dict, **axes}
        return cfg, as_dict, _canon(as_dict)
    cfg, cfg_dict, settings = memo(("config", name, p["seed"], tuple(axes.items()), variant), resolve)
    if d.plan is not None:
        common = memo(("common", variant), lambda: {**_clean(spec), "curve_ts": list(spec.eval.curve_ts)})
        stages, final = d.plan.plan(cfg, bd, dict(common))
    else:
        step = Step.make("defense", {"defense": name, "config": cfg_dict, **_clean(spec)}, (bd,))
        stages, final = [Stage(step, 1, ("final",))], Final(step.key, "model", ("final",))
    chain = (first, *(memo(("stage", s.step.key, s.round, s.report), lambda s=s: s) for s in stages))
    final = memo(("final", final.key, final.artifact, final.stages), lambda: final)
    return Trial(p, chain, final, settings)


@dataclass
class Plan:
    """All trials of a sweep and the distinct steps they need."""

    spec: SweepSpec
    trials: list[Trial] = field(default_factory=list)

    @cached_property
    def steps(self) -> dict[str, Step]:
        out: dict[str, Step] = {}
        seen: set[int] = set()  # stages are shared between trials: walk each once
        for trial in self.trials:
            for stage in trial.chain:
                if id(stage) in seen:
                    continue
                seen.add(id(stage))
                for a in stage.step.ancestors:
                    out.setdefault(a.key, a)
        return out

    def count_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.steps.values():
            counts[s.kind] = counts.get(s.kind, 0) + 1
        return counts

    def naive_count_by_kind(self) -> dict[str, int]:
        """Steps a per-trial run without reuse would execute (every trial computes its whole chain)."""
        counts: dict[str, int] = {}
        by_chain: dict[tuple[int, ...], dict[str, int]] = {}  # chains are shared objects: count each once
        for trial in self.trials:
            ident = tuple(id(s) for s in trial.chain)
            per = by_chain.get(ident)
            if per is None:
                needed: dict[str, Step] = {}
                for s in trial.steps:
                    for a in s.ancestors:
                        needed.setdefault(a.key, a)
                per = {}
                for a in needed.values():
                    per[a.kind] = per.get(a.kind, 0) + 1
                by_chain[ident] = per
            for kind, n in per.items():
                counts[kind] = counts.get(kind, 0) + n
        return counts

    @staticmethod
    def curve_fits(counts: dict[str, int]) -> int:
        """Curve fits among step counts: the step kinds that defenses declare as fitting one curve each."""
        from tscray.defenses import DEFENSES

        kinds = {k for d in DEFENSES.values() if d.plan is not None for k in d.plan.curve_kinds}
        return sum(n for k, n in counts.items() if k in kinds)


def make_plan(spec: SweepSpec) -> Plan:
    """Plan every grid point of the sweep (linear in trials: see the module docstring)."""
    global _ACTIVE
    outer, _ACTIVE = _ACTIVE, _Memo()
    collect = gc.isenabled()
    gc.disable()  # planning allocates millions of acyclic objects: generational passes made it superlinear
    try:
        return Plan(spec, [plan_trial(spec, p) for p in grid_points(spec)])
    finally:
        _ACTIVE = outer
        if collect:
            gc.enable()
