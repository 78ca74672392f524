"""Exact streaming Pearson cross-correlation between two sets of units.

Batches of any size are merged with the parallel (Chan et al.) update of means and
co-moments in float64, so the result equals the correlation of all rows at once, not an
average of per-batch statistics. A unit with zero variance has correlation 0 with
everything (never NaN, which would make the assignment solver raise).
"""

from __future__ import annotations

import torch


def as_units(x: torch.Tensor) -> torch.Tensor:
    """Rows are observations, columns units: conv maps (N, C, H, W) become (N*H*W, C)."""
    if x.dim() == 2:
        return x
    if x.dim() < 2:
        raise ValueError(f"activation of shape {tuple(x.shape)} has no unit axis")
    return x.transpose(1, -1).reshape(-1, x.shape[1])


class CrossCorrelation:
    """Accumulates the cross-correlation matrix between units of A (rows) and B (columns)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_a: torch.Tensor | None = None
        self.mean_b: torch.Tensor | None = None
        self.m2_a: torch.Tensor | None = None
        self.m2_b: torch.Tensor | None = None
        self.c_ab: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add a batch of paired observations: ``a`` (N, Ca) and ``b`` (N, Cb)."""
        a, b = as_units(a).double(), as_units(b).double()
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"paired activations differ in rows: {a.shape[0]} vs {b.shape[0]}")
        m = a.shape[0]
        if m == 0:
            return
        mu_a, mu_b = a.mean(0), b.mean(0)
        da, db = a - mu_a, b - mu_b
        m2_a, m2_b, c_ab = (da * da).sum(0), (db * db).sum(0), da.T @ db
        if self.n == 0:
            self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.c_ab = mu_a, mu_b, m2_a, m2_b, c_ab
            self.n = m
            return
        acc_mean_a, acc_mean_b, acc_m2_a, acc_m2_b, acc_c_ab = self._state()
        n = self.n + m
        delta_a, delta_b = mu_a - acc_mean_a, mu_b - acc_mean_b
        w = self.n * m / n
        self.m2_a = acc_m2_a + m2_a + delta_a * delta_a * w
        self.m2_b = acc_m2_b + m2_b + delta_b * delta_b * w
        self.c_ab = acc_c_ab + c_ab + torch.outer(delta_a, delta_b) * w
        self.mean_a = acc_mean_a + delta_a * (m / n)
        self.mean_b = acc_mean_b + delta_b * (m / n)
        self.n = n

    def _state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean_a, mean_b, m2_a, m2_b, c_ab): all set together by the first non-empty update."""
        mean_a, mean_b, m2_a, m2_b, c_ab = self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.c_ab
        assert (mean_a is not None and mean_b is not None and m2_a is not None and m2_b is not None
                and c_ab is not None), "no observations accumulated"
        return mean_a, mean_b, m2_a, m2_b, c_ab

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """The (Ca, Cb) Pearson correlation matrix; rows/columns of constant units are 0."""
        if self.n == 0:
            raise ValueError("no observations accumulated")
        mean_a, mean_b, m2_a, m2_b, c_ab = self._state()
        std_a, std_b = m2_a.clamp_min(0).sqrt(), m2_b.clamp_min(0).sqrt()
        dead_a = std_a <= eps * (1 + mean_a.abs()) * self.n ** 0.5
        dead_b = std_b <= eps * (1 + mean_b.abs()) * self.n ** 0.5
        corr = c_ab / torch.outer(std_a.where(~dead_a, 1.0), std_b.where(~dead_b, 1.0))
        corr[dead_a, :] = 0.0
        corr[:, dead_b] = 0.0
        return corr.clamp(-1.0, 1.0)
