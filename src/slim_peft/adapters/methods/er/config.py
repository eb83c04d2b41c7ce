"""The ErConfig dataclass: LoRA's fields plus the replay buffer's."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check
from ..lora.config import LoraConfig


@dataclass
class ErConfig(LoraConfig):
    """Experience replay on LoRA (Chaudhry et al. 2019): LoRA trained on (CE(current) + CE(replay)) / 2."""

    method: str = "er"
    replay_capacity: int = 500
    replay_from: str = "previous_tasks"  # "previous_tasks" (the continual baseline) or "seen"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.replay_capacity >= 1, f"replay_capacity must be >= 1, got {self.replay_capacity}")
        check(self.replay_from in ("seen", "previous_tasks"),
              f"replay_from must be 'seen' or 'previous_tasks', got {self.replay_from!r}")
