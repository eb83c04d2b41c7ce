"""The MolaConfig dataclass: every coefficient of the method and its default
(the paper's, or ours where the paper is silent)."""

from __future__ import annotations

from dataclasses import dataclass, field

from slim_peft.errors import ConfigError

from ...config import ALL_PROJ, AdapterConfig, check


@dataclass
class MolaConfig(AdapterConfig):
    """MoLA (Gao et al. 2024): per-linear top-k routing, number of experts growing with depth."""

    method: str = "mola"
    target_modules: list[str] | str = field(default_factory=lambda: list(ALL_PROJ))
    experts_per_layer: list[int] | str = "2,4,6,8"  # group sizes over equal layer groups, or one per layer
    top_k: int = 2
    router_aux_loss_coef: float = 0.0  # official code: off; 0.001 when on
    router_init: str = "kaiming"  # "kaiming" (official code, MoE-PEFT) or "normal": N(0, router_init_std)
    router_init_std: float = 0.02

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.experts_per_layer, str):
            try:
                self.experts_per_layer = [int(v) for v in self.experts_per_layer.split(",")]
            except ValueError as e:
                raise ConfigError(f"experts_per_layer must look like '2,4,6,8', got {self.experts_per_layer!r}") from e
        self.experts_per_layer = list(self.experts_per_layer)
        check(len(self.experts_per_layer) > 0 and all(n >= 1 for n in self.experts_per_layer),
               f"experts_per_layer must be positive integers, got {self.experts_per_layer}")
        check(1 <= self.top_k <= min(self.experts_per_layer),
               f"top_k={self.top_k} must be between 1 and the smallest expert count {min(self.experts_per_layer)}")
        check(self.router_init in ("kaiming", "normal"),
               f"router_init must be 'kaiming' or 'normal', got {self.router_init!r}")
