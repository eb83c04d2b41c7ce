"""loramoe: its config and layers, and its registry entry."""

from ...registry import MethodSpec
from .config import LoraMoeConfig
from .layer import inject_loramoe, loramoe_aux_losses

SPEC = MethodSpec(
    name="loramoe", config_class=LoraMoeConfig,
    peft_type="LORAMOE",
    inject=inject_loramoe,
    aux_losses=loramoe_aux_losses,
    merge_refusal=("LoRAMoE mixes its LoRA experts with router weights computed from each token, so the "
                   "update depends on the input and cannot be folded into the base weights; run the "
                   "AdapterModel for inference."),
    moe_peft_type="LORAMOE",
)
