"""Routers and routing losses shared by the mixture methods.

All routing math runs in fp32, with autocast off (`fp32_routing`): under bf16 autocast a bf16 router would
change top-k choices (0.7% of them on a 4096-wide synthetic test). Routers are linear maps without bias,
initialised N(0, router_init_std) (MixLoRA / MoE-PEFT), except where a method says otherwise.

Routers see the hidden state itself (not detached), in every method: the routing loss and the task loss reach
earlier layers through the router's input, as in the MixLoRA, LoRAMoE and MoLA reference code.

Routing counters (`StatsRouter.record`) are not updated inside a gradient-checkpointing recompute
(`statistics.in_backward`), so every token is counted once.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .experts import kaiming_uniform_
from .statistics import in_backward

AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def fp32_routing(device: torch.device) -> contextlib.AbstractContextManager:
    """A region with autocast off on `device` (routing in the dtype of its inputs: fp32); a no-op context where
    autocast is off already (entering a disabled autocast costs microseconds per layer and decoded token)."""
    device_type = device.type if device.type in AUTOCAST_DEVICES else "cpu"
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class LinearRouter(nn.Module):
    """z = R h: one logit per expert, R (E x d) in fp32, no bias."""

    def __init__(self, in_features: int, num_experts: int, init_std: float = 0.02,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device))
        nn.init.normal_(self.weight, 0.0, init_std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with fp32_routing(h.device):  # fp32 unless the whole model was cast
            return F.linear(h.to(self.weight.dtype), self.weight)


class StatsRouter(LinearRouter):
    """A `LinearRouter` (z = R h, fp32, no bias) that also accumulates routing statistics on the device.

    `init="normal"`: N(0, init_std) (MixLoRA, MoE-PEFT); `init="kaiming"`: nn.Linear's Kaiming-uniform
    (LoRAMoE and MoLA official code). `stats()` / `reset_stats()` are what `AdapterModel.routing_stats`
    discovers. Shared by the MixLoRA, LoRAMoE and MoLA layers.
    """

    def __init__(self, in_features: int, num_experts: int, init: str = "normal", init_std: float = 0.02,
                 device: torch.device | None = None) -> None:
        super().__init__(in_features, num_experts, init_std, device=device)
        if init == "kaiming":
            kaiming_uniform_(self.weight.data)
        self.register_buffer("stat_weight", torch.zeros(num_experts, device=device), persistent=False)
        self.register_buffer("stat_active", torch.zeros((), device=device), persistent=False)
        self.register_buffer("stat_tokens", torch.zeros((), device=device), persistent=False)

    @torch.no_grad()
    def record(self, expert_idx: torch.Tensor, expert_w: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add one forward's routing (ids T x K, weights T x K; weight 0 = not selected) over valid tokens
        (not inside a checkpointed recompute)."""
        if in_backward():
            return
        w = mask.float() if mask is not None else expert_w.new_ones(expert_w.shape[0])
        weighted = (expert_w.float() * w[:, None]).reshape(-1)
        self.stat_weight.index_add_(0, expert_idx.reshape(-1), weighted.to(self.stat_weight.dtype))
        self.stat_active += ((expert_w > 0).float().sum(-1) * w).sum()
        self.stat_tokens += w.sum()

    def stats(self) -> dict:
        """Tokens seen, mean routing weight per expert, mean number of experts with weight > 0 per token."""
        tokens = max(float(self.stat_tokens), 1.0)
        return {"tokens": int(self.stat_tokens), "expert_load": (self.stat_weight / tokens).tolist(),
                "mean_active_experts": float(self.stat_active) / tokens}

    def reset_stats(self) -> None:
        self.stat_weight.zero_()
        self.stat_active.zero_()
        self.stat_tokens.zero_()


def top_k_routing(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest logits and softmax over them (others get 0): returns (ids T x k, weights T x k)."""
    values, idx = logits.topk(k, dim=-1)
    return idx, torch.softmax(values, dim=-1)


def top_p_routing(logits: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MixLoRA-Dynamic: the smallest prefix of experts, sorted by probability, whose mass reaches p (the
    crossing expert kept). Returns (ids T x E sorted by probability, weights T x E) where dropped experts
    have weight 0; kept probabilities are not renormalised (as MoE-PEFT)."""
    probs = torch.softmax(logits, dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    keep = mass_before < p
    return idx, sorted_p * keep


def switch_balance_loss(logits: torch.Tensor, idx: torch.Tensor, num_experts: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer style load balancing (MixLoRA section 3.3, as transformers' Mixtral loss):
    E * sum over slots and experts of F[slot, e] P[e], with F[slot, e] the share of valid tokens whose
    slot-th choice is e and P[e] the mean router probability of e. `idx`: selected ids (T x k); ids >=
    num_experts are ignored."""
    probs = torch.softmax(logits.float(), dim=-1)[:, :num_experts]
    hits = F.one_hot(idx.clamp(max=num_experts), num_experts + 1)[..., :num_experts].float().sum(1)  # T x E
    if mask is not None:
        m = mask.float().unsqueeze(-1)
        n = m.sum().clamp(min=1)
        f = (hits * m).sum(0) / n
        P = (probs * m).sum(0) / n
    else:
        f = hits.mean(0)
        P = probs.mean(0)
    return num_experts * (f * P).sum()
