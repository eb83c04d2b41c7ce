"""A bank of E LoRA experts stored stacked (A: E x r x d_in, B: E x d_out x r), the dispatch that applies a
per-token mixture of them, and the drop-and-rescale masks of dynamic merging.

Two dispatch paths compute the same thing, sum_e g[t, e] B_e A_e x_t:
- dense: one matmul against the concatenated A of all experts (T x E r), gate, one matmul against the
  concatenated B. Cheapest when the total rank E r is small: no gathers, no host synchronisation.
- grouped: (token, expert) pairs sorted by expert, each expert applied to its own tokens only. Cheapest
  when E r is large compared with the k r that each token needs.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import kaiming_uniform_

DENSE_MAX_TOTAL_RANK = 256  # `dispatch="auto"` uses the dense path up to this E * r


class LoraExpertBank(nn.Module):
    """E LoRA experts for one linear: lora_A (E x r x d_in) Kaiming-uniform, lora_B (E x d_out x r) zeros."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(kaiming_uniform_(torch.empty(num_experts, r, in_features, device=device)))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, device=device))

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def r(self) -> int:
        return self.lora_A.shape[1]


def dense_mixture(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """sum_e gates[t, e] B_e A_e x_t with two matmuls. x: T x d_in, A: E x r x d_in, B: E x d_out x r,
    gates: T x E (zero for unselected experts)."""
    E, r, d_in = A.shape
    u = x @ A.reshape(E * r, d_in).t()  # T x E r
    u = (u.view(-1, E, r) * gates.unsqueeze(-1).to(u.dtype)).view(-1, E * r)
    return u @ B.permute(0, 2, 1).reshape(E * r, -1)  # (E r) x d_out


def grouped_mixture(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                    expert_w: torch.Tensor) -> torch.Tensor:
    """Same sum over the selected (token, expert) pairs only. expert_idx: T x K ids; ids >= E (identity
    experts) are skipped; expert_w: T x K weights. One host synchronisation (the per-expert counts)."""
    E = A.shape[0]
    T, K = expert_idx.shape
    flat_e = expert_idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    counts = torch.bincount(flat_e.clamp(max=E), minlength=E + 1)[:E].tolist()
    token = order // K
    out = x.new_zeros(T, B.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            sel = token[start:start + n]
            w = expert_w.reshape(-1)[order[start:start + n]].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, sel, ((x[sel] @ A[e].t()) @ B[e].t()) * w)
        start += n
    return out


def dense_gates(expert_idx: torch.Tensor, expert_w: torch.Tensor, num_lora_experts: int) -> torch.Tensor:
    """T x E_L gate matrix from top-k ids/weights; weight given to ids >= E_L (identity experts) is dropped."""
    T, K = expert_idx.shape
    gates = expert_w.new_zeros(T, num_lora_experts + K)  # spare columns absorb identity picks
    idx = torch.where(expert_idx < num_lora_experts, expert_idx, num_lora_experts + torch.arange(
        K, device=expert_idx.device).expand(T, K))
    gates.scatter_(1, idx, expert_w)
    return gates[:, :num_lora_experts]


def mix_experts(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                expert_w: torch.Tensor, dispatch: str = "auto") -> torch.Tensor:
    """Apply the top-k mixture of the bank's experts to x (T x d_in) by the chosen dispatch path."""
    E, r, _ = A.shape
    if dispatch == "dense" or (dispatch == "auto" and E * r <= DENSE_MAX_TOTAL_RANK):
        return dense_mixture(x, A, B, dense_gates(expert_idx, expert_w, E))
    return grouped_mixture(x, A, B, expert_idx, expert_w)


# --- dynamic merging: drop-and-rescale masks (method.md SLIM item 7, DARE) ---------------------------

def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None
             ) -> torch.Tensor:
    """U(0, 1) draws from `generator` (then moved to `device`), or from the device's global RNG."""
    if generator is not None:
        return torch.rand(*shape, generator=generator, device=generator.device).to(device)
    return torch.rand(*shape, device=device)


def factor_drop_prob(p: float) -> float:
    """q = 1 - sqrt(1 - p): dropping rows of B and columns of A with probability q each keeps an entry of
    B A with probability (1 - q)^2 = 1 - p, the DARE keep rate."""
    return 1.0 - (1.0 - p) ** 0.5


def factor_masks(num_experts: int, in_features: int, out_features: int, p: float, rescale: bool = True,
                 generator: torch.Generator | None = None, device: torch.device | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast drop-and-rescale masks: (mask_A: E x d_in over A's columns, mask_B: E x d_out over B's rows,
    the latter carrying the 1 / (1 - p) rescale), so that E[mask_B B A mask_A] = B A."""
    keep = 1.0 - factor_drop_prob(p)
    mask_a = (_uniform((num_experts, in_features), generator, device) < keep).float()
    mask_b = (_uniform((num_experts, out_features), generator, device) < keep).float()
    return mask_a, (mask_b / (1.0 - p) if rescale else mask_b)


def drop_rescale_mask(shape: tuple[int, ...], p: float, rescale: bool = True,
                      generator: torch.Generator | None = None, device: torch.device | None = None
                      ) -> torch.Tensor:
    """DARE's elementwise mask m / (1 - p), m ~ Bernoulli(1 - p) (Yu et al. 2023, eq. delta' = m delta /
    (1 - p))."""
    mask = (_uniform(shape, generator, device) >= p).float()
    return mask / (1.0 - p) if rescale else mask


def masked_factors(A: torch.Tensor, B: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A with columns and B with rows zeroed (and rescaled): the fast form never forms B A."""
    return A * mask_a.unsqueeze(1), B * mask_b.unsqueeze(2)


def exact_dare_mixture(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Reference form: sum_e gates[t, e] (mask_e * (B_e A_e)) x_t with an elementwise mask (E x d_out x d_in).
    Forms every B_e A_e: for tests and the ablation only."""
    delta = torch.bmm(B, A) * mask  # E x d_out x d_in
    y = torch.einsum("ti,eoi->teo", x, delta)
    return (y * gates.unsqueeze(-1).to(y.dtype)).sum(1)
