"""SLIM's dynamic merging: DARE's drop-and-rescale (Yu et al. 2023, arXiv 2311.03099),
delta' = m * delta / (1 - p), m ~ Bernoulli(1 - p), applied to each LoRA expert's update B_e A_e.

Two forms: the fast one masks rows of B and columns of A (`factor_masks`, never forming B A); the exact one
masks every entry of B_e A_e (`dare_mixture`, with `DareRows` re-forming the updates in backward).

Memory of the exact form (`exact_form_bytes`): a forward forms the E dense d_out x d_in updates of one
projection in fp32 (1.9 GB for one Llama-3-8B FFN projection at E = 8), and backward forms them again. The
keep masks are not kept for backward: a training mask is a `ReplayableKeepMask`, redrawn in backward from the
RNG state of its draw (a few bytes instead of 45 GB of booleans over Llama-3-8B's FFN projections). The exact
form runs in fp32 with autocast off (it is the reference the fast form is compared with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dropout import dropout_noise, keep_noise
from .experts import sort_pairs

# --- dynamic merging: drop-and-rescale masks (DARE) ------------------------------------------------------

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
    (1 - p)). Draws from the global RNG (a new mask per training forward, E d_out d_in entries) take
    `dropout_noise`'s 16-bit words, 4x cheaper on the CPU than one float per entry; seeded draws (SLIM's
    fixed eval masks) keep the float draw, so a saved adapter evaluates with the masks it always had."""
    if generator is None and p > 0:
        return dropout_noise(torch.Size(shape), p, torch.float32, device, 1.0 / (1.0 - p) if rescale else 1.0)
    mask = (_uniform(shape, generator, device) >= p).float()
    return mask / (1.0 - p) if rescale else mask


def masked_factors(A: torch.Tensor, B: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A with columns and B with rows zeroed (and rescaled): the fast form never forms B A."""
    return A * mask_a.unsqueeze(1).to(A.dtype), B * mask_b.unsqueeze(2).to(B.dtype)


# --- exact DARE form: elementwise masks on every B_e A_e ---------------------------------------------------

def drop_keep_mask(shape: tuple[int, ...], p: float, generator: torch.Generator | None = None,
                   device: torch.device | None = None) -> torch.Tensor:
    """DARE's keep mask m ~ Bernoulli(1 - p) as booleans (1 byte per entry, where `drop_rescale_mask`'s floats
    take 4; the exact form applies the 1 / (1 - p) rescale as a scalar). Global-RNG draws take `keep_noise`'s
    16-bit words, seeded draws (SLIM's fixed eval masks) one float per entry."""
    if generator is None and p > 0:
        return keep_noise(torch.Size(shape), p, device)
    return _uniform(shape, generator, device) >= p


@dataclass
class ReplayableKeepMask:
    """One training draw of DARE's keep mask from `device`'s global RNG, with the RNG state before it, so
    that backward can draw the same booleans again (`replay`) instead of keeping them."""

    shape: tuple[int, ...]
    p: float
    device: torch.device
    rng_state: torch.Tensor

    @classmethod
    def draw(cls, shape: tuple[int, ...], p: float, device: torch.device) -> tuple[ReplayableKeepMask, torch.Tensor]:
        """(the replayable record, the mask itself): advances the global RNG as `drop_keep_mask` does."""
        record = cls(shape, p, device, _rng_state(device))
        return record, drop_keep_mask(shape, p, None, device)

    def replay(self) -> torch.Tensor:
        """The same mask again; the global RNG is left as it was."""
        current = _rng_state(self.device)
        _set_rng_state(self.device, self.rng_state)
        try:
            return drop_keep_mask(self.shape, self.p, None, self.device)
        finally:
            _set_rng_state(self.device, current)


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


def exact_form_bytes(num_experts: int, in_features: int, out_features: int) -> int:
    """Peak extra memory of one exact-form projection in training: its E dense fp32 updates formed in
    backward, the gradient they become (in place), and the boolean keep mask, E d_out d_in (4 + 1) bytes
    (plus what autograd keeps of the pairs' rows)."""
    return num_experts * in_features * out_features * (4 + 1)


def dare_delta(A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """The exact form's masked updates scale * m_e * (B_e A_e), E x d_out x d_in: forms every B_e A_e."""
    delta = torch.bmm(B, A).mul_(keep)
    return delta.mul_(scale) if scale != 1.0 else delta


def dare_rows(xs: torch.Tensor, delta: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Rows sorted by expert (`bounds[e]:bounds[e + 1]` are expert e's, on the host): row i of expert e
    becomes delta_e x_i."""
    y = xs.new_empty(xs.shape[0], delta.shape[1])
    for e in range(len(bounds) - 1):
        if bounds[e + 1] > bounds[e]:
            torch.mm(xs[bounds[e]:bounds[e + 1]], delta[e].t(), out=y[bounds[e]:bounds[e + 1]])
    return y


class DareRows(torch.autograd.Function):
    """`dare_rows(xs, dare_delta(A, B, keep, scale), bounds)` with gradients for xs, A and B. It saves xs, A, B
    and the boolean mask (or, given `replay`, only the RNG state that redraws it), not the E dense d_out x d_in
    updates, and forms them again in backward (E d_out d_in r multiply-adds, small beside the backward's
    products): autograd through `dare_delta` kept a float mask and the updates per projection, 2 x 28 MB for
    one FFN projection of the embedded model."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, scale: float,
                bounds: list[int], replay: ReplayableKeepMask | None = None) -> torch.Tensor:
        if replay is None:
            ctx.save_for_backward(xs, A, B, keep)
        else:
            ctx.save_for_backward(xs, A, B)
        ctx.scale, ctx.bounds, ctx.replay = scale, bounds, replay
        return dare_rows(xs, dare_delta(A, B, keep, scale), bounds)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        if ctx.replay is None:
            xs, A, B, keep = ctx.saved_tensors
        else:
            xs, A, B = ctx.saved_tensors
            keep = ctx.replay.replay()
        bounds = ctx.bounds
        delta = dare_delta(A, B, keep, ctx.scale)
        gx = torch.empty_like(xs) if ctx.needs_input_grad[0] else None
        for e in range(len(bounds) - 1):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                delta[e].zero_()
                continue
            if gx is not None:
                torch.mm(gy[lo:hi], delta[e], out=gx[lo:hi])
            torch.mm(gy[lo:hi].t(), xs[lo:hi], out=delta[e])  # delta_e is spent: its buffer takes dL/d delta_e
        g = delta.mul_(keep)  # dL/d(B_e A_e) = scale * m_e * dL/d delta_e
        if ctx.scale != 1.0:
            g.mul_(ctx.scale)
        return gx, torch.bmm(B.transpose(1, 2), g), torch.bmm(g, A.transpose(1, 2)), None, None, None, None


def dare_mixture(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, keep: torch.Tensor, scale: float,
                 expert_idx: torch.Tensor, expert_w: torch.Tensor, delta: torch.Tensor | None = None,
                 replay: ReplayableKeepMask | None = None) -> torch.Tensor:
    """sum over the selected (token, expert) pairs of w (scale m_e * B_e A_e) x_t: the exact DARE form, with
    the pairs grouped by expert as in `grouped_mixture`, so a token costs its K dense products, not E
    (`exact_dare_mixture`). Identity picks (ids >= E, a third of the picks in the study) are dropped before the
    products; that reads the per-expert counts on the host (one synchronisation per call). With autograd
    through `DareRows` (which redraws `keep` in backward from `replay` when given); without, from `delta`
    (`dare_delta`, e.g. cached) or formed here."""
    E = A.shape[0]
    order, token, offsets = sort_pairs(expert_idx, E)
    bounds = [0, *offsets[:E].tolist()]
    n = bounds[-1]
    token = token[:n]
    xs = x.index_select(0, token)
    if torch.is_grad_enabled() and (xs.requires_grad or A.requires_grad or B.requires_grad):
        rows = DareRows.apply(xs, A, B, keep, scale, bounds, replay)
    else:
        rows = dare_rows(xs, dare_delta(A, B, keep, scale) if delta is None else delta, bounds)
    rows = rows * expert_w.reshape(-1).index_select(0, order[:n]).unsqueeze(-1).to(rows.dtype)
    return rows.new_zeros(x.shape[0], rows.shape[1]).index_add_(0, token, rows)


def exact_dare_mixture(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gates: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """Reference form: sum_e gates[t, e] (mask_e * (B_e A_e)) x_t with an elementwise mask (E x d_out x d_in).
    Forms every B_e A_e and applies all E to every token: the plain reference for tests."""
    delta = torch.bmm(B, A) * mask  # E x d_out x d_in
    y = torch.einsum("ti,eoi->teo", x, delta)
    return (y * gates.unsqueeze(-1).to(y.dtype)).sum(1)
