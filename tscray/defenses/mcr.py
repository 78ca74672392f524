"""MCR, mode connectivity repair (Zhao et al., 2020): one curve between θadv and a fine-tuned copy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tscray.curves import BezierCurve, fit
from tscray.defenses.base import (DEFENSES, CleanData, Defense, DefenseResult, Evaluate, Log, Planner, check_t,
                                  evaluate_curve)
from tscray.defenses.finetune import finetune_model
from tscray.methods.base import Method
from tscray.optim import OptimConfig


@dataclass(frozen=True)
class MCRConfig:
    """MCR recipe; t 0.4 and curve settings as TSC's for a fair comparison (paper, Appendix L.2)."""

    t: float = 0.4
    curve_epochs: int = 200
    curve_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.02, momentum=0.9, weight_decay=5e-4))
    finetune_epochs: int = 100
    finetune_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01, momentum=0.9,
                                                                            weight_decay=5e-4))
    batch_size: int = 256
    eval_ts: tuple[float, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check_t(self.t)

    @classmethod
    def preset(cls, name: str = "paper") -> "MCRConfig":
        if name in ("paper", "released"):
            return cls()
        if name == "ssl":
            return cls(t=0.25, curve_optim=OptimConfig(name="adam", lr=5e-3, weight_decay=1e-6))
        raise ValueError(f"unknown MCR preset {name!r}; known: paper, released, ssl")


def mcr_curve(model: nn.Module, clean: CleanData, method: Method, cfg: MCRConfig) -> tuple[nn.Module, BezierCurve]:
    """The fine-tuned copy and the fitted curve from the model to it (independent of t)."""
    tuned = finetune_model(model, clean, method, cfg.finetune_epochs, cfg.finetune_optim, cfg.batch_size,
                           cfg.seed + 7)
    curve = fit(BezierCurve(model, tuned), clean.loader(cfg.batch_size, cfg.seed + 1), method,
                cfg.curve_epochs, cfg.curve_optim, cfg.seed + 1)
    return tuned, curve


def bn_loader(clean: CleanData, cfg: MCRConfig):
    """The loader that recomputes BatchNorm statistics at MCR's points."""
    return clean.loader(cfg.batch_size, cfg.seed + 2)


def run(model: nn.Module, clean: CleanData, method: Method, cfg: MCRConfig,
        evaluate: Evaluate | None = None, log: Log | None = None) -> DefenseResult:
    """Fine-tune a copy, fit a curve between the model and the copy, return the point at t."""
    tuned, curve = mcr_curve(model, clean, method, cfg)
    bn = bn_loader(clean, cfg)
    point = curve.point(cfg.t, bn)
    records = []
    if evaluate is not None:
        tags = {"defense": "mcr", "round": 1, "t": cfg.t}
        records.append({**tags, "stage": "output", "t_curve": cfg.t, **evaluate(point)})
        records += evaluate_curve(curve, cfg.eval_ts, bn, evaluate, **tags, stage="curve")
        if log:
            log(f"mcr: acc {records[0]['acc']:.2f}" + (f", asr {records[0]['asr']:.2f}" if "asr" in records[0] else ""))
    return DefenseResult(point, [point], records, {(1, "finetuned"): tuned, (1, "point"): point})


# ------------------------------------------------------------------ sweep steps
# The curve does not depend on t (``mcr_curve``); each t is a cheap ``mcr_point`` on it.

def _plan(base: MCRConfig, axes: dict[str, Any], backdoor: Any, common: dict[str, Any]) -> tuple[list[Any], Any]:
    from tscray.defenses.base import config_to_dict
    from tscray.plan import Final, Stage, Step, memo_for

    config = memo_for((base,), "mcr-config",
                      lambda: {k: v for k, v in config_to_dict(base).items() if k not in ("t", "eval_ts")})
    clean = {k: common[k] for k in ("clean_ratio", "clean_seed")}
    curve = Step.make("mcr_curve", {"config": config, **common}, (backdoor,))
    point = Step.make("mcr_point", {"t": axes.get("t", base.t), **clean}, (curve,))
    return [Stage(curve, 1), Stage(point, 1, ("final",))], Final(point.key, "model", ("final",))


def _step_config(config: dict[str, Any]) -> MCRConfig:
    from tscray.defenses.base import config_from_dict
    return config_from_dict(MCRConfig, {**config, "t": 0.5})


def step_curve(step: Any, ctx: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The fine-tuned copy and the curve's bend (independent of t)."""
    p, (bd,) = step.params, step.inputs
    cfg = _step_config(p["config"])
    clean, method, evaluate = ctx.defense_env(step)
    tuned, curve = mcr_curve(ctx.load_model(bd, "model"), clean, method, cfg)
    rows = evaluate_curve(curve, p["curve_ts"], bn_loader(clean, cfg), evaluate, stage="curve")
    return {"finetuned": ctx.state(tuned), "bend": curve.bend_state()}, rows


def step_point(step: Any, ctx: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The point at t of a fitted MCR curve."""
    (curve_step,) = step.inputs
    (bd,) = curve_step.inputs
    t = step.params["t"]
    clean, _, evaluate = ctx.defense_env(step)
    curve = ctx.load_curve(curve_step, ctx.load_model(bd, "model"), ctx.load_model(curve_step, "finetuned"))
    point = curve.point(t, bn_loader(clean, _step_config(curve_step.params["config"])))
    return {"model": ctx.state(point)}, [{"stage": "final", "t_curve": t, **evaluate(point)}]


DEFENSES.register("mcr")(Defense("mcr", MCRConfig, run, axes=("t",), methods=("supervised", "simclr"),
                                 plan=Planner(_plan, {"mcr_curve": step_curve, "mcr_point": step_point},
                                              curve_kinds=("mcr_curve",)),
                                 summary="mode connectivity repair: a curve to a fine-tuned copy",
                                 version=2))  # 2: BN refresh merges per-batch moments (curves.update_bn)
