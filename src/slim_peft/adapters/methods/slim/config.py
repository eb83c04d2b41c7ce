"""The SlimConfig dataclass: every coefficient of the method and its default
(the paper's, or ours where the paper is silent)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import FFN_PROJ, AdapterConfig, check


@dataclass
class SlimConfig(AdapterConfig):
    """SLIM (Han et al. 2024): LoRA + identity experts, weight yielding, dynamic merging.

    Every decision of the method (routing, clusters and weight yielding, dynamic merging, losses), including
    ours where the paper is silent, is a field here so that it can be ablated.
    """

    method: str = "slim"
    target_modules: list[str] | str = field(default_factory=lambda: list(FFN_PROJ))
    num_lora_experts: int = 8
    num_identity_experts: int = 2
    top_k: int = 2
    routing: str = "block"  # "block": one router per decoder FFN; "linear": one per adapted linear
    router_init_std: float = 0.02
    # sliding clusters and weight yielding
    num_clusters: int = 8
    cluster_momentum: float = 0.1
    distance: str = "calibrated"  # "calibrated": rho / tau - 1; "max": rho - 1 (paper-literal)
    yield_strength: float = 1.0  # gamma; 0 disables weight yielding
    yield_clamp: bool = False  # use max(d, 0)
    # in a task sequence (`slim-peft continual`): "slide" (the clusters follow the latest task) or "keep" (each
    # finished task's clusters are kept, the distance is the smallest over all of them; at most max_tasks)
    clusters_across_tasks: str = "slide"
    max_tasks: int = 8
    # dynamic merging
    mask_ratio: float = 0.5  # p; 0 disables dynamic merging
    merge_form: str = "fast"  # "fast": row/column masks of B and A; "exact": elementwise DARE on s B A
    rescale: bool = True
    eval_mask: str = "fixed"  # "fixed" (from merge_seed), "resample" or "none"
    merge_seed: int = 0
    # losses
    l1_weight: float = 1e-3
    balance_loss_weight: float = 0.0  # optional switch-style load balancing, off (paper names none)
    dispatch: str = "auto"  # "dense", "grouped" or "auto" (see layers/experts.py)

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_lora_experts + self.num_identity_experts
        check(self.num_lora_experts >= 1, f"num_lora_experts must be >= 1, got {self.num_lora_experts}")
        check(self.num_identity_experts >= 0,
               f"num_identity_experts must be >= 0, got {self.num_identity_experts}")
        check(1 <= self.top_k <= n, f"top_k={self.top_k} must be between 1 and the number of experts "
               f"({self.num_lora_experts} LoRA + {self.num_identity_experts} identity = {n})")
        check(self.routing in ("block", "linear"), f"routing must be 'block' or 'linear', got {self.routing!r}")
        check(self.num_clusters >= 1, f"num_clusters must be >= 1, got {self.num_clusters}")
        check(0.0 < self.cluster_momentum <= 1.0,
               f"cluster_momentum must be in (0, 1], got {self.cluster_momentum}")
        check(self.distance in ("calibrated", "max"),
               f"distance must be 'calibrated' or 'max', got {self.distance!r}")
        check(self.yield_strength >= 0, f"yield_strength must be >= 0, got {self.yield_strength}")
        check(self.clusters_across_tasks in ("slide", "keep"),
              f"clusters_across_tasks must be 'slide' or 'keep', got {self.clusters_across_tasks!r}")
        check(self.max_tasks >= 1, f"max_tasks must be >= 1, got {self.max_tasks}")
        check(0.0 <= self.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        check(self.merge_form in ("fast", "exact"), f"merge_form must be 'fast' or 'exact', got {self.merge_form!r}")
        check(self.eval_mask in ("fixed", "resample", "none"),
               f"eval_mask must be 'fixed', 'resample' or 'none', got {self.eval_mask!r}")
        check(self.l1_weight >= 0 and self.balance_loss_weight >= 0, "loss weights must be >= 0")
        check(self.dispatch in ("auto", "dense", "grouped"),
               f"dispatch must be 'auto', 'dense' or 'grouped', got {self.dispatch!r}")
