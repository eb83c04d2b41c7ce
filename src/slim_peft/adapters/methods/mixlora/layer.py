"""MixLoRA (Li et al. 2024, arXiv 2404.15159) and MixLoRA-Dynamic (top-p routing, TUDB-Labs MoE-PEFT).

Experts live at the FFN level and share the frozen FFN: expert e is the FFN with its own LoRA on gate, up and
down (as the reference code, MoE-PEFT's mixlora),

    E_e(h) = (W_down + s B^d_e A^d_e) [ act((W_gate + s B^g_e A^g_e) h) * ((W_up + s B^u_e A^u_e) h) ]
    FFN(h) = sum_{e in S(h)} w_e E_e(h)

Router: z = R h on the FFN input (fp32, no bias, init N(0, 0.02)), p = softmax(z). MixLoRA: S = top-k of p
and w = p_S / sum p_S (renormalised; `top_k_routing` softmaxes the kept logits, which is the same).
MixLoRA-Dynamic (`top_p` set): S = the smallest prefix of experts sorted by p whose mass reaches top_p (the
crossing expert kept), w = p_S not renormalised (as MoE-PEFT). The attention projections get one plain
LoRA each (`LoraLinear`).

Computation (MoE-PEFT's efficient form): W_gate h and W_up h are computed once per token and shared by all
experts; the (token, selected expert) pairs, sorted by expert once per FFN call, then add their experts' LoRA
deltas (the stacked `LoraExpertBank` applied group by group with `torch._grouped_mm`, no Python loop and no
host synchronisation). The down projection's input differs per expert, but W_down is linear, so the frozen
W_down runs once per token on the w-weighted sum of the experts' activations and only the down LoRA deltas
run per pair (MixLoRA's code runs W_down per pair; the results agree up to rounding).

Load balancing (MixLoRA 3.3, Switch/Mixtral form): the router logits of all layers are concatenated and
L_aux = E * sum_{slot, e} F[slot, e] P[e] over valid tokens (padding excluded), added with weight
`router_aux_loss_coef` (0.01, paper/README; the code default is 0.001). For MixLoRA-Dynamic F counts every
kept expert. Not implemented: MixLoRA's `jitter_noise` (default 0 in its code).

Saved keys (stable; PEFT's prefix `base_model.model.` then the module path), per decoder layer i:
    model.layers.{i}.mlp.router.weight                     E x hidden          (fp32)
    model.layers.{i}.mlp.{gate,up,down}_proj.experts.lora_A   E x r x d_in
    model.layers.{i}.mlp.{gate,up,down}_proj.experts.lora_B   E x d_out x r
    model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight  (plain LoRA, as PEFT)
The frozen projections stay at `mlp.{gate,up,down}_proj.base_layer` (not saved).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slim_peft.errors import TargetModuleError

from ...config import FFN_PROJ, AdapterConfig
from ...context import ForwardContext
from ...modules.dropout import adapter_dropout
from ...modules.experts import LoraExpertBank, expert_rows, mix_experts
from ...modules.routing import StatsRouter, switch_balance_loss, top_k_routing, top_p_routing
from ...targeting import find_targets, set_module
from ..lora.layer import LoraLinear
from .config import MixLoraConfig


class ExpertProjection(nn.Module):
    """One FFN projection of the MixLoRA experts: the frozen linear (`base_layer`), shared by every expert,
    and a stacked bank of per-expert LoRA factors (`experts.lora_A` E x r x d_in, `experts.lora_B`
    E x d_out x r, adapters in fp32)."""

    def __init__(self, base_layer: nn.Linear, num_experts: int, r: int, lora_alpha: float,
                 lora_dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = lora_alpha / r
        self.lora_dropout = adapter_dropout(lora_dropout)
        self.experts = LoraExpertBank(num_experts, base_layer.in_features, base_layer.out_features, r,
                                      device=base_layer.weight.device)

    def delta(self, xs: torch.Tensor, pairs: ExpertPairs, weighted: bool = False, dispatch: str = "auto"
              ) -> torch.Tensor:
        """s B_e A_e dropout(xs_p) for each pair p (times its routing weight when `weighted`): xs (P x d_in,
        in the pairs' order) -> P x d_out, in the adapters' dtype."""
        A, B = self.experts.lora_A, self.experts.lora_B
        xs = self.lora_dropout(xs.to(A.dtype))
        w = pairs.weight * self.scaling if weighted else pairs.weight.new_full(pairs.weight.shape, self.scaling)
        if dispatch == "dense":
            return mix_experts(xs, A, B, pairs.expert[:, None], w[:, None], "dense")
        return expert_rows(xs, A, B, pairs.offsets, w)


def _base(proj: nn.Module) -> nn.Module:
    return proj.base_layer if isinstance(proj, ExpertProjection) else proj


def _plus_delta(y: torch.Tensor, proj: nn.Module, xs: torch.Tensor, pairs: ExpertPairs, dispatch: str,
                inplace: bool = False) -> torch.Tensor:
    """y + the pairs' expert LoRA deltas when this projection is adapted (else y alone)."""
    if not isinstance(proj, ExpertProjection):
        return y
    delta = proj.delta(xs, pairs, dispatch=dispatch).to(y.dtype)
    return y.add_(delta) if inplace else y + delta


def select_experts(logits: torch.Tensor, top_k: int, top_p: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids T x K, weights T x K): top-k renormalised (MixLoRA) or top-p unrenormalised (MixLoRA-Dynamic,
    K = E, weight 0 for dropped experts)."""
    if top_p is not None:
        return top_p_routing(logits, top_p)
    return top_k_routing(logits, top_k)


@dataclass
class ExpertPairs:
    """The (token, expert) pairs of one FFN call sorted by expert, shared by its three projections."""

    token: torch.Tensor  # P, token of each pair
    expert: torch.Tensor  # P, ascending
    weight: torch.Tensor  # P, routing weight
    offsets: torch.Tensor  # E int32, end of each expert's rows (on the device)

    @classmethod
    def of(cls, idx: torch.Tensor, weights: torch.Tensor, num_experts: int, drop_zero: bool) -> ExpertPairs:
        """From top-k ids/weights (T x K). `drop_zero` (top-p) drops the pairs of weight 0; that boolean
        selection reads its size on the host, one synchronisation per layer, which only MixLoRA-Dynamic pays."""
        T, K = idx.shape
        token = torch.arange(T, device=idx.device).repeat_interleave(K)
        expert, w = idx.reshape(-1), weights.reshape(-1)
        if drop_zero:
            keep = w > 0
            token, expert, w = token[keep], expert[keep], w[keep]
        expert, order = torch.sort(expert, stable=True)
        bounds = torch.arange(num_experts, device=idx.device, dtype=expert.dtype)
        offsets = torch.searchsorted(expert, bounds, right=True).to(torch.int32)
        return cls(token.index_select(0, order), expert, w.index_select(0, order), offsets)


class MixLoraFFN(nn.Module):
    """A decoder layer's FFN replaced by MixLoRA's mixture of FFN experts (module docstring for the maths).

    `gate_proj`, `up_proj` and `down_proj` keep the original names; adapted ones become `ExpertProjection`
    (frozen `base_layer` + per-expert LoRA bank), the others stay the frozen linear that every expert uses.
    """

    def __init__(self, mlp: nn.Module, cfg: MixLoraConfig, ctx: ForwardContext, adapted: set[str]) -> None:
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        self.act_fn = mlp.act_fn
        for name in FFN_PROJ:
            base = getattr(mlp, name)
            proj = ExpertProjection(base, cfg.num_experts, cfg.r, cfg.lora_alpha, cfg.lora_dropout) \
                if name in adapted else base
            setattr(self, name, proj)
        base_gate = _base(self.gate_proj)
        self.router = StatsRouter(base_gate.in_features, cfg.num_experts, "normal", cfg.router_init_std,
                                  device=base_gate.weight.device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        x = h.reshape(-1, shape[-1])
        T = x.shape[0]
        mask = self.ctx.flat_mask(T)
        logits = self.router(x)  # T x E, fp32
        self.ctx.router_logits.append(logits)
        self.ctx.router_masks.append(mask)
        idx, weights = select_experts(logits, self.cfg.top_k, self.cfg.top_p)
        self.router.record(idx, weights, mask)
        pairs = ExpertPairs.of(idx, weights, self.cfg.num_experts, drop_zero=self.cfg.top_p is not None)
        dispatch = self.cfg.dispatch
        gate_all = _base(self.gate_proj)(x)  # W_gate h and W_up h once for all experts (shared)
        up_all = _base(self.up_proj)(x)
        xs = x.index_select(0, pairs.token)
        # Without autograd the P x d_ffn intermediates are updated in place: each fresh tensor of that size
        # costs as much in page faults as the arithmetic on it.
        inplace = not torch.is_grad_enabled()
        gate = _plus_delta(gate_all.index_select(0, pairs.token), self.gate_proj, xs, pairs, dispatch, inplace)
        up = _plus_delta(up_all.index_select(0, pairs.token), self.up_proj, xs, pairs, dispatch, inplace)
        if inplace:
            act = (F.silu(gate, inplace=True) if isinstance(self.act_fn, nn.SiLU) else self.act_fn(gate)).mul_(up)
        else:
            act = self.act_fn(gate) * up  # P x d_ffn: each expert's own input to its down projection
        down_delta = self.down_proj.delta(act, pairs, True, dispatch) \
            if isinstance(self.down_proj, ExpertProjection) else None
        # W_down is linear: sum_p w_p W_down act_p = W_down (sum_p w_p act_p), so the frozen down projection
        # runs once per token on the weighted mix instead of once per (token, expert) pair as in MixLoRA's
        # code (same result up to rounding; a quarter of the layer's multiply-adds saved at top-2).
        w = pairs.weight[:, None].to(act.dtype)
        weighted = act.mul_(w) if inplace else act * w
        mixed = act.new_zeros(x.shape[0], act.shape[1]).index_add_(0, pairs.token, weighted)
        out = _base(self.down_proj)(mixed)
        if down_delta is not None:
            out = out.index_add_(0, pairs.token, down_delta.to(out.dtype))
        return out.view(shape)


def inject_mixlora(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext) -> None:
    """FFN projections among the targets -> one MixLoraFFN per decoder FFN (replacing its `mlp` module);
    other targets (the attention projections) -> plain LoRA."""
    assert isinstance(cfg, MixLoraConfig)
    ffn: dict[str, set[str]] = {}
    for name in find_targets(model, cfg.target_modules):
        parent, _, short = name.rpartition(".")
        if short in FFN_PROJ:
            ffn.setdefault(parent, set()).add(short)
        else:
            lora = LoraLinear(model.get_submodule(name), cfg.r, cfg.lora_alpha, cfg.lora_dropout)
            set_module(model, name, lora)
    for parent, adapted in ffn.items():
        mlp = model.get_submodule(parent)
        gated = all(isinstance(getattr(mlp, n, None), nn.Linear) for n in FFN_PROJ) and hasattr(mlp, "act_fn")
        if not gated:
            raise TargetModuleError(f"MixLoRA needs a gated FFN with gate_proj, up_proj, down_proj and "
                                    f"act_fn (Llama, Qwen2, Mistral); {parent} is a {type(mlp).__name__}")
        set_module(model, parent, MixLoraFFN(mlp, cfg, ctx, adapted))


def mixlora_balance_loss(logits: list[torch.Tensor], masks: list[torch.Tensor | None], num_experts: int,
                         top_k: int, top_p: float | None = None) -> torch.Tensor:
    """E * sum_{slot, e} F[slot, e] P[e] over all layers' router logits concatenated (MixLoRA 3.3; MoE-PEFT
    computes it once over the concatenation, not per layer), padding excluded. For top-p, F counts every
    kept expert (ids of dropped experts are set to E, which `switch_balance_loss` ignores)."""
    z = torch.cat(logits)
    mask = torch.cat([m.reshape(-1).bool() if m is not None else torch.ones(l.shape[0], dtype=torch.bool,
                                                                            device=l.device)
                      for l, m in zip(logits, masks, strict=True)])
    idx, w = select_experts(z, top_k, top_p)
    idx = torch.where(w > 0, idx, torch.full_like(idx, num_experts))
    return switch_balance_loss(z, idx, num_experts, mask)


def mixlora_aux_losses(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext
                       ) -> dict[str, tuple[torch.Tensor, float]]:
    assert isinstance(cfg, MixLoraConfig)
    if not ctx.router_logits:
        return {}
    loss = mixlora_balance_loss(ctx.router_logits, ctx.router_masks, cfg.num_experts, cfg.top_k, cfg.top_p)
    return {"balance": (loss, cfg.router_aux_loss_coef)}
