"""LoRA and DoRA linear layers, laid out as PEFT lays them out (base_layer, lora_A, lora_B,
lora_magnitude_vector), so that a saved adapter loads in stock `peft.PeftModel` with the same logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AdapterConfig
from ...context import ForwardContext
from ...modules.dropout import adapter_dropout
from ...targeting import find_targets, set_module


class LoraLinear(nn.Module):
    """y = W x + b + s B A dropout(x)  (LoRA, Hu et al. 2021); with `use_dora`, DoRA (Liu et al. 2024):

    y = W x + b + (g - 1) (W x) + g s B A dropout(x),  g = m / ||W + s B A||_c  (norm detached, DoRA 4.3),

    which is m (W + s B A) x / ||W + s B A||_c + b computed without forming the merged weight, as PEFT does.
    The adapter weights are kept in fp32 (PEFT's default for half-precision bases).
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float,
                 use_dora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = lora_alpha / r
        self.use_dora = use_dora
        self.lora_dropout = adapter_dropout(lora_dropout)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)
        if use_dora:
            norm = self.base_layer.weight.detach().float().norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm)  # m, initialised to ||W||_c

    def delta_weight(self) -> torch.Tensor:
        """s B A, the LoRA update of W (d_out x d_in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _dora_scale(self) -> torch.Tensor:
        weight = self.base_layer.weight.float() + self.delta_weight().detach()
        return self.lora_magnitude_vector / weight.norm(dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x_drop = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        lora = self.lora_B(self.lora_A(x_drop)) * self.scaling
        if not self.use_dora:
            return result + lora.to(result.dtype)
        g = self._dora_scale()
        if isinstance(self.lora_dropout, nn.Dropout) and self.training:
            base = F.linear(x_drop, self.base_layer.weight.to(x_drop.dtype))  # PEFT recomputes W x on dropout(x)
        else:
            base = result.to(lora.dtype)
            if self.base_layer.bias is not None:
                base = base - self.base_layer.bias
        return result + ((g - 1) * base + g * lora).to(result.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + s B A (LoRA) or m (W + s B A) / ||W + s B A||_c (DoRA)."""
        base = self.base_layer
        weight = base.weight.float() + self.delta_weight()
        if self.use_dora:
            weight = self.lora_magnitude_vector[:, None] * weight / weight.norm(dim=1, keepdim=True)
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(weight.to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out


def inject_lora(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext, use_dora: bool = False) -> None:
    """Replace each target linear with a LoraLinear (a DoRA one with `use_dora`)."""
    for name in find_targets(model, cfg.target_modules):
        base = model.get_submodule(name)
        set_module(model, name, LoraLinear(base, cfg.r, cfg.lora_alpha, cfg.lora_dropout, use_dora=use_dora))
