"""NC, Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineer a trigger per class, flag outliers, unlearn.

Sources: the paper; the authors' code (bolunwang/backdoor: ``visualizer.py``, ``mad_outlier_detection.py``,
``gtsrb_visualize_example.py``); BackdoorBench's ``defense/nc.py`` and ``config/defense/nc/cifar10.yaml``.

Mechanism. For every class y, a mask m (H×W, ``tanh(a)/(2+ε)+0.5`` ∈ [0, 1]) and a pattern p (C×H×W, the
same tanh map onto the valid input range ``layers.input_bounds``) are optimised so that
x' = (1−m)·x + m·p is classified as y: loss CE(f(x'), y) + λ·‖m‖₁ with Adam. λ follows NC's schedule, per
class and per epoch over the clean set: after ``patience`` epochs whose reversed attack succeeds on at least
``attack_succ_threshold`` of the images λ is multiplied by ``cost_multiplier``; after ``patience`` failing
epochs it is divided by ``cost_multiplier**1.5``. The kept mask is the smallest-norm one among succeeding
epochs; a class stops early once λ went both up and down and its best norm has not dropped by more than
1 − ``early_stop_threshold`` for ``early_stop_patience`` epochs. Then the MAD anomaly index
|‖m_y‖ − median| / (1.4826·MAD) is computed over the classes' mask norms; a class at or below the median with
index > ``anomaly_threshold`` is flagged. If any class is flagged, a share ``unlearning_ratio`` of the clean
set is stamped with each flagged class's reversed trigger, keeping the TRUE labels, and the model is fine-tuned
on it (the rest stays clean). If none is flagged NC returns the model unchanged (a copy): that is NC's
behaviour (the TSC paper, Appendix K: "NC would check if the model is backdoored before applying its
corresponding unlearning method"), so its ACC equals the input's.

Cost. Reversal costs (classes × images per epoch × epochs) forward/backward passes. All classes are
optimised together: each batch of clean images is stamped with every active class's trigger and sent through
the frozen model in one forward (``class_chunk`` classes per forward bounds the memory; 0 = all). Per-class
Adam over stacked parameters is exactly one Adam per class (Adam is element-wise); a class that stopped early
is frozen. Knobs on the cost: ``reverse_epochs``, ``reverse_batches`` (batches per epoch, 0 = a full pass),
``reverse_batch_size`` (0 = ``batch_size``).

Defaults (``released``: BackdoorBench ``config/defense/nc/cifar10.yaml``): ``nc_epoch`` 80 reverse epochs,
mask lr 0.1 with Adam betas (0.5, 0.9) (BackdoorBench and authors' code), init cost 1e-3, attack success
threshold 98% (authors: 99%), patience 5, cost multiplier 2 (down: 2**1.5, both sources), early stop on with
threshold 0.99 and patience 25 (authors: 5·patience), ε 1e-7, L1 mask norm, anomaly threshold 2 and
consistency constant 1.4826 (both sources), unlearning ratio 0.2, batch 256, unlearning fine-tune SGD lr 0.01,
cosine, 100 epochs (BackdoorBench's generic ``epochs``/``lr``/``lr_scheduler``; momentum 0.9 and weight
decay 5e-4 as this repo's other fine-tuning). ``paper``: the same but 40 unlearning epochs (TSC paper,
Appendix L.2: "unlearning procedure for 40 epochs, utilizing 5% of the training data and applying the
reversed trigger to 20% of these samples", anomaly index threshold 2).

Departures:
- The median is the true median (mean of the two middle values for an even class count), as the authors'
  ``np.median``; BackdoorBench's ``torch.median`` takes the lower middle value.
- A class whose reversed attack never reaches the success threshold keeps its LAST mask; BackdoorBench keeps
  its first-epoch mask, the authors' code keeps none.
- The trigger is mixed in normalised space with the pattern mapped onto the valid normalised range, which
  equals BackdoorBench's mixing in pixel space (normalisation is affine per channel).
- Unlearning stamps the trigger in exact arithmetic on uint8 pixels (rounded); BackdoorBench writes the
  mask and ``mask·pattern`` to PNGs min-max normalised and reads them back. As BackdoorBench, each flagged
  class adds one stamped copy of the unlearning share; the share is a seeded random subset.
- Initial parameters as BackdoorBench (tanh-space 1 for mask and pattern, i.e. 0.88); the authors draw them
  at random. The cost starts at ``init_cost`` as BackdoorBench (the authors start at 0 and set ``init_cost``
  once the attack succeeds).
- The 5% clean set is the defender's ``clean`` data, whatever its size; an epoch is one pass over it (or
  ``reverse_batches`` batches), so a smaller clean set means fewer steps per epoch than BackdoorBench's 2,500
  CIFAR-10 images at batch 256 (10 steps).
- ``check_model`` refuses models with fewer than 3 classes (the MAD test cannot flag anything there) or
  without a locatable output layer (NC needs the class count).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from tscray.data.tensors import ImageData, Loader
from tscray.defenses import layers
from tscray.defenses.base import DEFENSES, CleanData, Defense, DefenseResult, Evaluate, Log
from tscray.methods.base import Method
from tscray.optim import OptimConfig
from tscray.train import train

EPSILON = 1e-7  # keeps tanh(a)/(2+ε)+0.5 strictly inside [0, 1] (both sources)
CONSISTENCY = 1.4826  # MAD → standard deviation of a normal distribution (both sources)
INIT_PARAM = 1.0  # tanh-space initial value of mask and pattern (BackdoorBench: np.ones)


@dataclass(frozen=True)
class NCConfig:
    """Neural Cleanse settings; defaults are BackdoorBench's CIFAR-10 ones (see the module docstring).

    ``reverse_epochs`` (BackdoorBench ``nc_epoch``) is the knob on the reverse-engineering cost: epochs over
    the clean set per class, all classes in parallel; ``reverse_batches`` caps the batches of one such epoch
    (0: a full pass, BackdoorBench; the authors' "step" is NB_SAMPLE/BATCH_SIZE = 1000/32 batches). λ's
    schedule counts these epochs. ``reverse_batch_size``: images per reversal step (0: ``batch_size``, as
    BackdoorBench; ``batch_size`` is also the unlearning batch). ``class_chunk``: classes stamped per
    forward (0 = all).
    """

    RANGES: ClassVar[dict[str, tuple[float, bool, float | None]]] = {"reverse_batch_size": (0, False, None)}

    reverse_epochs: int = 80
    mask_lr: float = 0.1
    mask_betas: tuple[float, float] = (0.5, 0.9)
    init_cost: float = 1e-3
    attack_succ_threshold: float = 0.98
    patience: int = 5
    cost_multiplier: float = 2.0
    early_stop: bool = True
    early_stop_threshold: float = 0.99
    early_stop_patience: int = 25
    reverse_batches: int = 0
    reverse_augment: bool = True
    anomaly_threshold: float = 2.0
    unlearning_ratio: float = 0.2
    unlearn_epochs: int = 100
    unlearn_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.01, momentum=0.9,
                                                                           weight_decay=5e-4))
    class_chunk: int = 0
    reverse_batch_size: int = 0
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("reverse_epochs", "reverse_batches", "unlearn_epochs", "class_chunk", "reverse_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("patience", "early_stop_patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mask_lr", "init_cost", "anomaly_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("attack_succ_threshold", "early_stop_threshold", "unlearning_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.cost_multiplier > 1.0:
            raise ValueError(f"cost_multiplier must be > 1, got {self.cost_multiplier}")
        if len(self.mask_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.mask_betas):
            raise ValueError(f"mask_betas must be two values in [0, 1), got {self.mask_betas}")

    @classmethod
    def preset(cls, name: str = "paper") -> "NCConfig":
        """``released``: BackdoorBench's cifar10.yaml (100 unlearning epochs); ``paper``: the TSC paper's
        Appendix L.2, 40 unlearning epochs, otherwise the same."""
        if name == "released":
            return cls()
        if name == "paper":
            return cls(unlearn_epochs=40)
        raise ValueError(f"unknown NC preset {name!r}; known: paper, released")


# --- the math: small pure functions ---------------------------------------------------------------------


def anomaly_indices(norms: torch.Tensor) -> torch.Tensor:
    """MAD anomaly index of each value: |x − median| / (1.4826 · median|x − median|).

    The median is the true one (mean of the middle pair for an even count), as the authors' ``np.median``.
    With MAD 0, values off the median get +inf and those on it 0."""
    x = norms.double().flatten()
    med = x.quantile(0.5)
    dev = (x - med).abs()
    mad = CONSISTENCY * dev.quantile(0.5)
    if mad == 0:
        return torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev))
    return dev / mad


def flagged_classes(norms: torch.Tensor, threshold: float = 2.0) -> list[int]:
    """Classes on the small-norm side (norm <= median) whose anomaly index exceeds ``threshold``, smallest
    norm first (the authors' and BackdoorBench's ``outlier_detection``)."""
    x = norms.double().flatten()
    idx = anomaly_indices(x)
    small = x <= x.quantile(0.5)
    hits = [int(i) for i in torch.nonzero(small & (idx > threshold)).flatten()]
    return sorted(hits, key=lambda i: float(x[i]))


def small_side_anomaly(norms: torch.Tensor) -> float:
    """The largest anomaly index among classes at or below the median: the smallest norm's index
    (the authors' ``min_mad``)."""
    x = norms.double().flatten()
    return float(anomaly_indices(x)[int(x.argmin())])


def to_unit(param: torch.Tensor) -> torch.Tensor:
    """tanh parametrisation onto [0, 1]: tanh(a) / (2 + ε) + 0.5."""
    return torch.tanh(param) / (2 + EPSILON) + 0.5


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x' = (1 − m)·x + m·p (broadcasting: mask …×1×H×W, pattern …×C×H×W)."""
    return (1 - mask) * x + mask * pattern


def stamp_pixels(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Stamp uint8 images with a mask (H×W in [0, 1]) and a pattern (C×H×W in [0, 1] pixel units)."""
    out = stamp(x.float() / 255.0, mask.to(x.device, torch.float32), pattern.to(x.device, torch.float32))
    return (out * 255.0).round().clamp(0, 255).to(torch.uint8)


# --- NC's cost schedule, one per class -----------------------------------------------------------------


@dataclass
class CostSchedule:
    """NC's dynamic λ of one class (authors' ``Visualizer.visualize``, BackdoorBench's ``Recorder``)."""

    cost: float
    init_cost: float
    multiplier: float
    patience: int
    success: float
    early_stop: bool
    early_stop_threshold: float
    early_stop_patience: int
    reg_best: float = math.inf
    up_counter: int = 0
    down_counter: int = 0
    set_counter: int = 0
    up_flag: bool = False
    down_flag: bool = False
    early_counter: int = 0
    early_reg_best: float = math.inf

    @classmethod
    def of(cls, cfg: NCConfig) -> "CostSchedule":
        return cls(cfg.init_cost, cfg.init_cost, cfg.cost_multiplier, cfg.patience, cfg.attack_succ_threshold,
                   cfg.early_stop, cfg.early_stop_threshold, cfg.early_stop_patience)

    def update(self, acc: float, reg: float) -> tuple[bool, bool]:
        """After one epoch with attack success ``acc`` (fraction) and mean mask norm ``reg``:
        (whether this epoch's mask is the new best, whether the class stops)."""
        succeeded = acc >= self.success
        improved = succeeded and reg < self.reg_best
        if improved:
            self.reg_best = reg
        if self.early_stop:
            if self.reg_best < math.inf:
                if self.reg_best >= self.early_stop_threshold * self.early_reg_best:
                    self.early_counter += 1
                else:
                    self.early_counter = 0
            self.early_reg_best = min(self.early_reg_best, self.reg_best)
            if self.up_flag and self.down_flag and self.early_counter >= self.early_stop_patience:
                return improved, True
        if self.cost == 0 and succeeded:
            self.set_counter += 1
            if self.set_counter >= self.patience:
                self.cost = self.init_cost
                self.up_counter = self.down_counter = 0
                self.up_flag = self.down_flag = False
        else:
            self.set_counter = 0
        if succeeded:
            self.up_counter, self.down_counter = self.up_counter + 1, 0
        else:
            self.up_counter, self.down_counter = 0, self.down_counter + 1
        if self.up_counter >= self.patience:
            self.up_counter, self.up_flag = 0, True
            self.cost *= self.multiplier
        elif self.down_counter >= self.patience:
            self.down_counter, self.down_flag = 0, True
            self.cost /= self.multiplier ** 1.5
        return improved, False


# --- reverse engineering ---------------------------------------------------------------------------------


@dataclass
class Reversed:
    """Reversed triggers of every class: masks K×H×W and patterns K×C×H×W in [0, 1] pixel units, their
    L1 norms, and whether each class's reversed attack ever reached the success threshold."""

    masks: torch.Tensor
    patterns: torch.Tensor
    norms: torch.Tensor
    succeeded: torch.Tensor


def num_classes(model: nn.Module) -> int:
    """The class count: the output size of the model's classifier."""
    return layers.classifier(model).module.out_features


def reverse_engineer(model: nn.Module, loader: Loader, bounds: tuple[torch.Tensor, torch.Tensor], classes: int,
                     cfg: NCConfig, log: Log | None = None) -> Reversed:
    """Optimise a mask and pattern per class on the frozen ``model`` over ``cfg.reverse_epochs`` epochs of
    ``loader``, all classes batched into one forward (``cfg.class_chunk`` at a time)."""
    device = next(model.parameters()).device
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    low, high = (b.to(device) for b in bounds)
    c, h, w = loader.x.shape[1:]
    mask_p = torch.full((classes, 1, h, w), INIT_PARAM, device=device, requires_grad=True)
    pat_p = torch.full((classes, c, h, w), INIT_PARAM, device=device, requires_grad=True)
    opt = torch.optim.Adam([mask_p, pat_p], lr=cfg.mask_lr, betas=cfg.mask_betas)
    sched = [CostSchedule.of(cfg) for _ in range(classes)]
    best_mask = torch.zeros(classes, h, w, device=device)
    best_pat = torch.zeros(classes, c, h, w, device=device)
    succeeded = torch.zeros(classes, dtype=torch.bool)
    active = torch.ones(classes, dtype=torch.bool)
    chunk = cfg.class_chunk or classes
    for epoch in range(cfg.reverse_epochs):
        if not active.any():
            break
        ids = torch.nonzero(active).flatten().tolist()
        hits = torch.zeros(classes, dtype=torch.float64)
        regs = torch.zeros(classes, dtype=torch.float64)
        seen, batches = 0, 0
        costs = torch.tensor([s.cost for s in sched], device=device)
        for b, (x, _) in enumerate(loader):
            if cfg.reverse_batches and b >= cfg.reverse_batches:
                break
            opt.zero_grad(set_to_none=True)
            for start in range(0, len(ids), chunk):
                part = torch.tensor(ids[start:start + chunk], device=device)
                m = to_unit(mask_p[part])  # k×1×H×W
                p = low + (high - low) * to_unit(pat_p[part])  # k×C×H×W
                xs = stamp(x[None], m[:, None], p[:, None]).flatten(0, 1)  # (k·B)×C×H×W
                logits = frozen(xs).view(len(part), x.shape[0], -1)
                target = part[:, None].expand(-1, x.shape[0])
                ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(target)
                reg = m.abs().sum((1, 2, 3))
                (ce.mean(1) + costs[part] * reg).sum().backward()
                hits[part.cpu()] += (logits.argmax(2) == target).sum(1).double().cpu()
                regs[part.cpu()] += reg.detach().double().cpu()
            keep = (mask_p.detach()[~active.to(device)].clone(), pat_p.detach()[~active.to(device)].clone())
            opt.step()
            with torch.no_grad():  # Adam's momentum would still move classes that stopped: pin them
                mask_p[~active.to(device)] = keep[0]
                pat_p[~active.to(device)] = keep[1]
            seen, batches = seen + x.shape[0], batches + 1
        with torch.no_grad():
            for k in ids:
                improved, stop = sched[k].update(float(hits[k]) / seen, float(regs[k]) / batches)
                if improved or not succeeded[k]:  # best so far, or the last while none succeeded
                    best_mask[k] = to_unit(mask_p[k, 0])
                    best_pat[k] = to_unit(pat_p[k])
                succeeded[k] |= improved
                if stop:
                    active[k] = False
        if log and (epoch + 1) % max(1, cfg.reverse_epochs // 10) == 0:
            log(f"nc: reverse epoch {epoch + 1}/{cfg.reverse_epochs}, active {int(active.sum())}, best norms "
                + ",".join(f"{s.reg_best:.1f}" for s in sched))
    norms = best_mask.abs().sum((1, 2))
    return Reversed(best_mask.cpu(), best_pat.cpu(), norms.cpu(), succeeded)


# --- unlearning ----------------------------------------------------------------------------------------


def unlearning_set(data: ImageData, triggers: Sequence[tuple[torch.Tensor, torch.Tensor]], ratio: float,
                   seed: int) -> tuple[ImageData, torch.Tensor]:
    """The clean set with a seeded random share ``ratio`` stamped with each trigger (mask H×W, pattern C×H×W
    in [0, 1]), TRUE labels kept: the unstamped rest, then one stamped copy of the share per trigger (as
    BackdoorBench). Also returns the indices (into ``data``) of the stamped share."""
    n = len(data)
    keep_n = int(n * (1 - ratio))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep, share = order[:keep_n], order[keep_n:]
    xs, ys = [data.x[keep]], [data.y[keep]]
    for mask, pattern in triggers:
        xs.append(stamp_pixels(data.x[share], mask, pattern))
        ys.append(data.y[share])
    return ImageData(torch.cat(xs), torch.cat(ys)), share


# --- the defense ------------------------------------------------------------------------------------------


def check_model(model: nn.Module) -> None:
    """NC scans every class of a classifier: it needs the output layer and at least 3 classes (with 2 the
    MAD anomaly index of the smaller norm is always 1/1.4826)."""
    k = num_classes(model)
    if k < 3:
        raise layers.UnsupportedModel(f"NC's MAD outlier test needs at least 3 classes; the model has {k}")


def run(model: nn.Module, clean: CleanData, method: Method, cfg: NCConfig,
        evaluate: Evaluate | None = None, log: Log | None = None) -> DefenseResult:
    """Reverse-engineer a trigger per class, flag small-norm outliers, unlearn their triggers (or return an
    unchanged copy when none is flagged)."""
    check_model(model)
    device = next(model.parameters()).device
    loader = Loader(clean.data, clean.prep, cfg.reverse_batch_size or cfg.batch_size, shuffle=True,
                    augment=cfg.reverse_augment, seed=cfg.seed, device=device)
    rev = reverse_engineer(model, loader, layers.input_bounds(clean.prep, device), num_classes(model), cfg, log)
    flagged = flagged_classes(rev.norms, cfg.anomaly_threshold)
    index = small_side_anomaly(rev.norms)
    purified = copy.deepcopy(model)
    if flagged:
        data, _ = unlearning_set(clean.data, [(rev.masks[k], rev.patterns[k]) for k in flagged],
                                 cfg.unlearning_ratio, cfg.seed + 1)
        tune = Loader(data, clean.prep, cfg.batch_size, shuffle=True, augment=True, seed=cfg.seed + 2,
                      device=device)
        train(purified, tune, method, cfg.unlearn_epochs, cfg.unlearn_optim)
    extra = {"nc_flagged": ",".join(str(k) for k in flagged), "nc_anomaly_index": index,
             "nc_mask_norms": ",".join(f"{float(v):.2f}" for v in rev.norms)}
    if log:
        log(f"nc: mask norms {extra['nc_mask_norms']}; anomaly index {index:.2f}; flagged "
            f"{extra['nc_flagged'] or 'none (model returned unchanged)'}")
    records = [{"defense": "nc", "round": 1, "stage": "final", **(evaluate(purified) if evaluate else {}), **extra}]
    return DefenseResult(purified, [purified], records)


DEFENSES.register("nc")(Defense("nc", NCConfig, run,
                                columns={"nc_flagged": "string", "nc_anomaly_index": "float",
                                         "nc_mask_norms": "string"},
                                check_model=check_model,
                                summary="Neural Cleanse: per-class trigger reversal, MAD outlier test, unlearning"))
