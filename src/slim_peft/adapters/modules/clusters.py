"""SLIM's sliding clusters of the training distribution: centres and per-channel
variances moved by momentum towards each training batch's tokens, and the normalised distance rho of a token to
its nearest centre that weight yielding subtracts from the LoRA experts' router logits."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

EPS = 1e-6


class SlidingClusters(nn.Module):
    """Centres c_j and per-channel variances v_j of the training tokens, moved by momentum in training mode
    and frozen in eval mode. Buffers: saved with the adapter."""

    def __init__(self, num_clusters: int, dim: int, momentum: float, device: torch.device | None = None) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("centres", torch.zeros(num_clusters, dim, device=device))
        self.register_buffer("variances", torch.ones(num_clusters, dim, device=device))
        self.register_buffer("tau", torch.ones((), device=device))  # running mean of rho (calibration)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self._ready = False  # host mirror of `initialized`, so the hot path does not synchronise

    def ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def nearest(self, h: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centre (Euclidean): argmin of ||c||^2 - 2 h.c, one T x C matmul."""
        c = self.centres
        return torch.addmm(c.square().sum(1), h, c.t(), alpha=-2.0).argmin(dim=-1)

    def deviation(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """|h - c_k| (T x d), a fresh tensor the caller may modify."""
        return (h - self.centres.index_select(0, k)).abs_()

    def rho_from(self, dev: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """rho from |h - c_k|: max over channels of |h - c_k| / sqrt(v_k + eps)."""
        inv_std = torch.rsqrt(self.variances + EPS)  # C x d, not T x d
        return (dev * inv_std.index_select(0, k)).amax(dim=-1)

    def rho(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """rho(h) = max over channels |h - c_k| / sqrt(v_k + eps)."""
        return self.rho_from(self.deviation(h, k), k)

    @torch.no_grad()
    def initialize(self, h: torch.Tensor, w: torch.Tensor) -> None:
        """Centres: random distinct valid tokens of the first batch; variances: that batch's per-channel
        variance; tau: the batch's mean rho under these clusters. Reads one count on the host, once."""
        C = self.centres.shape[0]
        n_valid = int(w.sum())
        pick = torch.multinomial(w + 1e-12 * (n_valid == 0), C, replacement=n_valid < C)
        mean = (h * w[:, None]).sum(0) / w.sum().clamp(min=1)
        var = ((h - mean) ** 2 * w[:, None]).sum(0) / w.sum().clamp(min=1)
        self.centres.copy_(h[pick])
        self.variances.copy_(var.expand_as(self.variances))
        rho = self.rho(h, self.nearest(h))
        self.tau.copy_((rho * w).sum() / w.sum().clamp(min=1))
        self.initialized.fill_(True)
        self._ready = True

    @torch.no_grad()
    def update(self, h: torch.Tensor, w: torch.Tensor, k: torch.Tensor, rho: torch.Tensor,
               dev: torch.Tensor | None = None) -> None:
        """c <- (1 - m) c + m mean(h), v <- (1 - m) v + m mean((h - c)^2) per non-empty cluster; tau <-
        (1 - m) tau + m mean(rho). Sums are all-reduced under DDP so every process keeps the same state.
        `dev` = |h - c_k| when the caller has it (it is squared in place). No host synchronisation."""
        C, d = self.centres.shape
        dev = self.deviation(h, k) if dev is None else dev
        onehot = h.new_zeros(k.shape[0], C).scatter_(1, k[:, None], w[:, None].to(h.dtype))  # T x C, w at k
        stats = torch.cat([
            onehot.sum(0)[:, None],  # counts
            onehot.t() @ h,  # sums
            onehot.t() @ dev.square_(),  # squared deviations
        ], dim=1)
        rho_stats = torch.stack([(rho * w).sum(), w.sum()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            dist.all_reduce(rho_stats)
        count, sums, sq = stats[:, :1], stats[:, 1:1 + d], stats[:, 1 + d:]
        m = self.momentum
        has = count > 0
        n = count.clamp(min=1)
        self.centres.copy_(torch.where(has, (1 - m) * self.centres + m * sums / n, self.centres))
        self.variances.copy_(torch.where(has, (1 - m) * self.variances + m * sq / n, self.variances))
        mean_rho = rho_stats[0] / rho_stats[1].clamp(min=1)
        self.tau.copy_(torch.where(rho_stats[1] > 0, (1 - m) * self.tau + m * mean_rho, self.tau))
