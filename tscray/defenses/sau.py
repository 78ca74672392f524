"""SAU: Shared Adversarial Unlearning (Wei, Zhang, Zha and Wu, NeurIPS 2023, "Shared Adversarial Unlearning:
Backdoor Mitigation by Unlearning Shared Adversarial Examples").

Sources: the paper; BackdoorBench's ``defense/sau.py`` (the first author's official implementation, class
``Shared_PGD`` and ``sau.mitigation``) with ``config/defense/sau/config.yaml`` (its CIFAR-10 defaults; the
repository has no separate ``cifar10.yaml`` for SAU) and ``utils/aggregate_block/train_settings_generate.py``
(the optimiser); the TSC paper's appendix on baselines (5 PGD iterations, L∞ bound 0.2, adversarial lr 0.2,
100 epochs on CIFAR-10).

Per batch of clean images (x, y), with h the model being purified and h₀ the frozen original:

1. Shared PGD (``Shared_PGD.attack``), both models in eval mode: δ starts at +ε (``pgd_init: max``), then
   ``pgd_steps`` signed-gradient descent steps of size ``pgd_lr`` on
   β₁·L_adv + β₂·L_share, where L_adv = -(Σ CE(h(x+δ), y) over samples h is not yet fooled on + the same for
   h₀) / 2N ("fooled" = the prediction differs from the model's own clean prediction) and L_share = Σ JS(h(x+δ)
   ‖ h₀(x+δ)) / N over samples not yet *shared* (both fooled, to the same class); δ is projected onto the
   L∞ ball after each step; it stops early once every sample is shared.
2. Unlearning (``outer_steps`` updates): λ₁·CE(h(x), y) + λ₂·CE(h(x+δ), y) + λ₃·L_sar, where L_sar is,
   over the samples whose adversarial example fools h₀ (prediction ŷ₀ ≠ y and ŷ₀ ≠ h₀'s clean prediction),
   -log(1 - p_h(ŷ₀ | x+δ)) (BackdoorBench averages two numerically different forms of it, with clamps at
   0.1% / 99.9%), summed and divided by N: it is large when h shares h₀'s wrong prediction and near zero
   when h predicts something else.

Defaults (``paper`` = ``released``): BackdoorBench's config.yaml: 100 rounds (epochs), batch 256, Adam lr 1e-4
(betas 0.9/0.999, weight decay 0, amsgrad, as ``argparser_opt_scheduler`` builds it), L∞ bound 0.2 and step 0.2
in pixel units, 5 PGD steps, init ``max``, β₁ 0.01, β₂ 1, λ₁ 1, λ₂ 0, λ₃ 1, one outer step, BN frozen
(``train_mode`` false: the model stays in eval mode while unlearning), no augmentation (SAU's loader uses the
test transform). The TSC paper's appendix agrees (5 iterations, bound 0.2, lr 0.2, 100 epochs) except for
one weight: its "λ1 = λ2 = λ4 = 1 and λ3 = 0.1" are the SAU paper's four weights (NeurIPS 2023, Section 5:
λ1 = λ2 = λ4 = 1, λ3 = 0.01), whose λ3 is BackdoorBench's β₁ 0.01 (``beta_adv`` here). The TSC appendix's
0.1 is ten times that, a typo or a change it does not explain; the SAU paper's and BackdoorBench's 0.01 is
used (``--set beta_adv=0.1`` runs the appendix's).

Departures:
- Adversarial images are clamped to valid pixels (``layers.input_bounds``) after every PGD step;
  BackdoorBench leaves that clip commented out ("not necessary for backdoor defense").
- PGD runs on normalised inputs with the pixel-space bound and step divided by the per-channel std: the same
  attack, since the std is positive (BackdoorBench de-normalises, adds δ, re-normalises).
- The learning rate is constant by default (``schedule="constant"``): BackdoorBench builds a cosine scheduler
  for SAU but never steps it. Here ``optim.schedule`` is honoured, stepped once per epoch.
- Only the L∞ norm is implemented (BackdoorBench's default; it also has L1/L2/"Reg").
- The clean set is the defender's ``clean`` as given (BackdoorBench draws a random 5% itself).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from tscray.defenses.base import DEFENSES, CleanData, Defense, DefenseResult, Evaluate, Log
from tscray.defenses.layers import input_bounds
from tscray.methods.base import Method
from tscray.nnutil import eval_mode
from tscray.optim import OptimConfig

PGD_INITS = ("zero", "random", "max", "min")


@dataclass(frozen=True)
class SAUConfig:
    """SAU recipe; defaults are BackdoorBench's ``config/defense/sau/config.yaml`` (CIFAR-10), which the TSC
    paper's appendix follows (5 PGD steps, bound 0.2, adversarial lr 0.2, 100 epochs)."""

    epochs: int = 100
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-4, weight_decay=0.0,
                                                                   schedule="constant"))
    amsgrad: bool = True
    pgd_steps: int = 5
    pgd_eps: float = 0.2
    pgd_lr: float = 0.2
    pgd_init: str = "max"
    beta_adv: float = 0.01
    beta_share: float = 1.0
    lmd_clean: float = 1.0
    lmd_adv: float = 0.0
    lmd_shared: float = 1.0
    outer_steps: int = 1
    train_mode: bool = False
    augment: bool = False
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "pgd_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("outer_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.pgd_eps <= 1.0:
            raise ValueError(f"pgd_eps must be in [0, 1] (pixel units), got {self.pgd_eps}")
        if self.pgd_lr <= 0:
            raise ValueError(f"pgd_lr must be > 0, got {self.pgd_lr}")
        if self.pgd_init not in PGD_INITS:
            raise ValueError(f"pgd_init must be one of {PGD_INITS}, got {self.pgd_init!r}")
        for name in ("beta_adv", "beta_share", "lmd_clean", "lmd_adv", "lmd_shared"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str = "paper") -> "SAUConfig":
        """``paper`` and ``released``: BackdoorBench's defaults (the TSC paper's settings agree)."""
        if name in ("paper", "released"):
            return cls()
        raise ValueError(f"unknown sau preset {name!r}; known: paper, released")


# --- the math: pure functions of logits ------------------------------------------------------------------


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence of two softmax distributions (probabilities clamped at 1e-8)."""
    p = F.softmax(logits_a, dim=1).clamp(min=1e-8)
    q = F.softmax(logits_b, dim=1).clamp(min=1e-8)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log())).sum(1) + 0.5 * (q * (q.log() - m.log())).sum(1)


def shared_masks(adv_logits: torch.Tensor, adv_logits_ref: torch.Tensor, clean_pred: torch.Tensor,
                 clean_pred_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h fooled, h₀ fooled, shared): fooled = the adversarial prediction differs from the model's clean one;
    shared = both fooled to the same class."""
    pred, pred_ref = adv_logits.argmax(1), adv_logits_ref.argmax(1)
    fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
    return fooled, fooled_ref, fooled & fooled_ref & (pred == pred_ref)


def pgd_objective(adv_logits: torch.Tensor, adv_logits_ref: torch.Tensor, y: torch.Tensor,
                  clean_pred: torch.Tensor, clean_pred_ref: torch.Tensor, beta_adv: float,
                  beta_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared-PGD loss that δ *descends* (β₁·L_adv + β₂·L_share) and the shared mask.

    L_adv = -(Σ CE over samples h is not fooled on + the same for h₀) / 2N pushes both models off y;
    L_share = Σ JS(h ‖ h₀) / N over samples not yet shared pulls their adversarial predictions together."""
    n = y.shape[0]
    fooled, fooled_ref, shared = shared_masks(adv_logits, adv_logits_ref, clean_pred, clean_pred_ref)
    ce = F.cross_entropy(adv_logits, y, reduction="none")
    ce_ref = F.cross_entropy(adv_logits_ref, y, reduction="none")
    loss_adv = -((ce * (~fooled)).sum() + (ce_ref * (~fooled_ref)).sum()) / (2 * n)
    loss_share = (js_divergence(adv_logits, adv_logits_ref) * (~shared)).sum() / n
    return beta_adv * loss_adv + beta_share * loss_share, shared


def shared_unlearning_loss(adv_logits: torch.Tensor, adv_logits_ref: torch.Tensor,
                           clean_logits_ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L_sar: over the samples whose adversarial example fools the original h₀ (ŷ₀ ≠ y and ŷ₀ ≠ h₀'s clean
    prediction), -log(1 - p_h(ŷ₀)) summed and divided by the batch size — positive when the current model
    h shares h₀'s wrong prediction, ~0.001 when h predicts another class, 0 when h₀ is not fooled.

    As BackdoorBench: the mean of -log(1e-6 + min(Σ_{k≠ŷ₀} p_k, 0.999)) and -log(1 + 1e-6 - max(p_ŷ₀, 0.001)),
    two forms of the same quantity that behave differently in floating point."""
    pred_ref = adv_logits_ref.argmax(1)
    poison = (pred_ref != y) & (pred_ref != clean_logits_ref.argmax(1))
    if not bool(poison.any()):
        return adv_logits.sum() * 0.0
    p = F.softmax(adv_logits, dim=1)
    one_hot = F.one_hot(pred_ref, num_classes=adv_logits.shape[1]).to(p.dtype)
    pos = (p * one_hot).sum(1)[poison]
    neg = (p * (1 - one_hot)).sum(1)[poison]
    total = -torch.log(1e-6 + neg.clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - pos.clamp(min=0.001)).sum()
    return total / 2 / y.shape[0]


# --- shared PGD and one unlearning step ----------------------------------------------------------------------


def _init_delta(x: torch.Tensor, eps_pixels: float, std: torch.Tensor, init: str,
                gen: torch.Generator) -> torch.Tensor:
    """BackdoorBench's PGD start in pixel units (zero, +ε, -ε or uniform [0, 1)), converted to inputs;
    :func:`project` then clips it to the ball."""
    if init == "zero":
        pixels = torch.zeros_like(x)
    elif init == "max":
        pixels = torch.full_like(x, eps_pixels)
    elif init == "min":
        pixels = torch.full_like(x, -eps_pixels)
    else:
        pixels = torch.rand(x.shape, generator=gen).to(x.device, x.dtype)
    return pixels / std


def project(x: torch.Tensor, delta: torch.Tensor, eps: torch.Tensor, low: torch.Tensor,
            high: torch.Tensor) -> torch.Tensor:
    """δ clamped to the L∞ ball of per-channel radius ``eps`` and so that x + δ stays in [low, high]."""
    delta = torch.maximum(torch.minimum(delta, eps), -eps)
    return torch.maximum(torch.minimum(x + delta, high), low) - x


def shared_pgd(model: nn.Module, ref: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SAUConfig,
               std: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared adversarial examples x + δ against ``model`` and ``ref`` (both evaluated in eval mode), and the
    shared mask at the last step. ``std`` (1, C, 1, 1) converts the pixel-unit bound and step to inputs."""
    eps, step = cfg.pgd_eps / std, cfg.pgd_lr / std
    with eval_mode(model, ref):
        with torch.no_grad():
            clean_pred, clean_pred_ref = model(x).argmax(1), ref(x).argmax(1)
        delta = project(x, _init_delta(x, cfg.pgd_eps, std, cfg.pgd_init, gen), eps, low, high)
        shared = torch.zeros_like(y, dtype=torch.bool)
        for _ in range(cfg.pgd_steps):
            delta.requires_grad_(True)
            xa = x + delta
            loss, shared = pgd_objective(model(xa), ref(xa), y, clean_pred, clean_pred_ref, cfg.beta_adv,
                                         cfg.beta_share)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = project(x, delta - step * grad.sign(), eps, low, high)
            if bool(shared.all()):
                break
    return (x + delta).detach(), shared


def unlearn_step(model: nn.Module, ref: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                 opt: torch.optim.Optimizer, cfg: SAUConfig) -> dict[str, float]:
    """One update of ``model`` on λ₁·CE(clean) + λ₂·CE(adversarial) + λ₃·L_sar; ``ref`` only evaluated."""
    flags = [m.training for m in model.modules()]
    model.train(cfg.train_mode)
    try:
        logits, adv_logits = model(torch.cat([x, x_adv])).split(x.shape[0])
    finally:
        for m, f in zip(model.modules(), flags):
            m.train(f)
    with torch.no_grad(), eval_mode(ref):
        clean_ref, adv_ref = ref(x), ref(x_adv)
    loss_cl = F.cross_entropy(logits, y)
    loss_at = F.cross_entropy(adv_logits, y)
    loss_sar = shared_unlearning_loss(adv_logits, adv_ref, clean_ref, y)
    loss = cfg.lmd_clean * loss_cl + cfg.lmd_adv * loss_at + cfg.lmd_shared * loss_sar
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss": float(loss.detach()), "clean": float(loss_cl.detach()), "shared": float(loss_sar.detach())}


def build_optimizer(cfg: SAUConfig, params: list[nn.Parameter]
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``cfg.optim``'s optimiser and per-epoch schedule, with Adam's amsgrad as BackdoorBench builds it."""
    opt, sched = cfg.optim.build(params, cfg.epochs)
    if isinstance(opt, torch.optim.Adam):
        for group in opt.param_groups:
            group["amsgrad"] = cfg.amsgrad
    return opt, sched


def sau(model: nn.Module, clean: CleanData, cfg: SAUConfig, log: Log | None = None) -> tuple[nn.Module, float]:
    """Purify a copy of ``model`` by shared adversarial unlearning; returns it and the fraction of clean
    samples whose shared PGD ended shared in the last epoch."""
    device = next(model.parameters()).device
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    tuned = copy.deepcopy(model).eval()  # BackdoorBench: eval mode throughout unless train_mode
    low, high = input_bounds(clean.prep, device)
    std = torch.tensor(clean.prep.std, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    opt, sched = build_optimizer(cfg, [p for p in tuned.parameters() if p.requires_grad])
    loader = clean.loader(cfg.batch_size, cfg.seed, shuffle=True, augment=cfg.augment)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rate = float("nan")
    for epoch in range(cfg.epochs):
        shared_n, seen, stats = 0, 0, {}
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            x_adv, shared = shared_pgd(tuned, ref, x, y, cfg, std, low, high, gen)
            for _ in range(cfg.outer_steps):
                stats = unlearn_step(tuned, ref, x, x_adv, y, opt, cfg)
            shared_n, seen = shared_n + int(shared.sum()), seen + y.shape[0]
        sched.step()
        rate = shared_n / max(1, seen)
        if log and (epoch + 1) % max(1, cfg.epochs // 10) == 0:
            log(f"sau: epoch {epoch + 1}/{cfg.epochs}, shared {rate:.3f}, "
                + ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    return tuned, rate


def run(model: nn.Module, clean: CleanData, method: Method, cfg: SAUConfig,
        evaluate: Evaluate | None = None, log: Log | None = None) -> DefenseResult:
    """Shared adversarial unlearning of a copy of the model against the frozen original."""
    purified, rate = sau(model, clean, cfg, log)
    record = {"defense": "sau", "round": 1, "stage": "final", **(evaluate(purified) if evaluate else {}),
              "sau_shared_rate": rate}
    if log:
        log(f"sau: {record}")
    return DefenseResult(purified, [purified], [record])


DEFENSES.register("sau")(Defense("sau", SAUConfig, run, columns={"sau_shared_rate": "float"}, check_model=None,
                                 summary="shared adversarial unlearning: unlearn PGD examples both models share"))
