"""slim: its config and layers, and its registry entry."""

from ...registry import MethodSpec
from .config import SlimConfig
from .layer import inject_slim, slim_aux_losses

SPEC = MethodSpec(
    name="slim", config_class=SlimConfig,
    peft_type="SLIM",
    inject=inject_slim,
    aux_losses=slim_aux_losses,
    merge_refusal=("SLIM routes every token to its own mix of LoRA and identity experts, so its update "
                   "depends on the input and cannot be folded into the base weights; run the AdapterModel "
                   "for inference (or route everything to one expert and merge that expert by hand)."),
    sparse_routing=True,
)
