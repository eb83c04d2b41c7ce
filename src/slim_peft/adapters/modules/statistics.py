"""Statistics that a training forward pass updates (SLIM's sliding clusters, every router's load counters) and
the two rules that keep them right at scale.

1. Gradient checkpointing runs a layer's forward a second time, inside backward, to rebuild what it did not
   keep. That recompute must see exactly the state the first forward saw (or it routes tokens differently and
   the gradients are those of another network), and it must not count its tokens a second time. So a forward
   never changes the state it reads: it adds its sums to a pending accumulator, skipped while autograd's
   engine runs (`in_backward`), and `commit_pending` applies them once per optimizer step
   (`AdapterModel.after_optimizer_step`). With gradient accumulation that is one momentum step over the whole
   global batch, the same as one process with a larger batch.
2. Under DDP every process must keep the same state. The pending sums of all modules are all-reduced in one
   collective at commit time, outside any forward or checkpointed recompute; the clusters' one-time
   initialisation is made identical on every rank in the first forward (`SlidingClusters.initialize`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
import torch.distributed as dist


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass: where a gradient-checkpointing recompute happens
    (reentrant or not), and nowhere else that a forward runs."""
    return torch._C._current_graph_task_id() != -1


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the processes in place (a no-op in one process)."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or, for an FSDP2-sharded parameter (a DTensor), the whole tensor gathered from every
    process (a collective: every process must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class PendingStatistics(Protocol):
    """A module whose forward passes accumulate sums that `commit_pending` applies."""

    def pending_sums(self) -> torch.Tensor | None:
        """The accumulated sums as one flat fp32 tensor (None: nothing is accumulated in this process)."""

    def pending_size(self) -> int:
        """The length of `pending_sums()`, known without any forward (every rank must agree on it)."""

    def apply_pending(self, sums: torch.Tensor) -> None:
        """Apply the (all-reduced) sums and clear the accumulator."""


def commit_pending(modules: Iterable[PendingStatistics], device: torch.device) -> None:
    """Apply every module's pending sums, all-reduced over the processes in ONE collective (all processes call
    this once per optimizer step, in the same module order)."""
    modules = list(modules)
    if not modules:
        return
    sizes = [m.pending_size() for m in modules]
    parts = [m.pending_sums() for m in modules]
    flat = torch.cat([p.to(device) if p is not None else torch.zeros(n, device=device)
                      for p, n in zip(parts, sizes, strict=True)])
    all_reduce_sum_(flat)
    for m, chunk in zip(modules, flat.split(sizes), strict=True):
        m.apply_pending(chunk)
