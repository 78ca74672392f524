"""TSC, Two-stage Symmetry Connectivity (Algorithm 1 of the paper).

Per round, starting from θp = θadv:
  stage 1  θp' = unalign(θp, θp); γ1 = curve(θp, θp'); θt = γ1(t)
  stage 2  θt' = align(θp, θt);   γ2 = curve(θp, θt'); θp = γ2(t)
then a brief fine-tune. γ1 does not depend on t (:func:`stage1_curve`), and each round's output
is exactly what a run with E_TSC = r returns, so one run with E = 3 yields E = 1, 2, 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from torch import nn

from tscray.curves import BezierCurve, fit
from tscray.defenses.base import (DEFENSES, CleanData, Defense, DefenseResult, Evaluate, Log, Planner, check_t, config_to_dict,
                                  evaluate_curve)
from tscray.defenses.finetune import finetune_model
from tscray.methods.base import Method
from tscray.optim import OptimConfig
from tscray.plan import Final, Stage, Step, memo, memo_for
from tscray.symmetry import Probe, match, permute
from tscray.symmetry.derive import PROBE_RULES


@dataclass(frozen=True)
class TSCConfig:
    """Every knob of the TSC recipe; defaults follow the paper's text (supervised, Appendix L.2)."""

    rounds: int = 3
    t: float = 0.4
    curve_epochs: int = 200
    # A budget in SGD steps instead of epochs: each fit gets ⌈curve_steps / batches per epoch⌉ epochs, so a
    # few hundred clean images get as many bend updates as the paper's 2,500 (200 epochs of 256: 2,000 steps).
    curve_steps: int | None = None
    curve_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.02, momentum=0.9, weight_decay=5e-4))
    batch_size: int = 256
    curve_batch_size: int | None = None  # fitting γ1/γ2 (unset: batch_size)
    match_batch_size: int | None = None  # reading activations to match (unset: batch_size)
    finetune_epochs: int = 5
    finetune_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, momentum=0.9,
                                                                            weight_decay=5e-4))
    finetune_last: bool = True
    match_batches: int | None = None
    # where matching reads activations: None, the spec's own; a rule, auto|raw|relu (placed on the model's
    # graph: tscray.symmetry.derive.probes_by_rule); or a mapping group -> probes (library use)
    probes: Mapping[str, Sequence[Probe]] | str | None = None
    eval_ts: tuple[float, ...] = ()
    seed: int = 0
    # added after results were stored: left out of step keys while unset, so stored steps keep their keys
    LATE_FIELDS: ClassVar[tuple[str, ...]] = ("curve_steps", "curve_batch_size", "match_batch_size")
    # setting curve_epochs (flag, --set, spec, grid axis) replaces a preset's step budget instead of being ignored
    CLEARS: ClassVar[dict[str, tuple[str, ...]]] = {"curve_epochs": ("curve_steps",)}

    def __post_init__(self) -> None:
        check_t(self.t)
        for name in ("curve_steps", "curve_batch_size", "match_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 (or unset), got {v!r}")
        if self.rounds < 1:
            raise ValueError(f"rounds (E_TSC) must be >= 1, got {self.rounds}")
        if self.curve_epochs < 0 or self.finetune_epochs < 0:
            raise ValueError("epoch counts must be >= 0")
        for t in self.eval_ts:
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"eval_ts must lie in [0, 1], got {t}")
        p = self.probes
        if p is not None and not (isinstance(p, str) and p in PROBE_RULES) and not (
                isinstance(p, Mapping) and all(isinstance(v, Sequence) and not isinstance(v, str)
                                               and all(isinstance(q, Probe) for q in v) for v in p.values())):
            raise ValueError(f"probes must be one of {', '.join(PROBE_RULES)} (or unset: the spec's own), "
                             f"got {p!r}")

    @classmethod
    def preset(cls, name: str = "paper") -> "TSCConfig":
        """``paper``: the paper's text. ``released``: the authors' released code (cosine over half the
        curve epochs, so the rate rises again: T_max 100 of 200; matching batches of 128; extra L2
        0.5·1e-4·‖θ(t)‖²; 10 fine-tune epochs, none after the last round).
        ``small``: for a defender with a few hundred clean images (docs/fidelity/README.md): t 0.5, E_TSC 4
        and 2,000 curve updates at batch 64 whatever the clean-set size (at 200 images, 500 epochs), so the
        stage-2 bend moves far enough from the backdoored model's basin; the paper's 200 epochs there are
        200 updates. Three rounds left Blended-type triggers at 26-29% in 2 of 15 checks; four removed them.
        ``ssl``: the paper's self-supervised recipe (E 2, t 0.25, Adam 5e-3, fine-tune lr 5e-5)."""
        if name == "paper":
            return cls()
        if name == "released":
            return cls(curve_optim=OptimConfig(lr=0.02, momentum=0.9, weight_decay=5e-4, t_max_ratio=0.5, l2=1e-4),
                       match_batch_size=128, finetune_epochs=10, finetune_last=False)
        if name == "small":
            return cls(rounds=4, t=0.5, curve_steps=2000, batch_size=64)
        if name == "ssl":
            return cls(rounds=2, t=0.25,
                       curve_optim=OptimConfig(name="adam", lr=5e-3, weight_decay=1e-6, l2=5e-5),
                       finetune_optim=OptimConfig(name="adam", lr=5e-5, weight_decay=1e-6))
        raise ValueError(f"unknown TSC preset {name!r}; known: paper, released, small, ssl")


def curve_epochs(cfg: TSCConfig, batches: int) -> int:
    """Epochs per curve fit: ``curve_epochs``, or enough for ``curve_steps`` updates at ``batches`` per epoch."""
    if cfg.curve_steps is None:
        return cfg.curve_epochs
    return -(-cfg.curve_steps // max(1, batches))


def _fit_batch(cfg: TSCConfig) -> int:
    return cfg.curve_batch_size or cfg.batch_size


def _match_batch(cfg: TSCConfig) -> int:
    return cfg.match_batch_size or cfg.batch_size


def stage_seed(cfg: TSCConfig, round_index: int, stage: int) -> int:
    """The seed of one stage of one round (1: γ1, 2: γ2, 3: BN refresh, 4: fine-tune); shared with
    the sweep's step functions so a planned run reproduces ``run`` exactly."""
    return cfg.seed * 1_000_003 + round_index * 101 + stage


def stage1_curve(model: nn.Module, clean: CleanData, method: Method, cfg: TSCConfig, round_index: int = 1,
                 log: Log | None = None) -> BezierCurve:
    """γ1 between θp and its un-aligned copy, fitted on the clean set (independent of t)."""
    seed = stage_seed(cfg, round_index, 1)
    perm = match(model, model, clean.loader(_match_batch(cfg), seed, shuffle=False), "unalign",
                 cfg.probes, cfg.match_batches)
    curve = BezierCurve(model, permute(model, perm))
    loader = clean.loader(_fit_batch(cfg), seed)
    return fit(curve, loader, method, curve_epochs(cfg, len(loader)), cfg.curve_optim, seed,
               _progress(log, f"round {round_index} stage 1"))


def stage2_curve(model: nn.Module, theta_t: nn.Module, clean: CleanData, method: Method, cfg: TSCConfig,
                 round_index: int = 1, log: Log | None = None) -> BezierCurve:
    """γ2 between θp and θt re-aligned to θp."""
    seed = stage_seed(cfg, round_index, 2)
    perm = match(model, theta_t, clean.loader(_match_batch(cfg), seed, shuffle=False), "align",
                 cfg.probes, cfg.match_batches)
    curve = BezierCurve(model, permute(theta_t, perm))
    loader = clean.loader(_fit_batch(cfg), seed)
    return fit(curve, loader, method, curve_epochs(cfg, len(loader)), cfg.curve_optim, seed,
               _progress(log, f"round {round_index} stage 2"))


def _progress(log: Log | None, what: str):
    if log is None:
        return None

    def report(epoch: int, epochs: int, loss: float) -> None:
        if epoch == epochs or epoch % max(1, epochs // 4) == 0:
            log(f"{what}: curve epoch {epoch}/{epochs}, loss {loss:.4f}")
    return report


@dataclass
class RoundResult:
    """One round: the stage-1 point θt, the stage-2 point, its fine-tuned successor, and records."""

    theta_t: nn.Module
    point: nn.Module
    next_input: nn.Module
    output: nn.Module
    records: list[dict[str, Any]]
    curve2: BezierCurve


def tsc_round(model: nn.Module, clean: CleanData, method: Method, cfg: TSCConfig, round_index: int,
              last: bool, evaluate: Evaluate | None = None, log: Log | None = None,
              curve1: BezierCurve | None = None) -> RoundResult:
    """One TSC round from θp = ``model``. ``curve1`` may be a cached γ1 for this θp."""
    bn = clean.loader(cfg.batch_size, stage_seed(cfg, round_index, 3))
    tags = {"defense": "tsc", "round": round_index, "t": cfg.t}
    records: list[dict[str, Any]] = []
    c1 = curve1 if curve1 is not None else stage1_curve(model, clean, method, cfg, round_index, log)
    theta_t = c1.point(cfg.t, bn)
    c2 = stage2_curve(model, theta_t, clean, method, cfg, round_index, log)
    point = c2.point(cfg.t, bn)
    tune = cfg.finetune_epochs > 0 and (cfg.finetune_last or not last)
    tuned = (finetune_model(point, clean, method, cfg.finetune_epochs, cfg.finetune_optim, cfg.batch_size,
                            stage_seed(cfg, round_index, 4)) if tune else point)
    output = tuned if cfg.finetune_last else point
    if evaluate is not None:
        seen: dict[int, dict[str, float]] = {}

        def once(m: nn.Module) -> dict[str, float]:  # the output is the stage-2 point or its fine-tuned successor
            if id(m) not in seen:
                seen[id(m)] = evaluate(m)
            return seen[id(m)]

        records.append({**tags, "stage": "stage1", "t_curve": cfg.t, **once(theta_t)})
        records.append({**tags, "stage": "stage2", "t_curve": cfg.t, **once(point)})
        if tune:
            records.append({**tags, "stage": "finetune", "t_curve": None, **once(tuned)})
        if cfg.eval_ts:
            records += evaluate_curve(c1, cfg.eval_ts, bn, evaluate, **tags, stage="curve1")
            records += evaluate_curve(c2, cfg.eval_ts, bn, evaluate, **tags, stage="curve2")
        records.append({**tags, "stage": "output", "t_curve": None, **once(output)})
        if log:
            r = records[-1]
            log(f"round {round_index}: " + ", ".join(f"{k} {r[k]:.2f}" for k in ("acc", "asr") if k in r))
    return RoundResult(theta_t, point, tuned, output, records, c2)


def run(model: nn.Module, clean: CleanData, method: Method, cfg: TSCConfig,
        evaluate: Evaluate | None = None, log: Log | None = None) -> DefenseResult:
    """Purify ``model`` with E_TSC = ``cfg.rounds`` rounds of TSC (Algorithm 1)."""
    current = model
    outputs: list[nn.Module] = []
    records: list[dict[str, Any]] = []
    points: dict[tuple[int, str], nn.Module] = {}
    for r in range(1, cfg.rounds + 1):
        res = tsc_round(current, clean, method, cfg, r, last=r == cfg.rounds, evaluate=evaluate, log=log)
        outputs.append(res.output)
        records += res.records
        points |= {(r, "stage1"): res.theta_t, (r, "stage2"): res.point}
        if res.next_input is not res.point:
            points[(r, "finetune")] = res.next_input
        current = res.next_input
    return DefenseResult(outputs[-1], outputs, records, points)




# ------------------------------------------------------------------ sweep steps
# A sweep splits TSC into γ1 fits (``tsc_stage1``, independent of t) and rounds (``tsc_round``: γ1's
# point, γ2, the fine-tune), so trials that differ in t share γ1 of round 1 and trials with E_TSC
# 1, 2, 3 share rounds. Each step calls the functions above with the seeds ``run`` uses: a planned
# trial computes exactly what ``run`` returns (tests/test_plan.py checks it bit for bit).

_PLAN_DROP = ("t", "rounds", "eval_ts")


def _plan(base: TSCConfig, axes: dict[str, Any], backdoor: Any, common: dict[str, Any]) -> tuple[list[Any], Any]:
    t, rounds = axes.get("t", base.t), axes.get("rounds", base.rounds)
    # one params dict per config: every step shares it, and planning serialises it once
    shared = memo_for((base, common), "tsc-params", lambda: {
        "config": {k: v for k, v in config_to_dict(base).items() if k not in _PLAN_DROP}, **common})

    def round_(current: Any, r: int) -> tuple[Any, Any, Any]:
        inp = "model" if r == 1 else "next"
        s1 = memo(("tsc-stage1", id(shared), id(current), r), lambda: Stage(
            Step.make("tsc_stage1", {"round": r, "input": inp}, (current,), base=shared), r))
        rd = Step.make("tsc_round", {"round": r, "input": inp, "t": t}, (current, s1.step), base=shared)
        final = (Final(rd.key, "next", ("finetune", "stage2")) if base.finetune_last
                 else Final(rd.key, "point", ("stage2",)))
        return s1, Stage(rd, r, ("finetune", "stage2")), final

    current, final = backdoor, None
    stages: list[Any] = []
    for r in range(1, rounds + 1):
        s1, rd, final = memo(("tsc-round", id(shared), id(current), r, t), lambda c=current, r=r: round_(c, r))
        stages += (s1, rd)
        current = rd.step
    return stages, final


def _step_config(p: dict[str, Any], t: float = 0.5) -> TSCConfig:
    from tscray.defenses.base import config_from_dict
    return config_from_dict(TSCConfig, {**p["config"], "t": t, "rounds": 1})


def step_stage1(step: Any, ctx: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """γ1 of one round; stores its far endpoint (the un-aligned copy, BatchNorm buffers included) and bend."""
    p, (src,) = step.params, step.inputs
    cfg = _step_config(p)
    clean, method, evaluate = ctx.defense_env(step)
    curve = stage1_curve(ctx.load_model(src, p["input"]), clean, method, cfg, p["round"])
    bn = clean.loader(cfg.batch_size, stage_seed(cfg, p["round"], 3))
    rows = evaluate_curve(curve, p["curve_ts"], bn, evaluate, stage="curve1", round=p["round"])
    return {"end": curve.endpoint_state("end"), "bend": curve.bend_state()}, rows


def step_round(step: Any, ctx: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One round from a cached γ1: its point at t, γ2, the point and its fine-tuned successor."""
    p, (src, s1) = step.params, step.inputs
    r, cfg = p["round"], _step_config(p, p["t"])
    clean, method, evaluate = ctx.defense_env(step)
    model = ctx.load_model(src, p["input"])
    curve1 = ctx.load_curve(s1, model, ctx.load_model(s1, "end"))
    # last=False: always fine-tune, so the step serves both as a final round and as the next round's input
    res = tsc_round(model, clean, method, cfg, r, last=False, evaluate=evaluate, curve1=curve1)
    rows = [row for row in res.records if row["stage"] != "output"]
    rows += evaluate_curve(res.curve2, p["curve_ts"], clean.loader(cfg.batch_size, stage_seed(cfg, r, 3)), evaluate,
                           stage="curve2")
    return {"point": ctx.state(res.point), "next": ctx.state(res.next_input)}, [{**row, "round": r} for row in rows]


PLANNER = Planner(_plan, {"tsc_stage1": step_stage1, "tsc_round": step_round},
                  curve_kinds=("tsc_stage1", "tsc_round"))
DEFENSES.register("tsc")(Defense("tsc", TSCConfig, run, axes=("rounds", "t"), methods=("supervised", "simclr"),
                                 plan=PLANNER, summary="two-stage symmetry connectivity (Algorithm 1)",
                                 version=2))  # 2: BN refresh merges per-batch moments (curves.update_bn)
