"""SLIM's sliding clusters of the training distribution: centres and per-channel
variances moved by momentum towards each training batch's tokens, and the normalised distance rho of a token to
its nearest centre that weight yielding subtracts from the LoRA experts' router logits.

A forward pass reads the state and only accumulates its sums (`accumulate`); `apply_pending` moves the state
once per optimizer step (see `statistics.py`: gradient checkpointing and DDP)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from .caching import DerivedCache
from .statistics import all_reduce_sum_, is_distributed

EPS = 1e-6
UNCOMMITTED_WARNING = 256  # training forwards without `apply_pending` after which a custom loop is warned


class SlidingClusters(nn.Module):
    """Centres c_j and per-channel variances v_j of the training tokens, moved by momentum in training mode
    and frozen in eval mode. Buffers: saved with the adapter. `seed` fixes which tokens of the first batch
    become the centres (the same on every process, and independent of the global RNG, so that a
    checkpointed recompute draws the same dropout and merge masks as the first forward)."""

    def __init__(self, num_clusters: int, dim: int, momentum: float, device: torch.device | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        self.momentum = momentum
        self.seed = seed
        self.register_buffer("centres", torch.zeros(num_clusters, dim, device=device))
        self.register_buffer("variances", torch.ones(num_clusters, dim, device=device))
        self.register_buffer("tau", torch.ones((), device=device))  # running mean of rho (calibration)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool, device=device))
        self._ready = False  # host mirror of `initialized`, so the hot path does not synchronise
        # Not buffers: DDP broadcasts buffers from rank 0 at every forward, which would overwrite a process's
        # own sums between accumulated micro-batches.
        self._pending: torch.Tensor | None = None  # C x (1 + 2 d): counts, sums of h, sums of (h - c_k)^2
        self._pending_rho: torch.Tensor | None = None  # (sum of rho, number of tokens)
        self._pending_forwards = 0
        self._derived_cache = DerivedCache()

    def ready(self) -> bool:
        if not self._ready:
            self._ready = bool(self.initialized)
        return self._ready

    def _derived(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(||c||^2 per centre, 1 / sqrt(v + eps)), C and C x d: recomputed while the state can move (training,
        autograd), kept in inference while the buffers are unchanged (one fewer pass over them per routing of a
        decoded token)."""
        c, v = self.centres, self.variances

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            return c.square().sum(1), torch.rsqrt(v + EPS)

        if self.training or torch.is_grad_enabled():
            return build()
        return self._derived_cache.get((c, v), build)

    def nearest(self, h: torch.Tensor) -> torch.Tensor:
        """Index of the nearest centre (Euclidean): argmin of ||c||^2 - 2 h.c, one T x C matmul."""
        return torch.addmm(self._derived()[0], h, self.centres.t(), alpha=-2.0).argmin(dim=-1)

    def deviation(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """|h - c_k| (T x d), a fresh tensor the caller may modify."""
        return (h - self.centres.index_select(0, k)).abs_()

    def rho_from(self, dev: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """rho from |h - c_k|: max over channels of |h - c_k| / sqrt(v_k + eps)."""
        inv_std = self._derived()[1]  # C x d, not T x d
        return (dev * inv_std.index_select(0, k)).amax(dim=-1)

    def rho(self, h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """rho(h) = max over channels |h - c_k| / sqrt(v_k + eps)."""
        return self.rho_from(self.deviation(h, k), k)

    @torch.no_grad()
    def initialize(self, h: torch.Tensor, w: torch.Tensor) -> None:
        """From the first training batch (the global one under DDP): centres = C distinct valid tokens drawn
        with `seed` (rank-major order of the processes' valid tokens, which is the single process's order
        for the same global batch), variances = the batch's per-channel variance, tau = the batch's mean rho
        under these clusters. Reads the token counts on the host, once."""
        C, d = self.centres.shape
        valid = (w > 0).nonzero().squeeze(1)
        if valid.numel() == 0 and not is_distributed():  # no valid token at all: use every token
            valid, w = torch.arange(h.shape[0], device=h.device), torch.ones_like(w)
        offset, total = _global_offset(valid.numel(), h.device)
        g = torch.Generator().manual_seed(self.seed)
        picks = torch.randperm(total, generator=g)[:C] if total >= C else torch.randint(max(total, 1), (C,),
                                                                                           generator=g)
        picks = picks.to(h.device)
        centres = h.new_zeros(C, d)
        if valid.numel():
            mine = (picks >= offset) & (picks < offset + valid.numel())
            rows = valid[(picks - offset).clamp(0, valid.numel() - 1)]
            centres = torch.where(mine[:, None], h[rows], centres)
        self.centres.copy_(all_reduce_sum_(centres))  # each pick is owned by exactly one process
        sums = all_reduce_sum_(torch.cat([(h * w[:, None]).sum(0), w.sum()[None]]))
        n = sums[-1].clamp(min=1)
        mean = sums[:-1] / n
        var = all_reduce_sum_(((h - mean) ** 2 * w[:, None]).sum(0)) / n
        self.variances.copy_(var.expand_as(self.variances))
        rho = self.rho(h, self.nearest(h))
        rho_sums = all_reduce_sum_(torch.stack([(rho * w).sum(), w.sum()]))
        self.tau.copy_(rho_sums[0] / rho_sums[1].clamp(min=1))
        self.initialized.fill_(True)
        self._ready = True

    @torch.no_grad()
    def accumulate(self, h: torch.Tensor, w: torch.Tensor, k: torch.Tensor, rho: torch.Tensor,
                   dev: torch.Tensor | None = None) -> None:
        """Add one forward's sums per cluster (token count, sum of h, sum of (h - c_k)^2, over tokens whose
        nearest centre is k, weighted by the token mask w) and of rho. `dev` = |h - c_k| when the caller has
        it (it is squared in place). The state itself does not move here. No host synchronisation."""
        C, d = self.centres.shape
        dev = self.deviation(h, k) if dev is None else dev
        onehot = h.new_zeros(k.shape[0], C).scatter_(1, k[:, None], w[:, None].to(h.dtype))  # T x C, w at k
        stats = torch.cat([onehot.sum(0)[:, None], onehot.t() @ h, onehot.t() @ dev.square_()], dim=1)
        rho_stats = torch.stack([(rho * w).sum(), w.sum()])
        if self._pending is None:
            self._pending, self._pending_rho = stats, rho_stats
            self._pending_forwards = 0
        else:
            self._pending += stats
            self._pending_rho += rho_stats
        self._pending_forwards += 1
        if self._pending_forwards == UNCOMMITTED_WARNING:
            warnings.warn(f"SLIM's clusters have accumulated {UNCOMMITTED_WARNING} training forwards without "
                          f"moving: call model.after_optimizer_step() after each optimizer.step() in your own "
                          f"training loop (slim-peft's Trainer does)", stacklevel=2)

    def pending_size(self) -> int:
        C, d = self.centres.shape
        return C * (1 + 2 * d) + 2

    def pending_sums(self) -> torch.Tensor | None:
        if self._pending is None:
            return None
        return torch.cat([self._pending.reshape(-1), self._pending_rho])

    @torch.no_grad()
    def apply_pending(self, sums: torch.Tensor) -> None:
        """One momentum step from the accumulated sums: c <- (1 - m) c + m mean(h), v <- (1 - m) v +
        m mean((h - c)^2) per non-empty cluster; tau <- (1 - m) tau + m mean(rho). Then clear the sums."""
        self._pending = self._pending_rho = None
        C, d = self.centres.shape
        stats, rho_stats = sums[:-2].view(C, 1 + 2 * d), sums[-2:]
        count, s, sq = stats[:, :1], stats[:, 1:1 + d], stats[:, 1 + d:]
        m = self.momentum
        has = count > 0
        n = count.clamp(min=1)
        self.centres.copy_(torch.where(has, (1 - m) * self.centres + m * s / n, self.centres))
        self.variances.copy_(torch.where(has, (1 - m) * self.variances + m * sq / n, self.variances))
        mean_rho = rho_stats[0] / rho_stats[1].clamp(min=1)
        self.tau.copy_(torch.where(rho_stats[1] > 0, (1 - m) * self.tau + m * mean_rho, self.tau))


def _global_offset(n_local: int, device: torch.device) -> tuple[int, int]:
    """(number of valid tokens on the processes before this one, total over all processes)."""
    if not is_distributed():
        return 0, n_local
    counts = torch.zeros(dist.get_world_size(), dtype=torch.long, device=device)
    counts[dist.get_rank()] = n_local
    dist.all_reduce(counts)
    rank = dist.get_rank()
    return int(counts[:rank].sum()), int(counts.sum())


class KeptClusters(nn.Module):
    """The clusters of finished tasks in a task sequence (SLIM's `clusters_across_tasks="keep"`): at each task
    boundary the sliding clusters' centres, variances and tau are copied into the next of `max_tasks` slots (the
    sliding clusters then follow the new task). A token's distance is then the smallest over the sliding
    clusters and every kept task's: d_t = rho_t / tau_t - 1 (or rho_t - 1), rho_t from task t's nearest centre
    and its variances, so a token of an earlier task is as close as it was while that task was trained.
    Buffers: saved with the adapter."""

    def __init__(self, max_tasks: int, num_clusters: int, dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.register_buffer("centres", torch.zeros(max_tasks, num_clusters, dim, device=device))
        self.register_buffer("variances", torch.ones(max_tasks, num_clusters, dim, device=device))
        self.register_buffer("tau", torch.ones(max_tasks, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))
        self._count: int | None = None  # host mirror of `count` (read once, not per forward)

    def kept(self) -> int:
        if self._count is None:
            self._count = int(self.count)
        return self._count

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._count = None

    @torch.no_grad()
    def keep(self, clusters: SlidingClusters) -> None:
        """Copy the sliding clusters' state into the next slot."""
        n = self.kept()
        if n >= self.centres.shape[0]:
            raise ValueError(f"the adapter keeps the clusters of at most {self.centres.shape[0]} tasks "
                             f"(max_tasks); raise max_tasks for longer task sequences")
        self.centres[n].copy_(clusters.centres)
        self.variances[n].copy_(clusters.variances)
        self.tau[n].copy_(clusters.tau)
        self.count.fill_(n + 1)
        self._count = n + 1

    @torch.no_grad()
    def distance(self, h: torch.Tensor, calibrated: bool) -> torch.Tensor:
        """min over kept tasks t of d_t(h) (T); call only when `kept()` > 0."""
        n = self.kept()
        c, v = self.centres[:n], self.variances[:n]  # n x C x d
        sq = c.square().sum(-1)  # n x C
        k = torch.baddbmm(sq[:, None, :], h.expand(n, *h.shape), c.transpose(1, 2), alpha=-2.0).argmin(-1)  # n x T
        picked = torch.gather(c, 1, k[..., None].expand(-1, -1, h.shape[-1]))  # n x T x d
        inv_std = torch.gather(torch.rsqrt(v + EPS), 1, k[..., None].expand(-1, -1, h.shape[-1]))
        rho = ((h - picked).abs_() * inv_std).amax(-1)  # n x T
        d = rho / self.tau[:n, None] - 1 if calibrated else rho - 1
        return d.amin(0)
