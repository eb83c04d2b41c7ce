"""Training hyper-parameters in Hugging Face Trainer spelling."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from slim_peft.errors import ConfigError, closest

SCHEDULERS = ("cosine", "linear", "constant")
REPORTERS = ("jsonl", "tensorboard")


@dataclass
class TrainingArguments:
    """Training hyper-parameters in Hugging Face Trainer spelling (a subset, plus ``max_seq_length``)."""

    output_dir: str = "slim-peft-output"
    overwrite_output_dir: bool = False
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 0  # 0: no periodic evaluation
    save_steps: int = 500  # 0: no intermediate checkpoints
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint directory or "latest"
    report_to: list[str] | str = "jsonl"  # "jsonl" is always on; add "tensorboard"; "none" = jsonl only
    max_seq_length: int = 512
    group_by_length: bool = False
    packing: bool = False  # each micro-batch's sequences packed into rows of max_seq_length (data/batching.py)
    torch_num_threads: int = 0  # 0: the CPU cores available divided among this machine's processes
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        def check(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1/adam_beta2 must be in [0, 1)")
        check(self.adam_epsilon > 0, f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        check(self.per_device_train_batch_size >= 1,
              f"per_device_train_batch_size must be >= 1, got {self.per_device_train_batch_size}")
        check(self.gradient_accumulation_steps >= 1,
              f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        check(self.max_steps > 0 or self.num_train_epochs > 0,
              "set max_steps > 0 or num_train_epochs > 0 (both say train for nothing)")
        check(self.lr_scheduler_type in SCHEDULERS,
              f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of {SCHEDULERS}"
              f"{closest(str(self.lr_scheduler_type), SCHEDULERS)}")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        for name in ("logging_steps", "eval_steps", "save_steps"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.save_total_limit is None or self.save_total_limit >= 1,
              f"save_total_limit must be >= 1 or null, got {self.save_total_limit}")
        check(self.max_seq_length >= 2, f"max_seq_length must be >= 2, got {self.max_seq_length}")
        check(self.torch_num_threads >= 0, f"torch_num_threads must be >= 0, got {self.torch_num_threads}")
        reporters = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        reporters = [r.strip() for item in reporters for r in str(item).split(",") if r.strip()]
        if "all" in reporters:
            reporters = list(REPORTERS)
        reporters = [r for r in reporters if r != "none"]
        for r in reporters:
            check(r in REPORTERS, f"report_to {r!r} is not one of {REPORTERS}{closest(r, REPORTERS)}")
        self.report_to = sorted(set(reporters) | {"jsonl"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that change the trajectory of a run (and so must match on resume); the others only change
# where and how often things are written.
TRAJECTORY_FIELDS = (
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "gradient_accumulation_steps",
    "num_train_epochs", "max_steps", "lr_scheduler_type", "warmup_ratio", "max_grad_norm", "bf16", "seed",
    "max_seq_length", "group_by_length", "packing",
)
