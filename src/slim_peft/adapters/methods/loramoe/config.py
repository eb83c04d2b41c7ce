"""The LoraMoeConfig dataclass: every coefficient of the method and its default
(the paper's, or ours where the paper is silent)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import FFN_PROJ, AdapterConfig, check


@dataclass
class LoraMoeConfig(AdapterConfig):
    """LoRAMoE (Dou et al. 2023): dense router over LoRA experts per FFN linear, localized balancing
    constraint (experts in two groups; samples typed world-knowledge 0 / downstream 1)."""

    method: str = "loramoe"
    target_modules: list[str] | str = field(default_factory=lambda: list(FFN_PROJ))
    num_experts: int = 8
    lbc_alpha: float = 0.1  # delta: importance weight 1 +/- delta
    lbc_weight: float = 0.1  # beta: weight of L_lbc in the total loss
    lbc_form: str = "paper"  # "paper": Var/Mean; "code": Var/Mean^2

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_experts >= 2, f"LoRAMoE needs num_experts >= 2 (two groups), got {self.num_experts}")
        check(0 <= self.lbc_alpha < 1, f"lbc_alpha must be in [0, 1), got {self.lbc_alpha}")
        check(self.lbc_weight >= 0, f"lbc_weight must be >= 0, got {self.lbc_weight}")
        check(self.lbc_form in ("paper", "code"), f"lbc_form must be 'paper' or 'code', got {self.lbc_form!r}")
