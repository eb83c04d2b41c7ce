"""mixlora: its config and layers, and its registry entry."""

from ...registry import MethodSpec
from .config import MixLoraConfig
from .layer import inject_mixlora, mixlora_aux_losses

SPEC = MethodSpec(
    name="mixlora", config_class=MixLoraConfig,
    peft_type="MIXLORA",
    inject=inject_mixlora,
    aux_losses=mixlora_aux_losses,
    merge_refusal=("MixLoRA routes every token to its own top-k (or top-p) FFN experts, so the FFN update "
                   "depends on the input and cannot be folded into the base weights; run the AdapterModel "
                   "for inference."),
    sparse_routing=True, moe_peft_type="MIXLORA",
)
