"""From a validated sweep to trials and a graph of content-keyed steps.

A step is keyed by a hash of its kind, its parameters and its inputs' keys, so equal work has
equal keys wherever it appears: trials with E_TSC = 1, 2, 3 share rounds, trials differing only
in t share round 1's first curve (γ1 does not depend on t), and every defense of one backdoored
model shares it. The plan is pure data; :mod:`tscray.steps` computes steps and
:mod:`tscray.cluster` schedules them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

from tscray.config import SweepSpec, attack_kw_for

# Bump when a step's computation changes meaning, so old artifacts are not reused for it.
STEP_VERSION = 1


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class Step:
    """One unit of work: ``kind`` with JSON-able ``params`` applied to the outputs of ``inputs``."""

    kind: str
    params_json: str
    inputs: tuple["Step", ...] = ()

    @staticmethod
    def make(kind: str, params: dict[str, Any], inputs: tuple["Step", ...] = ()) -> "Step":
        return Step(kind, _canon(params), inputs)

    @cached_property
    def params(self) -> dict[str, Any]:
        return json.loads(self.params_json)

    @cached_property
    def key(self) -> str:
        h = hashlib.sha256(_canon([STEP_VERSION, self.kind, self.params_json, [i.key for i in self.inputs]]).encode())
        return h.hexdigest()[:24]

    def walk(self) -> Iterator["Step"]:
        """This step and all its ancestors, inputs first, each once."""
        seen: set[str] = set()

        def visit(s: Step) -> Iterator[Step]:
            for i in s.inputs:
                yield from visit(i)
            if s.key not in seen:
                seen.add(s.key)
                yield s
        yield from visit(self)

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


def relevant(point: dict[str, Any]) -> dict[str, Any]:
    """Drop grid axes that do not apply to the point's defense (those it does not declare), so equal
    trials collapse."""
    from tscray.config import DEFENSE_AXES
    from tscray.defenses import DEFENSES

    name = point["defense"]
    used = DEFENSES.get(name).axes if name != "none" else ()
    return {k: v for k, v in point.items() if k not in DEFENSE_AXES or k in used}


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Distinct grid points (irrelevant axes dropped), in grid order."""
    from tscray.config import GRID_AXES

    names = GRID_AXES
    combos = itertools.chain.from_iterable(itertools.product(*[getattr(g, a) for a in names])
                                           for g in (spec.grids or (spec.grid,)))
    seen, out = set(), []
    for combo in combos:
        p = relevant(dict(zip(names, combo)))
        if spec.train.method != "supervised":  # (supervised trials keep the ids they always had)
            p["method"] = spec.train.method
        k = _canon(p)
        if k not in seen:
            seen.add(k)
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
        "dataset": p["dataset"], "arch": p["arch"], "arch_kw": tr.arch_kw, "seed": p["seed"], "method": tr.method,
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
        "dataset": p["dataset"], "arch": p["arch"], "arch_kw": tr.arch_kw, "attack": p["attack"],
        "attack_kw": attack_kw_for(tr, p["attack"]), "poison_rate": p["poison_rate"], "target": tr.target,
        "seed": p["seed"],
        "epochs": tr.epochs, "batch_size": tr.batch_size, "lr": tr.lr, "momentum": tr.momentum,
        "weight_decay": tr.weight_decay}), (res,) if res is not None else ())


def _clean(spec: SweepSpec) -> dict[str, Any]:
    return {"clean_ratio": spec.defense.clean_ratio, "clean_seed": spec.defense.clean_seed}


def plan_trial(spec: SweepSpec, p: dict[str, Any]) -> Trial:
    """The chain of steps one grid point needs: the backdoored model, then its defense's steps (one
    ``defense`` step running the whole defense, or the finer steps its :class:`Planner` declares)."""
    from tscray.defenses import DEFENSES
    from tscray.defenses.base import config_to_dict

    bd = backdoor_step(spec, p)
    name = p["defense"]
    if name == "none":
        return Trial(p, (Stage(bd, 0, ("backdoored",)),), Final(bd.key, "model", ("backdoored",)))
    d = DEFENSES.get(name)
    cfg = spec.defense.config(name, seed=p["seed"], **{a: p[a] for a in d.axes})
    if d.plan is not None:
        stages, final = d.plan.plan(cfg, bd, {**_clean(spec), "curve_ts": list(spec.eval.curve_ts)})
    else:
        step = Step.make("defense", {"defense": name, "config": config_to_dict(cfg), **_clean(spec)}, (bd,))
        stages, final = [Stage(step, 1, ("final",))], Final(step.key, "model", ("final",))
    return Trial(p, (Stage(bd, 0, ("backdoored",)), *stages), final, _canon(config_to_dict(cfg)))


@dataclass
class Plan:
    """All trials of a sweep and the distinct steps they need."""

    spec: SweepSpec
    trials: list[Trial] = field(default_factory=list)

    @cached_property
    def steps(self) -> dict[str, Step]:
        out: dict[str, Step] = {}
        for trial in self.trials:
            for s in trial.steps:
                for a in s.walk():
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
        for trial in self.trials:
            needed: dict[str, Step] = {}
            for s in trial.steps:
                for a in s.walk():
                    needed.setdefault(a.key, a)
            for s in needed.values():
                counts[s.kind] = counts.get(s.kind, 0) + 1
        return counts

    @staticmethod
    def curve_fits(counts: dict[str, int]) -> int:
        """Curve fits among step counts: the step kinds that defenses declare as fitting one curve each."""
        from tscray.defenses import DEFENSES

        kinds = {k for d in DEFENSES.values() if d.plan is not None for k in d.plan.curve_kinds}
        return sum(n for k, n in counts.items() if k in kinds)


def make_plan(spec: SweepSpec) -> Plan:
    """Plan every grid point of the sweep."""
    return Plan(spec, [plan_trial(spec, p) for p in grid_points(spec)])
