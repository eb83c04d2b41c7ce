"""The ILoraConfig dataclass: every coefficient of the method and its default
(the paper's, or ours where the paper is silent)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ATTENTION_PROJ, AdapterConfig, check


@dataclass
class ILoraConfig(AdapterConfig):
    """I-LoRA (Ren et al. 2024): fast LoRA + slow EMA LoRA, replay buffer, consistency loss."""

    method: str = "ilora"
    r: int = 8
    lora_dropout: float = 0.1
    target_modules: list[str] | str = field(default_factory=lambda: list(ATTENTION_PROJ))
    ema_alpha: float = 0.99
    replay_capacity: int = 500
    consistency_weight: float = 1.0
    eval_with: str = "slow"  # "slow" (paper) or "fast"
    replay_from: str = "seen"  # "seen": examples of any earlier step; "previous_tasks": paper

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.ema_alpha <= 1, f"ema_alpha must be in [0, 1], got {self.ema_alpha}")
        check(self.replay_capacity >= 1, f"replay_capacity must be >= 1, got {self.replay_capacity}")
        check(self.consistency_weight >= 0, "consistency_weight must be >= 0")
        check(self.eval_with in ("slow", "fast"), f"eval_with must be 'slow' or 'fast', got {self.eval_with!r}")
        check(self.replay_from in ("seen", "previous_tasks"),
               f"replay_from must be 'seen' or 'previous_tasks', got {self.replay_from!r}")
