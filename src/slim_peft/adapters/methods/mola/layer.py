"""MoLA: Higher Layers Need More LoRA Experts (Gao et al. 2024, arXiv 2402.08562; official code GCYZSL/MoLA).

Every adapted linear (default all seven projections) of decoder layer l gets E_l LoRA experts (a stacked
`LoraExpertBank`) and its own top-k router on its own input (official `Linear_MoE`):

    z = R x (fp32),  p = softmax(z),  (S, w) = top-k(p),  w <- w / sum w
    y = W x + b + sum_{e in S} w_e s B_e A_e dropout(x)

Layer-wise allocation: `experts_per_layer` is either one count per decoder layer, or G group sizes spread
over G equal groups of consecutive layers (layer l gets group floor(l G / L)): "2,4,6,8" gives the lowest
quarter 2 experts and the top quarter 8, the paper's best "2-4-6-8" (with L not a multiple of G the groups
differ by one layer). "8" alone is the uniform 8 experts of the SLIM comparison (and MoE-PEFT).

Router init: Kaiming-uniform as the official code and MoE-PEFT (`router_init="kaiming"`, default), or
N(0, router_init_std) (`router_init="normal"`, MixLoRA's). Optional load balancing (official code, off by
default): per adapted linear E_l sum_e f_e P_e with f_e the share of the top-k selections going to e
(sum_e f_e = 1; = the Switch form / k), summed over linears and layers, weight `router_aux_loss_coef`.

Saved keys per adapted linear `<path>`: `<path>.experts.lora_A` (E_l x r x d_in), `<path>.experts.lora_B`
(E_l x d_out x r), `<path>.router.weight` (E_l x d_in, fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from slim_peft.errors import ConfigError

from ...config import AdapterConfig
from ...context import ForwardContext
from ...modules.dropout import adapter_dropout
from ...modules.experts import LoraExpertBank, mix_experts
from ...modules.routing import StatsRouter, switch_balance_loss, top_k_routing
from ...targeting import find_targets, layer_index, set_module
from .config import MolaConfig


def experts_per_layer(spec: list[int], num_layers: int) -> list[int]:
    """Expert count of each of `num_layers` layers: `spec` itself when it has one entry per layer, else its
    G entries spread over G equal groups of consecutive layers (layer l -> spec[l * G // num_layers])."""
    G = len(spec)
    if G == num_layers:
        return list(spec)
    if G > num_layers:
        raise ConfigError(f"experts_per_layer has {G} entries but the model has {num_layers} layers: give "
                          f"one count per layer or at most {num_layers} group sizes")
    return [spec[l * G // num_layers] for l in range(num_layers)]


class MolaLinear(nn.Module):
    """A frozen linear plus MoLA's top-k mixture of `num_experts` LoRA experts (module docstring)."""

    def __init__(self, base_layer: nn.Linear, num_experts: int, cfg: MolaConfig, ctx: ForwardContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.cfg = cfg
        self.ctx = ctx
        self.scaling = cfg.scaling
        device = base_layer.weight.device
        self.lora_dropout = adapter_dropout(cfg.lora_dropout)
        self.experts = LoraExpertBank(num_experts, base_layer.in_features, base_layer.out_features, cfg.r,
                                      device=device)
        self.router = StatsRouter(base_layer.in_features, num_experts, cfg.router_init, cfg.router_init_std,
                                  device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        xt = x.reshape(-1, x.shape[-1])
        logits = self.router(xt)
        idx, weights = top_k_routing(logits, self.cfg.top_k)  # softmax over the kept logits = renormalised
        mask = self.ctx.flat_mask(xt.shape[0])
        self.router.record(idx, weights.detach(), mask)
        if self.cfg.router_aux_loss_coef > 0:
            E = logits.shape[1]
            self.ctx.add_aux("balance", switch_balance_loss(logits, idx, E, mask) / self.cfg.top_k)
        x_drop = self.lora_dropout(xt.to(self.experts.lora_A.dtype))
        delta = mix_experts(x_drop, self.experts.lora_A, self.experts.lora_B, idx, weights)
        return result + (self.scaling * delta).view(*x.shape[:-1], -1).to(result.dtype)


def inject_mola(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext) -> None:
    assert isinstance(cfg, MolaConfig)
    counts = experts_per_layer(cfg.experts_per_layer, model.config.num_hidden_layers)
    for name in find_targets(model, cfg.target_modules):
        layer = layer_index(name)
        set_module(model, name, MolaLinear(model.get_submodule(name), counts[layer], cfg, ctx))


def mola_aux_losses(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext
                    ) -> dict[str, tuple[torch.Tensor, float]]:
    assert isinstance(cfg, MolaConfig)
    return {"balance": (ctx.aux["balance"], cfg.router_aux_loss_coef)} if "balance" in ctx.aux else {}
