"""ER, experience replay on LoRA (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning",
arXiv 1902.10486): the continual-learning baseline I-LoRA's paper improves on. LoRA layers, and the replay
training step of `adapters/replay.py`: every step also trains on a replay batch of the same size drawn from a
reservoir buffer, loss = (CE(current) + CE(replay)) / 2; by default only earlier tasks' examples replay
(`replay_from="previous_tasks"`, so a single-stage run is plain LoRA). No slow learner, no consistency loss:
I-LoRA is this plus both. The adapter is a LoRA adapter (PEFT's layout; it merges).
"""

from ...registry import MethodSpec
from ...replay import ReplayModel
from ..lora.layer import inject_lora
from .config import ErConfig

SPEC = MethodSpec(name="er", config_class=ErConfig, peft_type="LORA", inject=inject_lora, model_class=ReplayModel)

__all__ = ["SPEC", "ErConfig"]
