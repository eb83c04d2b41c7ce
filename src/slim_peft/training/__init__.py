"""Training: arguments (Hugging Face spelling), the loop on accelerate, atomic checkpoints with exact resume,
metrics logging, and the allocator switch."""

from .args import TrainingArguments
from .checkpoint import (
    CHECKPOINT_PREFIX,
    TrainerState,
    list_checkpoints,
    resolve_checkpoint,
    staged_output_dir,
)
from .logging import MetricsLogger, read_metrics
from .trainer import Trainer, TrainOutput, build_optimizer, build_scheduler, configure_threads, seed_everything

__all__ = [
    "CHECKPOINT_PREFIX", "MetricsLogger", "TrainOutput", "Trainer", "TrainerState", "TrainingArguments",
    "build_optimizer", "build_scheduler", "configure_threads", "list_checkpoints", "read_metrics",
    "resolve_checkpoint", "seed_everything", "staged_output_dir",
]
