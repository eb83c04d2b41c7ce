"""I-LoRA's layer: a LoRA linear with a fast (trained) and a slow (EMA) learner."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AdapterConfig
from ...context import ForwardContext
from ...modules.statistics import full_tensor
from ...targeting import find_targets, set_module
from ..lora.layer import LoraLinear
from .config import ILoraConfig


class ILoraLinear(LoraLinear):
    """LoRA with a fast learner (`lora_A`, `lora_B`: trained) and a slow learner (`slow_lora_A`,
    `slow_lora_B`: EMA buffers). `learner` forces one ("fast" / "slow"); None: fast in training mode, the
    `eval_with` learner in eval mode."""

    def __init__(self, base_layer: nn.Linear, cfg: ILoraConfig) -> None:
        super().__init__(base_layer, cfg.r, cfg.lora_alpha, cfg.lora_dropout)
        self.eval_with = cfg.eval_with
        self.learner: str | None = None
        self.register_buffer("slow_lora_A", self.lora_A.weight.detach().clone())
        self.register_buffer("slow_lora_B", self.lora_B.weight.detach().clone())
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long, device=base_layer.weight.device))

    def active_learner(self) -> str:
        return self.learner or ("fast" if self.training else self.eval_with)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active_learner() == "fast":
            return super().forward(x)
        result = self.base_layer(x)
        slow = F.linear(F.linear(x.to(self.slow_lora_A.dtype), self.slow_lora_A), self.slow_lora_B)
        return result + (self.scaling * slow).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s B A of the `eval_with` learner: what `merged()` (merge_and_unload) folds into W."""
        if self.eval_with == "fast":
            return super().delta_weight()
        return self.scaling * (self.slow_lora_B @ self.slow_lora_A)

    @torch.no_grad()
    def ema_update(self, a: float) -> None:
        """slow <- a slow + (1 - a) fast; step += 1. Under FSDP the fast learner is gathered whole (every
        process calls this after each optimizer step) and the slow buffers stay whole on every process."""
        self.slow_lora_A.mul_(a).add_(full_tensor(self.lora_A.weight.detach()), alpha=1.0 - a)
        self.slow_lora_B.mul_(a).add_(full_tensor(self.lora_B.weight.detach()), alpha=1.0 - a)
        self.ema_step += 1


def ema_coefficient(step: int, ema_alpha: float) -> float:
    """a = min(1 - 1 / (step + 1), ema_alpha) (official `update_ema_model`): 0 at step 0 (slow := fast)."""
    return min(1.0 - 1.0 / (step + 1), ema_alpha)


def inject_ilora(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext) -> None:
    assert isinstance(cfg, ILoraConfig)
    for name in find_targets(model, cfg.target_modules):
        set_module(model, name, ILoraLinear(model.get_submodule(name), cfg))
