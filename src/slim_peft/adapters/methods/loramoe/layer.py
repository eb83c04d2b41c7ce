"""LoRAMoE (Dou et al. 2023, arXiv 2312.09979; official code Ablustrund/LoRAMoE).

Each adapted linear (default: the FFN projections gate, up, down, as the official run script) gets N LoRA
experts (a stacked `LoraExpertBank`) and its own dense router on its own input:

    G(x) = softmax(W_g x)   (fp32, W_g Kaiming-uniform as the official code, no bias, no top-k)
    y    = W x + b + sum_i G(x)_i s B_i A_i dropout(x)

Localized balancing constraint (paper section 3.2): experts form two groups, the first half world knowledge
(group 0), the second half downstream (group 1); each sample m carries a type t_m (0 world knowledge, 1
downstream; `sample_type` in the batch, all downstream when absent). Per adapted linear:

    Q[n, m] = sum over sample m's valid tokens of G_n       (importance; the official code also sums padding)
    I[n, m] = 1 + delta if group(n) == t_m else 1 - delta
    Z = I * Q,    L_lbc = Var(Z) / Mean(Z)         (paper, `lbc_form="paper"`, default)
                  L_lbc = Var(Z) / (Mean(Z)^2 + 1e-10)   (official `cv_squared`, `lbc_form="code"`)

Var is torch's default, the unbiased (Bessel-corrected, N - 1) variance over the N x B entries of Z: that is
what the official `cv_squared` computes (`x.float().var()`); with a single entry the loss is 0 as there.
L_lbc is summed over the adapted linears and layers and added with weight beta = `lbc_weight` (delta =
`lbc_alpha`). The official code fixes the groups by index as well, with the opposite labelling (its
task_type 1 boosts the first half); which group is called "world knowledge" is only a naming.

Saved keys per adapted linear `<path>`: `<path>.experts.lora_A` (E x r x d_in), `<path>.experts.lora_B`
(E x d_out x r), `<path>.router.weight` (E x d_in, fp32); the frozen weight stays at `<path>.base_layer`.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import AdapterConfig
from ...context import ForwardContext
from ...modules.dropout import adapter_dropout
from ...modules.experts import LoraExpertBank, dense_mixture
from ...modules.routing import StatsRouter
from ...targeting import find_targets, set_module
from .config import LoraMoeConfig


def localized_balance_loss(gates: torch.Tensor, mask: torch.Tensor | None, sample_type: torch.Tensor | None,
                           delta: float, form: str = "paper", sample_ids: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """L_lbc of one adapted linear from its router probabilities `gates` (B x S x E, fp32), the token mask
    (B x S, True for real tokens; None: all real) and the sample types (B; None: all downstream = 1).
    A packed batch (`sample_ids`, B x S: each token's sample, -1 on padding) has one type per sample."""
    B, _, E = gates.shape
    if sample_ids is not None:  # Q[n, m] over the tokens of sample m wherever its row is
        assert sample_type is not None
        B = sample_type.numel()
        keep = sample_ids.reshape(-1) >= 0
        flat = gates.reshape(-1, E)[keep]
        Q = torch.zeros(E, B, dtype=gates.dtype, device=gates.device).index_add_(
            1, sample_ids.reshape(-1)[keep], flat.t())
    else:
        if mask is not None:
            gates = gates * mask.unsqueeze(-1).to(gates.dtype)
        Q = gates.sum(1).t()  # E x B: Q[n, m]
    group = (torch.arange(E, device=gates.device) >= E // 2).long()  # 0: world knowledge, 1: downstream
    types = sample_type.reshape(-1).long() if sample_type is not None else \
        torch.ones(B, dtype=torch.long, device=gates.device)
    I = torch.where(group[:, None] == types[None, :], 1.0 + delta, 1.0 - delta)
    Z = (I * Q).reshape(-1)
    if Z.numel() < 2:
        return Z.sum() * 0.0
    var, mean = Z.var(), Z.mean()  # unbiased variance, as the official cv_squared
    if form == "code":
        return var / (mean ** 2 + 1e-10)
    return var / (mean + 1e-10)


class LoraMoeLinear(nn.Module):
    """A frozen linear plus LoRAMoE's dense mixture of LoRA experts (module docstring for the maths)."""

    def __init__(self, base_layer: nn.Linear, cfg: LoraMoeConfig, ctx: ForwardContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.cfg = cfg
        self.ctx = ctx
        self.scaling = cfg.scaling
        device = base_layer.weight.device
        self.lora_dropout = adapter_dropout(cfg.lora_dropout)
        self.experts = LoraExpertBank(cfg.num_experts, base_layer.in_features, base_layer.out_features, cfg.r,
                                      device=device)
        self.router = StatsRouter(base_layer.in_features, cfg.num_experts, "kaiming", device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        xt = x.reshape(-1, x.shape[-1])
        gates = torch.softmax(self.router(xt), dim=-1)  # T x E, fp32, dense
        mask = self.ctx.flat_mask(xt.shape[0])
        E = gates.shape[1]
        self.router.record(torch.arange(E, device=x.device).expand_as(gates), gates.detach(), mask)
        x_drop = self.lora_dropout(xt.to(self.experts.lora_A.dtype))
        delta = dense_mixture(x_drop, self.experts.lora_A, self.experts.lora_B, gates)
        rows = x.shape[0] if x.dim() == 3 else 1
        m = mask.view(rows, -1) if mask is not None else None
        st, ids = self.ctx.sample_type, self.ctx.sequence_ids
        if ids is not None and (ids.numel() != xt.shape[0] or st is None):
            ids = None
        if ids is None and st is not None and st.numel() != rows:
            st = None
        self.ctx.add_aux("lbc", localized_balance_loss(gates.view(rows, -1, E), m, st, self.cfg.lbc_alpha,
                                                       self.cfg.lbc_form, ids))
        return result + (self.scaling * delta).view(*x.shape[:-1], -1).to(result.dtype)


def inject_loramoe(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext) -> None:
    assert isinstance(cfg, LoraMoeConfig)
    for name in find_targets(model, cfg.target_modules):
        set_module(model, name, LoraMoeLinear(model.get_submodule(name), cfg, ctx))


def loramoe_aux_losses(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext
                       ) -> dict[str, tuple[torch.Tensor, float]]:
    """L_lbc summed over the adapted linears of the last forward (they add it to ctx.aux), weight beta."""
    assert isinstance(cfg, LoraMoeConfig)
    return {"lbc": (ctx.aux["lbc"], cfg.lbc_weight)} if "lbc" in ctx.aux else {}
