"""lora: its config and layers, and its registry entry."""

from ...registry import MethodSpec
from .config import LoraConfig
from .layer import inject_lora

SPEC = MethodSpec(
    name="lora", config_class=LoraConfig,
    peft_type="LORA", inject=inject_lora,
    moe_peft_type="LORA",
)
