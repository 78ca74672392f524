"""MCR, mode connectivity repair (Zhao et al., 2020): one curve between θadv and a fine-tuned copy."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tscray.curves import BezierCurve, fit
from tscray.defenses.base import (DEFENSES, CleanData, Defense, DefenseResult, Evaluate, Log, check_t,
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


DEFENSES.register("mcr")(Defense("mcr", MCRConfig, run))
