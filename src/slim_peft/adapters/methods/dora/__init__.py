"""dora: its config (DoRA shares LoRA's layer, `LoraLinear(use_dora=True)`) and its registry entry."""

from torch import nn

from ...config import AdapterConfig
from ...context import ForwardContext
from ...registry import MethodSpec
from ..lora.layer import inject_lora
from .config import DoraConfig


def inject_dora(model: nn.Module, cfg: AdapterConfig, ctx: ForwardContext) -> None:
    inject_lora(model, cfg, ctx, use_dora=True)


SPEC = MethodSpec(name="dora", config_class=DoraConfig, peft_type="LORA", inject=inject_dora, moe_peft_type=None)
