"""The MixLoraConfig dataclass: every coefficient of the method and its default
(the paper's, or ours where the paper is silent)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ALL_PROJ, AdapterConfig, check


@dataclass
class MixLoraConfig(AdapterConfig):
    """MixLoRA (Li et al. 2024): FFN-level LoRA experts sharing the frozen FFN, top-k (or top-p) router,
    plain LoRA on the attention projections, load-balancing loss over all layers."""

    method: str = "mixlora"
    target_modules: list[str] | str = field(default_factory=lambda: list(ALL_PROJ))
    num_experts: int = 8
    top_k: int = 2
    top_p: float | None = None  # MixLoRA-Dynamic when set (paper: 0.8)
    router_aux_loss_coef: float = 0.01
    router_init_std: float = 0.02
    dispatch: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        check(1 <= self.top_k <= self.num_experts,
               f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        check(self.top_p is None or 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.router_aux_loss_coef >= 0, "router_aux_loss_coef must be >= 0")
        check(self.dispatch in ("auto", "dense", "grouped"),
               f"dispatch must be 'auto', 'dense' or 'grouped', got {self.dispatch!r}")
