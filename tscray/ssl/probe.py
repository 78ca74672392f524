"""Downstream evaluation of an encoder: linear probe (ACC/ASR) and a weighted kNN monitor.

The encoder is frozen (eval mode, no gradients); features are its ``features(x)`` (the backbone, as
BadEncoder, CTRL and the TSC paper probe the encoder without the projection head) or its output when
it has no ``features``. Features are L2-normalised (as BadEncoder's downstream classifiers see them).

- Linear probe: one Linear layer trained with Adam and cross-entropy on the downstream train features
  (seeded, ``epochs`` passes at ``batch_size``); ACC on the downstream test set, ASR on triggered test
  images whose true class is not the target (BackdoorBench's protocol, as the supervised metrics).
- kNN monitor (the SimCLR/BadEncoder/CTRL monitor): cosine similarity to a memory bank of train features,
  the ``k`` nearest vote with weight exp(sim / τ) (k 200, τ 0.5 as BadEncoder's ``knn_k``/``knn_t``).

:class:`ProbeEvaluator` is a callable ``model -> {"acc", "asr", "knn_acc", "knn_asr", ...}``, usable
wherever defenses take an ``Evaluate`` (``tsc.run(..., evaluate=probe)``). When the downstream set lacks
the target class (Tables 18-19 of the paper), :func:`add_target_class` appends the pre-training set's
target-class images as a new class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from tscray.data.tensors import ImageData, Loader, Preprocess
from tscray.nnutil import eval_mode

Trigger = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def extract(model: nn.Module, data: ImageData, prep: Preprocess, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised encoder features of ``data`` (eval mode, no augmentation), on the model's device."""
    device = next(model.parameters()).device
    feats = getattr(model, "features", model)
    out = []
    with eval_mode(model):
        for x, _ in Loader(data, prep, batch_size, device=device):
            out.append(F.normalize(feats(x).flatten(1).float(), dim=1))
    return torch.cat(out)


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 100,
                 lr: float = 1e-2, batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> nn.Linear:
    """A seeded linear classifier on fixed features (Adam, cross-entropy, cosine learning rate)."""
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():
        bound = 1.0 / features.shape[1] ** 0.5
        head.weight.copy_((torch.rand(head.weight.shape, generator=gen) * 2 - 1) * bound)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    n = features.shape[0]
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen).to(features.device)
            for i in range(0, n, batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(head(features[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.5, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN labels of L2-normalised ``query`` rows against a normalised memory ``bank``."""
    k = min(k, bank.shape[0])
    preds = []
    for i in range(0, query.shape[0], chunk):
        sim = query[i:i + chunk] @ bank.T
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=query.device)
        votes.scatter_add_(1, bank_labels[idx], (w / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def add_target_class(downstream: ImageData, source: ImageData, source_target: int, n: int | None = None,
                     label: int | None = None) -> tuple[ImageData, int]:
    """``downstream`` plus (the first ``n``) target-class images of the pre-training ``source`` set under a
    new label (default: one past the largest downstream label). Returns the set and that label."""
    idx = torch.nonzero(source.y == source_target).flatten()
    if n is not None:
        idx = idx[:n]
    if len(idx) == 0:
        raise ValueError(f"the source set has no images of class {source_target}")
    new = int(downstream.y.max()) + 1 if label is None else label
    x = torch.cat([downstream.x, source.x[idx]])
    y = torch.cat([downstream.y, torch.full((len(idx),), new, dtype=torch.long)])
    return ImageData(x, y), new


@dataclass
class ProbeEvaluator:
    """``model -> metrics`` on a downstream task: linear-probe ACC/ASR and kNN ACC/ASR (percentages).

    ``train``/``test`` are the downstream sets (labels in [0, num_classes)), ``prep`` the encoder's input
    normalisation, ``trigger`` the attack's test-time trigger on uint8 images (None: no ASR), ``target``
    the downstream label the attack aims at."""

    train: ImageData
    test: ImageData
    prep: Preprocess
    trigger: Trigger | None = None
    target: int = 0
    epochs: int = 100
    lr: float = 1e-2
    probe_batch_size: int = 256
    knn_k: int = 200
    knn_t: float = 0.5
    seed: int = 0
    batch_size: int = 512

    def __post_init__(self) -> None:
        self.num_classes = int(max(self.train.y.max(), self.test.y.max())) + 1
        if not 0 <= self.target < self.num_classes:
            raise ValueError(f"target {self.target} outside the downstream labels [0, {self.num_classes})")
        self.poisoned: ImageData | None = None
        if self.trigger is not None:
            keep = self.test.y != self.target
            if not keep.any():
                raise ValueError("no downstream test image outside the target class")
            x = self.trigger(self.test.x[keep])
            self.poisoned = ImageData(x, torch.full((int(keep.sum()),), self.target, dtype=torch.long))

    def __call__(self, model: nn.Module) -> dict[str, float]:
        dev = next(model.parameters()).device
        f_train = extract(model, self.train, self.prep, self.batch_size)
        f_test = extract(model, self.test, self.prep, self.batch_size)
        y_train, y_test = self.train.y.to(dev), self.test.y.to(dev)
        head = train_linear(f_train, y_train, self.num_classes, self.epochs, self.lr, self.probe_batch_size,
                            seed=self.seed)
        with torch.no_grad():
            out = {"acc": _pct(head(f_test).argmax(1) == y_test),
                   "knn_acc": _pct(knn_predict(f_train, y_train, f_test, self.num_classes, self.knn_k,
                                               self.knn_t) == y_test)}
            if self.poisoned is not None:
                f_bd = extract(model, self.poisoned, self.prep, self.batch_size)
                out["asr"] = _pct(head(f_bd).argmax(1) == self.target)
                out["knn_asr"] = _pct(knn_predict(f_train, y_train, f_bd, self.num_classes, self.knn_k,
                                                  self.knn_t) == self.target)
        return out


def _pct(hits: torch.Tensor) -> float:
    return 100.0 * float(hits.float().mean())
