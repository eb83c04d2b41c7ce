"""A bank of E LoRA experts stored stacked (A: E x r x d_in, B: E x d_out x r), the dispatch that applies a
per-token mixture of them (the drop-and-rescale masks of dynamic merging
are in `dare.py`).

Two dispatch paths compute the same thing, out_t + sum_e g[t, e] B_e A_e x_t, with no host synchronisation:
- dense: one matmul against the concatenated A of all experts (T x E r), gate, one matmul against the
  concatenated B that accumulates straight into `out` in place (addmm_: no copy or extra pass over the T x
  d_out output). No gathers; costs E r per token.
- grouped: the (token, expert) pairs sorted by expert (identity ids last), each expert applied to its own
  rows with `torch._grouped_mm` (offsets stay on the device), scattered back with index_add_. Costs K r per
  token plus a gather of x and a scatter of the outputs. Identity picks go to an appended all-zero expert,
  which keeps every shape static (their rows cost one zero expert's work, and add exactly 0).
  Where `_grouped_mm` is missing or refuses the shapes/dtype (it is probed once per device and dtype), a
  loop over experts runs instead; that fallback reads the per-expert counts on the host (one sync per call).

`dispatch="auto"` rule, measured on this project's 2-core CPU (benchmarks/results/speed.md, "dispatch
crossover"; T = 1024 rows, d 576 <-> 1536, with and without autograd): dense while the total rank E r is at most
DENSE_MAX_TOTAL_RANK (128) and E <= DENSE_MAX_EXPERTS_PER_PICK K (= 4 K); grouped otherwise (larger banks, and
one expert per row as MixLoRA's pairs). Below that size the dense path's extra FLOPs cost less than the
grouped path's gather of x and scatter of the outputs.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable

import torch
from torch import nn

DENSE_MAX_TOTAL_RANK = 128  # `dispatch="auto"`: dense up to this E * r ...
DENSE_MAX_EXPERTS_PER_PICK = 4  # ... and while E <= 4 K (dense work E r vs grouped work K r per row)



def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init (LoRA's A init), applied to the last two dims of a stacked tensor."""
    for sub in t.view(-1, *t.shape[-2:]):
        nn.init.kaiming_uniform_(sub, a=5**0.5)
    return t

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


# --- dense path ------------------------------------------------------------------------------------------

def dense_gates(expert_idx: torch.Tensor, expert_w: torch.Tensor, num_lora_experts: int) -> torch.Tensor:
    """T x E_L gate matrix from top-k ids/weights (repeated ids add up); weight given to ids >= E_L (identity
    experts) is dropped."""
    T, _ = expert_idx.shape
    gates = expert_w.new_zeros(T, num_lora_experts + 1)  # the spare column absorbs identity picks
    gates.scatter_add_(1, expert_idx.clamp(max=num_lora_experts), expert_w)
    return gates[:, :num_lora_experts]


def _accumulator(out: torch.Tensor | None, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """`out` itself (accumulated into in place: no copy of the T x d_out output), a copy where autograd
    forbids in-place updates (a leaf that requires grad), or zeros."""
    if out is None:
        return like.new_zeros(rows, cols)
    return out.clone() if out.is_leaf and out.requires_grad else out


def dense_mixture(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """out + sum_e gates[t, e] B_e A_e x_t with two matmuls, the second accumulating into `out` in place
    (addmm_). x: T x d_in, A: E x r x d_in, B: E x d_out x r, gates: T x E (zero for unselected experts)."""
    E, r, d_in = A.shape
    u = x @ A.reshape(E * r, d_in).t()  # T x E r
    u = (u.view(-1, E, r) * gates.unsqueeze(-1).to(u.dtype)).view(-1, E * r)
    b_cat = B.transpose(1, 2).reshape(E * r, -1)  # (E r) x d_out; a view when B is stored rank-major
    if out is None:
        return u @ b_cat
    return _accumulator(out, 0, 0, u).addmm_(u, b_cat)


# --- grouped path ----------------------------------------------------------------------------------------

def sort_pairs(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, token, offsets) of the T K (token, expert) pairs sorted by expert: `order` indexes the
    flattened pairs, `token` is each sorted pair's token, `offsets` (E + 1, int32, on the device) the end
    of each expert's rows; ids >= num_experts (identity) form the last group. No host synchronisation."""
    K = expert_idx.shape[1]
    flat = expert_idx.reshape(-1).clamp(max=num_experts)
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds, right=True).to(torch.int32)
    return order, order // K, offsets


@functools.cache
def grouped_mm_available(device: str, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward correctly on this device and dtype (probed
    once with a tiny problem). The probe runs in a thread of its own, where grad mode, autocast and
    saved-tensor hooks are at their defaults: the first call may come from inside `no_grad()` (evaluation),
    autocast, or a gradient-checkpointed forward, whose tensor count the probe's tensors would change."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_probe_grouped_mm, device, dtype).result()


def _probe_grouped_mm(device: str, dtype: torch.dtype) -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, 16, generator=g).to(device=device, dtype=dtype).requires_grad_()
        w = torch.randn(3, 16, 8, generator=g).to(device=device, dtype=dtype).requires_grad_()
        offsets = torch.tensor([4, 4, 12], device=device, dtype=torch.int32)
        y = torch._grouped_mm(x, w, offs=offsets)
        y.float().square().sum().backward()
        ref = torch.cat([x[:4] @ w[0], x[4:] @ w[2]])
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return bool(torch.allclose(y.float(), ref.float(), atol=tol, rtol=tol)) and w.grad is not None
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_mm_fits(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether `grouped_rows` can run: `_grouped_mm` works here and the strides are 16-byte aligned (d_in,
    d_out and r multiples of 16 / element size)."""
    return _grouped_mm_fits(x, (A, B), (A.shape[1], A.shape[2], B.shape[1]))


def _grouped_mm_fits(x: torch.Tensor, weights: tuple[torch.Tensor, ...], dims: tuple[int, ...]) -> bool:
    if any(w.dtype != x.dtype for w in weights) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    step = 16 // x.element_size()
    if any(n % step for n in dims):
        return False
    return grouped_mm_available(str(x.device), x.dtype)


def _grouped_weights(W: torch.Tensor, zero_expert: bool) -> torch.Tensor:
    """W (E x m x n) in the layout `_grouped_mm` runs fastest on: E x n x m contiguous (a transposed view ran
    2-3x slower on this CPU), with an all-zero expert appended when identity picks need a group to land
    in. One copy of the bank, which the gradient flows through."""
    E, m, n = W.shape
    Wt = W.new_zeros(E + 1, n, m) if zero_expert else W.new_empty(E, n, m)
    Wt[:E].copy_(W.transpose(1, 2))
    return Wt


def grouped_rows(xs: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor,
                 row_w: torch.Tensor | None = None) -> torch.Tensor:
    """Rows already sorted by expert: row i of expert e becomes w_i B_e A_e xs_i. `offsets` (int32, on the
    device) ends each expert's group: E + 1 groups as `sort_pairs` gives (the last, identity picks, gets an
    all-zero expert), or E groups when every row belongs to a LoRA expert. Two `torch._grouped_mm` calls,
    no host synchronisation. Callers must check `grouped_mm_fits(xs, A, B)` (else use `expert_rows`)."""
    zero_expert = offsets.shape[0] > A.shape[0]
    u = torch._grouped_mm(xs, _grouped_weights(A, zero_expert), offs=offsets)
    if row_w is not None:
        u = u * row_w.unsqueeze(-1).to(u.dtype)
    return torch._grouped_mm(u, _grouped_weights(B, zero_expert), offs=offsets)


def expert_rows(xs: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor,
                row_w: torch.Tensor | None = None) -> torch.Tensor:
    """`grouped_rows` where `_grouped_mm` runs, else `expert_rows_loop`."""
    if grouped_mm_fits(xs, A, B):
        return grouped_rows(xs, A, B, offsets, row_w)
    return expert_rows_loop(xs, A, B, offsets, row_w)


def expert_rows_loop(xs: torch.Tensor, A: torch.Tensor, B: torch.Tensor, offsets: torch.Tensor,
                     row_w: torch.Tensor | None = None) -> torch.Tensor:
    """`grouped_rows` as a Python loop over experts; reads the offsets on the host (one synchronisation per
    call). Groups past the E-th (identity picks) give zero rows."""
    bounds = [0] + offsets.tolist()
    parts = []
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        if e < A.shape[0] and hi > lo:
            u = xs[lo:hi] @ A[e].t()
            parts.append((u if row_w is None else u * row_w[lo:hi, None].to(u.dtype)) @ B[e].t())
        else:
            parts.append(xs.new_zeros(hi - lo, B.shape[1]))
    return torch.cat(parts)


def grouped_mixture(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                    expert_w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out + sum over the selected (token, expert) pairs of w B_e A_e x_t, accumulated into `out` in place.
    expert_idx: T x K ids; ids >= E (identity experts) add nothing; expert_w: T x K weights. Sync-free with
    `torch._grouped_mm`, else the loop over experts."""
    return _sorted_mixture(x, A.shape[0], B.shape[1], expert_idx, expert_w, out,
                           lambda xs, offsets, w: expert_rows(xs, A, B, offsets, w))


def grouped_mixture_loop(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                         expert_w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same result, always with the loop over experts (one host synchronisation per call): the reference in
    tests."""
    return _sorted_mixture(x, A.shape[0], B.shape[1], expert_idx, expert_w, out,
                           lambda xs, offsets, w: expert_rows_loop(xs, A, B, offsets, w))


def _sorted_mixture(x: torch.Tensor, num_experts: int, d_out: int, expert_idx: torch.Tensor,
                    expert_w: torch.Tensor, out: torch.Tensor | None, rows_fn: Callable[..., torch.Tensor]
                    ) -> torch.Tensor:
    """Sort the pairs by expert, gather their rows, apply `rows_fn(xs, offsets, row_w)`, scatter-add into
    `out`."""
    order, token, offsets = sort_pairs(expert_idx, num_experts)
    y = rows_fn(x.index_select(0, token), offsets, expert_w.reshape(-1).index_select(0, order))
    return _accumulator(out, x.shape[0], d_out, y).index_add_(0, token, y)


# --- dispatch ---------------------------------------------------------------------------------------------

def choose_dispatch(num_experts: int, r: int, top_k: int, dispatch: str = "auto") -> str:
    """"dense" or "grouped" for `dispatch` ("auto": the measured rule of the module docstring, the same with
    and without autograd)."""
    if dispatch != "auto":
        return dispatch
    dense = num_experts * r <= DENSE_MAX_TOTAL_RANK and num_experts <= DENSE_MAX_EXPERTS_PER_PICK * top_k
    return "dense" if dense else "grouped"


def mix_experts(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_idx: torch.Tensor,
                expert_w: torch.Tensor, dispatch: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the top-k mixture of the bank's experts to x (T x d_in) by the chosen dispatch path; with
    `out` (T x d_out), accumulate into it in place and return it (fused into the last matmul when the dtypes
    agree)."""
    E, r, _ = A.shape
    if out is not None and out.dtype != x.dtype:
        return _accumulator(out, 0, 0, out).add_(mix_experts(x, A, B, expert_idx, expert_w, dispatch).to(out.dtype))
    if choose_dispatch(E, r, expert_idx.shape[1], dispatch) == "dense":
        return dense_mixture(x, A, B, dense_gates(expert_idx, expert_w, E), out)
    return grouped_mixture(x, A, B, expert_idx, expert_w, out)
