"""From a validated sweep to trials and a graph of content-keyed steps.

A step is keyed by a hash of its kind, its parameters and its inputs' keys, so equal work has
equal keys wherever it appears: trials with E_TSC = 1, 2, 3 share rounds, trials differing only
in t share round 1's first curve (γ1 does not depend on t), and every defense of one backdoored
model shares it. The plan is pure data; :mod:`tscray.steps` computes steps and
:mod:`tscray.cluster` schedules them.

Planning is linear in trials: while :func:`make_plan` runs, equal steps are one object (their key is
hashed once), stages and backdoor steps are shared, a defense's config is resolved and serialised once
per (defense, seed) and shared by its steps (``Step.make(..., base=)``), and planners cache per object
(:func:`memo`, :func:`memo_for`). No set of grid points is kept (:func:`iter_points`).

``--dry-run`` needs only counts: :func:`summarize` plans trial by trial, grouped by backdoored model,
and drops each group's caches and trials when the group ends, so its memory is one group's steps plus
the set of distinct step keys (0.3 GB for a million trials over 2 forked workers, where keeping them
took 3-4 GB; benchmarks/plan_scale.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Collection, Iterator, Mapping

from tscray.config import SweepSpec, arch_kw_for, attack_kw_for

# Bump when a step's computation changes meaning, so old artifacts are not reused for it.
STEP_VERSION = 1


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def _dumps(obj: Any) -> str:
    """Canonical JSON: ``json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)``."""
    return _ENCODER.encode(obj)


class _Memo:
    """Caches that live while one plan is made. ``lasting``: value-keyed ones a streaming summary keeps
    when it drops the others between groups of points (see :func:`memo_lasting`)."""

    def __init__(self, lasting: dict[Any, Any] | None = None) -> None:
        self.values: dict[Any, Any] = {}
        self.json: dict[int, tuple[Any, str]] = {}  # id(dict) -> (the dict, kept alive; its JSON)
        self.lasting: dict[Any, Any] = {} if lasting is None else lasting


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


def memo_lasting(key: Any, make: Any) -> Any:
    """:func:`memo` for small values keyed by value (not identity) that every group of a streaming summary
    needs again, such as an attack's resource parameters: kept for the whole plan (called once per group,
    not per trial, so it need not be as lean as :func:`memo`)."""
    m = _ACTIVE
    if m is None:
        return make()
    if key not in m.lasting:
        m.lasting[key] = make()
    return m.lasting[key]


def memo_for(objs: tuple[Any, ...], tag: str, make: Any) -> Any:
    """``make()``, computed once per tuple of objects ``objs`` (by identity) while a plan is being made.
    The cache keeps the objects alive, so their ids are not reused while it lives."""
    m = _ACTIVE
    if m is None:
        return make()
    key = (tag, *map(id, objs))
    try:
        return m.values[key][1]
    except KeyError:
        hit = m.values[key] = (objs, make())
        return hit[1]


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
_INF = float("inf")


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


class _lazy:
    """A cached attribute without :class:`functools.cached_property`'s per-instance lock (planning reads
    millions of them once each)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.name = fn, fn.__name__
        self.__doc__ = fn.__doc__

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


def _fragment(k: str, v: Any) -> tuple[str, str]:
    """``(k, '"k":json(v)')``: one piece of a dict's canonical JSON."""
    t = type(v)
    if t is str:
        return k, f"{_STR(k)}:{_STR(v)}"
    if t is int:
        return k, f"{_STR(k)}:{int.__repr__(v)}"
    if t is dict:
        return k, f"{_STR(k)}:{_canon(v)}"
    return k, f"{_STR(k)}:{_scalar(v) if t is not list and t is not tuple else _dumps(v)}"


def _base_fragments(base: dict[str, Any]) -> list[tuple[str, str]] | None:
    """``base``'s canonical JSON pieces ``(key, '"key":json')`` in key order, made once per object while
    planning (None when a key is not a string)."""
    return memo_for((base,), "fragments", lambda: sorted(_fragment(k, v) for k, v in base.items())
                    if all(type(k) is str for k in base) else None)


def _canon_over(base: dict[str, Any], own: dict[str, Any]) -> str:
    """``_canon({**base, **own})``, with ``base``'s pieces made once per object while planning."""
    frags = _base_fragments(base)
    if frags is None:
        return _canon({**base, **own})
    if own:
        try:
            extra = [_fragment(k, v) for k, v in own.items()]
        except TypeError:  # a key that is not a string
            return _canon({**base, **own})
        frags = [f for f in frags if f[0] not in own] + extra
        frags.sort()
    return "{" + ",".join([f for _, f in frags]) + "}"


class _Template:
    """A step kind's params over one ``base`` dict with a fixed set of own keys, precomputed: the canonical
    JSON's constant pieces between the own keys' slots, and the key's SHA-256 state after the constant text
    that leads it. Making such a step then serialises and hashes only the few bytes its own values add
    (a sweep step's base holds its defense's whole config, about 0.5 KB)."""

    def __init__(self, kind: str, base: list[tuple[str, str]], own: tuple[str, ...]) -> None:
        frag = dict(base)
        names = sorted({*frag, *own})
        self.own = tuple(k for k in names if k in own)  # in the order their slots come
        self.quoted = tuple(_STR(k) + ":" for k in self.own)
        self.parts: list[str | None] = []  # constant text, or None for the next own key's fragment
        run: list[str] = []
        for k in names:
            if k in own:
                if run:
                    self.parts.append(",".join(run))
                    run = []
                self.parts.append(None)
            else:
                run.append(frag[k])
        if run:
            self.parts.append(",".join(run))
        lead = self.parts[0] if self.parts and self.parts[0] is not None else ""
        self.lead = "{" + lead + ("," if lead and len(self.parts) > 1 else "")
        self.state = hashlib.sha256(f"[{STEP_VERSION},{_STR(kind)},{_STR(self.lead)[:-1]}".encode())

    def make(self, own: dict[str, Any], inputs: tuple["Step", ...]) -> tuple[str, str]:
        """``(params_json, key)`` of the step with ``own`` values over the base."""
        frags, n = [], 0
        for part in self.parts:
            if part is None:
                k = self.own[n]
                v = own[k]
                t = type(v)
                if t is int:
                    frags.append(self.quoted[n] + int.__repr__(v))
                elif t is str:
                    frags.append(self.quoted[n] + _STR(v))
                elif t is float and -_INF < v < _INF:
                    frags.append(self.quoted[n] + float.__repr__(v))
                else:
                    frags.append(_fragment(k, v)[1])
                n += 1
            else:
                frags.append(part)
        text = "{" + ",".join(frags) + "}"
        h = self.state.copy()
        keys = '"' + '","'.join([s.key for s in inputs]) + '"' if inputs else ""  # hex: nothing to escape
        h.update((_STR(text[len(self.lead):])[1:] + ",[" + keys + "]]").encode())
        return text, h.hexdigest()[:24]


@dataclass(frozen=True)
class Step:
    """One unit of work: ``kind`` with JSON-able ``params`` applied to the outputs of ``inputs``."""

    kind: str
    params_json: str
    inputs: tuple["Step", ...] = ()

    def __init__(self, kind: str, params_json: str, inputs: tuple["Step", ...] = ()) -> None:
        # a frozen dataclass's own __init__ sets each field through object.__setattr__: planning makes
        # millions of these objects, and writing the instance dict directly takes half the time
        d = self.__dict__
        d["kind"], d["params_json"], d["inputs"] = kind, params_json, inputs

    @staticmethod
    def make(kind: str, params: dict[str, Any], inputs: tuple["Step", ...] = (),
             base: dict[str, Any] | None = None) -> "Step":
        """The step with ``params`` (over ``base``'s: parameters many steps share, one dict object, such as a
        defense's config; while planning its JSON is made once). While planning, an equal step made before
        is returned (one object per key)."""
        m = _ACTIVE
        if base and m is not None and type(params) is dict:
            own = tuple(params)
            tkey = ("template", kind, own, id(base))
            hit = m.values.get(tkey)
            if hit is None:  # (the base is kept alive with it, so its id is not reused while planning)
                frags = _base_fragments(base)
                ok = frags is not None and all(type(k) is str for k in own)
                hit = m.values[tkey] = (base, _Template(kind, frags, own) if frags is not None and ok else None)
            tpl = hit[1]
            if tpl is not None:
                params_json, key = tpl.make(params, inputs)
                step = m.values.get(("step", key))
                if step is None:
                    step = m.values["step", key] = Step(kind, params_json, inputs)
                    step.__dict__["key"] = key
                return step
        params_json = _canon_over(base, params) if base else _canon(params)
        if _ACTIVE is None:
            return Step(kind, params_json, inputs)
        return memo(("step", kind, params_json, *[i.key for i in inputs]), lambda: Step(kind, params_json, inputs))

    @_lazy
    def ancestors(self) -> tuple["Step", ...]:
        """This step and all its ancestors, inputs first, each once (computed once per step)."""
        if len(self.inputs) == 1:
            return (*self.inputs[0].ancestors, self)
        seen: dict[str, Step] = {}
        for i in self.inputs:
            for a in i.ancestors:
                seen.setdefault(a.key, a)
        seen.setdefault(self.key, self)
        return tuple(seen.values())

    @_lazy
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @_lazy
    def key(self) -> str:
        # sha256 of the canonical JSON of [STEP_VERSION, kind, params_json, input keys], written out
        text = (f"[{STEP_VERSION},{_STR(self.kind)},{_STR(self.params_json)},["
                + ",".join(_STR(i.key) for i in self.inputs) + "]]")
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def walk(self) -> Iterator["Step"]:
        """This step and all its ancestors, inputs first, each once."""
        return iter(self.ancestors)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params_json, "inputs": [i.to_dict() for i in self.inputs]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Step":
        return Step(d["kind"], d["params"], tuple(Step.from_dict(i) for i in d["inputs"]))


def _epochs(obj: Any) -> float:
    """The sum of every count named ``*epochs`` in a step's parameters (a TSC round's curve and fine-tune epochs)."""
    if isinstance(obj, dict):
        return sum((float(v) if k.endswith("epochs") and isinstance(v, (int, float)) and not isinstance(v, bool)
                    else _epochs(v)) for k, v in obj.items())
    return 0.0


def cost_class(step: Step) -> str:
    """Steps whose costs :func:`step_work` compares: one kind, and for a baseline defense's step one defense (NC's
    step costs many times FP's)."""
    name = step.params.get("defense") if step.kind == "defense" else None
    return f"{step.kind}:{name}" if isinstance(name, str) else step.kind


def step_work(step: Step) -> float:
    """A step's cost relative to other steps of its :func:`cost_class`: its passes over data (epochs) times the
    share of the data it passes over (``clean_ratio``). Only ratios within a class mean anything; the progress
    line turns them into seconds with each class's measured rate, so a 2,500-image TSC round weighs 12.5x a
    200-image one."""
    p = step.params
    ratio = p.get("clean_ratio")
    scale = float(ratio) if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio > 0 else 1.0
    return max(_epochs(p), 1.0) * scale


@dataclass(frozen=True)
class Stage:
    """A step of a trial's chain: its round, and the record stages whose ACC/ASR the trial reports to Tune
    once the step is done (in preference order; empty: nothing to report)."""

    step: Step
    round: int
    report: tuple[str, ...] = ()

    def __init__(self, step: Step, round: int, report: tuple[str, ...] = ()) -> None:
        d = self.__dict__  # (see Step.__init__)
        d["step"], d["round"], d["report"] = step, round, report


@dataclass(frozen=True)
class Final:
    """A trial's output model: the step and artifact holding it, and the record stages (in preference
    order) that evaluated it."""

    key: str
    artifact: str
    stages: tuple[str, ...] = ("final",)

    def __init__(self, key: str, artifact: str, stages: tuple[str, ...] = ("final",)) -> None:
        d = self.__dict__  # (see Step.__init__)
        d["key"], d["artifact"], d["stages"] = key, artifact, stages


Settings = tuple[dict[str, Any], tuple[tuple[str, Any], ...]]
# finished trials: their ids, or their ids mapped to their result rows' step keys (results.finished_steps)
Done = Mapping[str, Collection[str]] | Collection[str]


@dataclass(frozen=True)
class Trial:
    """One grid point: its parameters, its chain of steps, its output model, and the defense's resolved
    config: JSON, or (the config without grid axes as a dict, the axes' values), serialised only when
    :attr:`settings` is read (a million trials must not hold a million copies of it)."""

    params: dict[str, Any]
    chain: tuple[Stage, ...]
    final: Final = Final("", "")
    config: str | Settings = "{}"

    def __init__(self, params: dict[str, Any], chain: tuple[Stage, ...], final: Final = Final("", ""),
                 config: str | Settings = "{}") -> None:
        d = self.__dict__  # (see Step.__init__)
        d["params"], d["chain"], d["final"], d["config"] = params, chain, final, config

    @_lazy
    def id(self) -> str:
        return hashlib.sha256(_canon(self.params).encode()).hexdigest()[:12]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Trial) and (self.params, self.chain, self.final, self.settings)
                == (other.params, other.chain, other.final, other.settings))

    @_lazy
    def settings(self) -> str:
        """The defense's resolved config as JSON (recorded in every result row, not part of the id)."""
        c = self.config
        return c if isinstance(c, str) else _canon({**c[0], **dict(c[1])})

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


def axis_applies(path: str, defense: str, attack: str | None = None, arch: str | None = None) -> bool:
    """Whether dotted field axis ``path`` changes a trial of ``defense`` (on ``attack`` and ``arch``):
    ``defense.<name>.*`` only that defense's, other ``defense.*`` fields every defense's (not an undefended
    model's); ``train.attack_kw.<attack>.*`` only that attack's and ``train.arch_kw.<arch>.*`` only that
    architecture's trials (the per-attack and per-architecture forms); the rest every trial."""
    from tscray.defenses import DEFENSES

    from tscray.spec_grid import option_owner

    parts = path.split(".")
    owner = option_owner(path)
    if owner is not None:
        given = attack if owner == "attack" else arch
        return given is None or given == parts[2]
    if parts[0] != "defense":
        return True
    if len(parts) >= 2 and parts[1] in DEFENSES:  # defense.tsc.curve_epochs, or the whole defense.tsc
        return defense == parts[1]
    return defense != "none"


def relevant(point: dict[str, Any]) -> dict[str, Any]:
    """Drop grid axes that do not apply to the point (defense axes it does not declare, field axes of other
    defenses, attacks or architectures), so equal trials collapse."""
    from tscray.config import DEFENSE_AXES
    from tscray.defenses import DEFENSES

    name = point["defense"]
    used = DEFENSES.get(name).axes if name != "none" else ()
    attack, arch = point.get("attack"), point.get("arch")
    return {k: v for k, v in point.items()
            if ("." in k and axis_applies(k, name, attack, arch)) or ("." not in k and (k not in DEFENSE_AXES or k in used))}


class _Block:
    """One grid block's axes, and for each (defense, attack, architecture) which of them apply (the others
    collapse)."""

    def __init__(self, g: Any) -> None:
        from tscray.config import GRID_AXES
        from tscray.spec_grid import option_owner

        self.names = (*GRID_AXES, *(path for path, _ in g.field_axes))
        self.values = (*(tuple(getattr(g, a)) for a in GRID_AXES), *(tuple(vs) for _, vs in g.field_axes))
        self.defenses = set(g.defense)
        self._dropped: dict[tuple[str, Any, Any], tuple[int, ...]] = {}
        specific = any(option_owner(p) for p, _ in g.field_axes)
        # without per-attack or per-architecture axes, what applies depends on the defense alone
        self.by_defense = None if specific else {d: self.dropped(d, None, None) for d in g.defense}

    def dropped(self, defense: str, attack: Any, arch: Any) -> tuple[int, ...]:
        """Positions of the axes that do not apply to a point of ``defense`` on ``attack`` and ``arch``."""
        key = (defense, attack, arch)
        out = self._dropped.get(key)
        if out is None:
            from tscray.config import DEFENSE_AXES
            from tscray.defenses import DEFENSES

            used = DEFENSES.get(defense).axes if defense != "none" else ()
            out = self._dropped[key] = tuple(
                i for i, a in enumerate(self.names)
                if (a in DEFENSE_AXES and a not in used) or ("." in a and not axis_applies(a, defense, attack, arch)))
        return out

    def holds(self, point: dict[str, Any]) -> bool:
        """Whether this block has a point equal to ``point`` (an earlier block's duplicate is skipped)."""
        if point["defense"] not in self.defenses:
            return False
        gone = self.dropped(point["defense"], point.get("attack"), point.get("arch"))
        kept = [i for i in range(len(self.names)) if i not in gone]
        return (len(kept) == len(point) and all(self.names[i] in point for i in kept)
                and all(point[self.names[i]] in self.values[i] for i in kept))


def iter_points(spec: SweepSpec, root_major: bool = False) -> Iterator[dict[str, Any]]:
    """Distinct grid points (see :func:`_points`)."""
    return (p for p, _ in _points(spec, root_major))


def _points(spec: SweepSpec, root_major: bool = False) -> Iterator[tuple[dict[str, Any], bool]]:
    """Distinct grid points (irrelevant axes dropped); field axes (``defense.clean_ratio``) follow the named
    axes, under their dotted paths. In grid order, or with ``root_major`` grouped by backdoored model (the
    axes that change it vary slowest), as a streaming summary wants; each with whether it starts a new
    group of points with equal backdoor-model axes (in root-major order, a group never recurs in a block).

    No set of seen points is kept: within a block a point whose dropped axes are not at their first value
    repeats an earlier one, and a later block's point is skipped when an earlier block holds it (axis
    values are distinct: validation refuses duplicates).
    """
    import operator

    method = spec.train.method
    blocks = [_Block(g) for g in (spec.grids or (spec.grid,))]
    for b, block in enumerate(blocks):
        names, values, earlier = block.names, block.values, blocks[:b]
        di, ai, ri = names.index("defense"), names.index("attack"), names.index("arch")
        by_defense = block.by_defense
        firsts = tuple(vs[0] if vs else None for vs in values)
        order = tuple(range(len(names)))
        if root_major:
            inner = {"defense", "rounds", "t"}
            order = (tuple(i for i, a in enumerate(names) if a not in inner and not a.startswith("defense."))
                     + tuple(i for i, a in enumerate(names) if a in inner or a.startswith("defense.")))
        back = operator.itemgetter(*sorted(range(len(order)), key=order.__getitem__))
        n_outer = len(order) - 3 - sum(a.startswith("defense.") for a in names) if root_major else len(order)
        last: Any = None  # the outer axes of the last point yielded: a group starts where they change
        for c in itertools.product(*[values[i] for i in order]):
            combo = back(c) if root_major else c
            gone = by_defense[combo[di]] if by_defense is not None else block.dropped(combo[di], combo[ai], combo[ri])
            if any(combo[i] is not firsts[i] for i in gone):
                continue  # repeats the point with these axes at their first value
            p = {a: v for i, (a, v) in enumerate(zip(names, combo)) if i not in gone} if gone else dict(zip(names, combo))
            if earlier and any(e.holds(p) for e in earlier):
                continue
            if method != "supervised":  # (supervised trials keep the ids they always had)
                p["method"] = method
            outer = c[:n_outer]
            new, last = outer != last, outer
            yield p, new


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Distinct grid points, in grid order (see :func:`iter_points`)."""
    return list(iter_points(spec))


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
    try:
        params = memo_lasting(("resource-params", p["attack"], _dumps(kw), type(p["poison_rate"]), p["poison_rate"]),
                              lambda: attacks.build(p["attack"], **kw).resource_params(p["poison_rate"]))
    except TypeError:  # an unhashable entry
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
    from tscray import attacks

    res = resource_step(spec, p)
    version = _version(attacks.ATTACKS.get(p["attack"]))
    return Step.make("backdoor", _with_data_kw(spec, {**version,
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


def _variant(spec: SweepSpec, p: dict[str, Any]) -> tuple[SweepSpec, str]:
    """The spec with the point's field axes set, and their JSON (its caches' key; "" without any)."""
    if not (spec.grid.field_axes or any(g.field_axes for g in spec.grids)) or not any("." in k for k in p):
        return spec, ""
    fields = {k: v for k, v in p.items() if "." in k}
    variant = _dumps(fields)
    return memo(("spec", variant), lambda: spec.with_fields(fields)), variant


def _root(spec: SweepSpec, variant: str, p: dict[str, Any]) -> tuple[Step, Stage, Final]:
    """The point's backdoor step, its stage and its output (for an undefended trial), once per model."""
    def make() -> tuple[Step, Stage, Final]:
        bd = backdoor_step(spec, p)
        return bd, Stage(bd, 0, ("backdoored",)), Final(bd.key, "model", ("backdoored",))
    try:
        return memo(("backdoor", p["dataset"], p["arch"], p["attack"], p["poison_rate"], p["seed"], p.get("method"),
                     variant), make)
    except TypeError:  # an unhashable dataset entry: no sharing, same result
        return make()


def _version(plugin: Any) -> dict[str, int]:
    """A defense's or attack's computation version, in its steps' params once it is above 1 (steps planned
    before versions existed keep their keys)."""
    v = getattr(plugin, "version", 1)
    return {"version": v} if v != 1 else {}


def plan_trial(spec: SweepSpec, p: dict[str, Any]) -> Trial:
    """The chain of steps one grid point needs: the backdoored model, then its defense's steps (one
    ``defense`` step running the whole defense, or the finer steps its :class:`Planner` declares)."""
    spec, variant = _variant(spec, p)
    bd, first, backdoored = _root(spec, variant, p)
    name = p["defense"]
    if name == "none":
        return Trial(p, (first,), backdoored)

    def defense() -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
        from tscray.defenses import DEFENSES
        from tscray.defenses.base import config_to_dict

        cfg = spec.defense.config(name, seed=p["seed"])
        d = DEFENSES.get(name)
        return d, cfg, config_to_dict(cfg), {**_clean(spec), "curve_ts": list(spec.eval.curve_ts), **_version(d)}
    # resolved once per (defense, seed, variant); the trial's grid axes override its fields
    d, base, base_dict, common = memo(("defense", name, p["seed"], variant), defense)
    axes = tuple([(a, p[a]) for a in d.axes])
    if d.plan is not None:
        stages, final = d.plan.plan(base, dict(axes), bd, common)
    else:
        cfg_dict = memo(("config-dict", id(base_dict), axes), lambda: {**base_dict, **dict(axes)}) if axes else base_dict
        step = Step.make("defense", {"defense": name, "config": cfg_dict, **_clean(spec), **_version(d)}, (bd,))
        stages, final = [Stage(step, 1, ("final",))], Final(step.key, "model", ("final",))
    return Trial(p, (first, *stages), final, (base_dict, axes))


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

    def summary(self, done: Done | None = None) -> PlanSummary:
        """The counts :func:`summarize` streams, from the planned trials."""
        from tscray.results import is_finished

        by_defense: dict[str, int] = {}
        for t in self.trials:
            by_defense[t.params["defense"]] = by_defense.get(t.params["defense"], 0) + 1
        finished = sum(1 for t in self.trials if is_finished(done, t)) if done is not None else None
        return PlanSummary(self.spec.name, len(self.trials), self.count_by_kind(), self.naive_count_by_kind(),
                           by_defense, finished)

    @staticmethod
    def curve_fits(counts: dict[str, int]) -> int:
        """Curve fits among step counts: the step kinds that defenses declare as fitting one curve each."""
        from tscray.defenses import DEFENSES

        kinds = {k for d in DEFENSES.values() if d.plan is not None for k in d.plan.curve_kinds}
        return sum(n for k, n in counts.items() if k in kinds)


@dataclass
class PlanSummary:
    """What ``--dry-run`` prints: trials, distinct steps by kind, what a per-trial run without reuse would
    execute, trials by defense, and (given the finished trial ids) how many are finished."""

    name: str
    trials: int
    counts: dict[str, int]
    naive: dict[str, int]
    by_defense: dict[str, int]
    finished: int | None = None


@contextlib.contextmanager
def _planning() -> Iterator[None]:
    """Planning caches (:func:`memo`) for the block, and no cyclic GC: planning allocates millions of
    acyclic objects, and generational passes over them made it superlinear."""
    global _ACTIVE
    outer, _ACTIVE = _ACTIVE, _Memo()
    collect = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        _ACTIVE = outer
        if collect:
            gc.enable()


def _add_kinds(out: dict[str, int], steps: Any, n: int = 1) -> None:
    for a in steps:
        out[a.kind] = out.get(a.kind, 0) + n


@dataclass
class _Part:
    """One worker's share of a summary: its trials' counts, the counts of the steps it owns (those below
    exactly one backdoor step, whose groups all came to it), and the keys of the others by kind."""

    summary: PlanSummary
    shared: dict[str, set[str]]


def _owner(step: Step) -> Step | None:
    """The one backdoor step at or above ``step`` (None: none, or more than one)."""
    found = None
    for a in step.ancestors:
        if a.kind == "backdoor":
            if found is not None:
                return None
            found = a
    return found


def _summarize_part(spec: SweepSpec, done: Done | None, part: int, parts: int) -> _Part:
    """Count the groups whose backdoor step's key falls to ``part`` of ``parts``."""
    global _ACTIVE
    from tscray.results import is_finished

    keys: set[str] = set()
    shared: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    naive: dict[str, int] = {}
    by_defense: dict[str, int] = {}
    trials = finished = 0
    seen: dict[int, Stage] = {}  # stages already counted in this group (kept alive: ids not reused)
    # trials whose last step needs every other step of their chain (the usual case) compute what that step
    # and its ancestors are: count such trials per last step, and fold the counts in once per group
    closed: dict[int, list[Any]] = {}  # id(last step) -> [the step, trials, ids of its ancestors]

    def fold() -> None:
        for step, n, _ in closed.values():
            if n:
                _add_kinds(naive, step.ancestors, n)
        closed.clear()
        seen.clear()

    mine = True
    with _planning():
        for p, new_group in _points(spec, root_major=True):
            if new_group:
                fold()
                _ACTIVE = _Memo(_ACTIVE.lasting if _ACTIVE is not None else None)
                gc.collect(0)  # the last group's steps (a step's ancestors hold the step: a cycle)
                if parts > 1:
                    mine = int(_root(*_variant(spec, p), p)[0].key, 16) % parts == part
            if not mine:
                continue
            trial = plan_trial(spec, p)
            trials += 1
            d = p["defense"]
            by_defense[d] = by_defense.get(d, 0) + 1
            if done and is_finished(done, trial):
                finished += 1
            chain = trial.chain
            for stage in chain:
                if id(stage) not in seen:
                    seen[id(stage)] = stage
                    if stage.step.key in keys:  # so are its ancestors: a step's key is added after theirs
                        continue
                    for a in stage.step.ancestors:
                        if a.key in keys:
                            continue
                        keys.add(a.key)
                        if parts == 1 or _owner(a) is not None:
                            counts[a.kind] = counts.get(a.kind, 0) + 1
                        else:
                            shared.setdefault(a.kind, set()).add(a.key)
            last = chain[-1].step
            entry = closed.get(id(last))
            if entry is None:
                entry = closed[id(last)] = [last, 0, frozenset(map(id, last.ancestors))]
            if all(id(s.step) in entry[2] for s in chain):
                entry[1] += 1
            else:
                _add_kinds(naive, {a.key: a for s in chain for a in s.step.ancestors}.values())
        fold()
    return _Part(PlanSummary(spec.name, trials, counts, naive, by_defense, finished), shared)


def _workers(spec: SweepSpec) -> int:
    """Processes for a summary: one per CPU (up to 8) for grids of 50,000 points or more, forked (Linux)."""
    import math
    import os
    import sys

    from tscray.config import GRID_AXES

    size = sum(math.prod(len(getattr(g, a)) for a in GRID_AXES) * math.prod(len(v) for _, v in g.field_axes)
               for g in (spec.grids or (spec.grid,)))
    if size < 50_000 or not sys.platform.startswith("linux"):
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0))))


def summarize(spec: SweepSpec, done: Done | None = None, workers: int | None = None) -> PlanSummary:
    """Plan the sweep trial by trial without keeping the trials: the counts :class:`Plan` gives, in memory
    bounded by one backdoored model's steps plus the distinct step keys (a million-trial dry run).

    Points come grouped by backdoored model; the planning caches are dropped between groups (a later
    group cannot share an earlier one's defense steps, whose keys derive from the backdoor step's; a
    recurring step is still counted once, by key). Large grids are split over ``workers`` forked
    processes by backdoor step: a worker owns every step below its backdoor steps, and the parent merges
    the keys of the steps above them (attack resources, clean encoders), which several may share."""
    parts = _workers(spec) if workers is None else workers
    if parts <= 1:
        out = _summarize_part(spec, done, 0, 1).summary
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(parts) as pool:
            results = pool.starmap(_summarize_part, [(spec, done, i, parts) for i in range(parts)])
        out = PlanSummary(spec.name, 0, {}, {}, {}, 0)
        shared: dict[str, set[str]] = {}
        for r in results:
            s = r.summary
            out.trials += s.trials
            out.finished = (out.finished or 0) + (s.finished or 0)
            for total, add in ((out.counts, s.counts), (out.naive, s.naive), (out.by_defense, s.by_defense)):
                for k, n in add.items():
                    total[k] = total.get(k, 0) + n
            for kind, ks in r.shared.items():
                shared.setdefault(kind, set()).update(ks)
        for kind, ks in shared.items():
            out.counts[kind] = out.counts.get(kind, 0) + len(ks)
        out.by_defense = dict(sorted(out.by_defense.items()))
    if done is None:
        out.finished = None
    return out


def make_plan(spec: SweepSpec) -> Plan:
    """Plan every grid point of the sweep (linear in trials: see the module docstring)."""
    with _planning():
        return Plan(spec, [plan_trial(spec, p) for p in grid_points(spec)])
