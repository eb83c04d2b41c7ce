"""mola: its config and layers, and its registry entry."""

from ...registry import MethodSpec
from .config import MolaConfig
from .layer import inject_mola, mola_aux_losses

SPEC = MethodSpec(
    name="mola", config_class=MolaConfig,
    peft_type="MOLA",
    inject=inject_mola,
    aux_losses=mola_aux_losses,
    merge_refusal=("MoLA routes every token to its own top-k LoRA experts in each linear, so the update "
                   "depends on the input and cannot be folded into the base weights; run the AdapterModel "
                   "for inference."),
    sparse_routing=True, moe_peft_type="MOLA",
)
