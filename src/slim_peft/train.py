"""The training loop, on accelerate: the same code runs in one process and under ``accelerate launch``.

Single process::

    slim-peft train --config examples/slim.yaml

Several processes (DDP; NCCL on GPUs, gloo on CPUs)::

    accelerate launch --multi_gpu --num_processes 8 -m slim_peft.cli train --config examples/slim.yaml
    accelerate launch --multi_gpu --num_processes 2 -m slim_peft.cli train ...   # CPU-only machine: gloo
    torchrun --nproc_per_node 2 -m slim_peft.cli train ...                       # the same, without accelerate

On a CPU-only machine the trainer builds its ``Accelerator(cpu=True)``, so the processes that ``--multi_gpu``
(or torchrun) starts form a gloo group. Note: ``accelerate launch --cpu --num_processes 2`` starts ONE
process in accelerate 1.x (its CPU path is the "simple" launcher; several CPU processes need ``mpirun``
via ``--mpirun_hostfile``), so it does not give DDP.

The global batch is ``per_device_train_batch_size x processes x gradient_accumulation_steps``; every process
walks the same seeded order of global micro-batches and takes its own slice, so a run with N processes
follows the same data as one process with an N times larger per-device batch.

FSDP and DeepSpeed need no code change, only an accelerate config file (``accelerate launch
--config_file fsdp.yaml ...``), e.g.::

    # fsdp.yaml                                  # deepspeed.yaml
    distributed_type: FSDP                       distributed_type: DEEPSPEED
    num_processes: 8                             num_processes: 8
    mixed_precision: bf16                        mixed_precision: bf16
    fsdp_config:                                 deepspeed_config:
      fsdp_version: 2                              zero_stage: 2
      fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP  gradient_accumulation_steps: 1
      fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer   gradient_clipping: 1.0
      fsdp_state_dict_type: FULL_STATE_DICT        offload_optimizer_device: none
      fsdp_use_orig_params: true   # frozen base + trainable adapters in one module

Under FSDP/DeepSpeed, checkpoints hold ``accelerator.save_state`` (sharded model and optimizer) instead of
the adapter-only state; these two paths are not exercised on the CPU-only machine the tests run on.

A checkpoint (``output_dir/checkpoint-<step>``, written into a temporary directory and renamed into place)
holds the trainable parameters and buffers (``model_state.safetensors``), the optimizer and scheduler
states, every process's RNG states (python, numpy, torch), training state outside the state dict (I-LoRA's
replay buffer, ``extra_state.pt``), the data position and a fingerprint of the
configuration; ``resume_from_checkpoint`` (a path or ``"latest"``) continues the run exactly and refuses a
checkpoint written by another configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slim_peft.config import ConfigError, closest
from slim_peft.data import Collator, DataError, SeededBatchOrder, TokenizedExample, dataset_fingerprint, shard

SCHEDULERS = ("cosine", "linear", "constant")
REPORTERS = ("jsonl", "tensorboard")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
FINAL_STATE_FILE = "final_state.json"
MODEL_STATE_FILE = "model_state.safetensors"


class TrainingError(RuntimeError):
    """A training run cannot start or continue; the message says why and what to do."""


class ResumeError(TrainingError):
    """The checkpoint to resume from is missing, incomplete or from another configuration."""


class NonFiniteLossError(TrainingError):
    """The loss (or gradient norm) became NaN or infinite; the run stopped, earlier checkpoints are kept."""


class OutputDirError(TrainingError):
    """The output directory holds another run and would be overwritten."""


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
    "max_seq_length", "group_by_length",
)


@dataclass
class TrainerState:
    """Where a run is: saved in every checkpoint as ``trainer_state.json``."""

    global_step: int = 0
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next global micro-batch within that epoch
    tokens_seen: int = 0
    total_steps: int = 0
    num_processes: int = 1
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    last_checkpoint: str | None = None


@dataclass
class TrainOutput:
    global_step: int
    final_loss: float
    run_dir: str
    adapter_dir: str
    metrics: dict[str, float]


# --------------------------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (call before building the adapter so its initialisation is fixed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(requested: int = 0, processes_on_machine: int = 1) -> int:
    """Set torch's intra-op threads: ``requested``, else the available cores shared among the processes
    of this machine (2 cores, 2 processes -> 1 thread each, so they do not fight). Returns the count."""
    if requested > 0:
        n = requested
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        n = max(1, cores // max(1, processes_on_machine))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def get_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (evaluation) without moving the training RNG streams."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_configs(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return out


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first (temporary directories are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        suffix = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and (p / STATE_FILE).exists():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(resume: str, output_dir: str | Path) -> Path:
    """``"latest"`` -> the newest complete checkpoint in ``output_dir``; a path -> that checkpoint (or the
    newest inside it when it is a run directory)."""
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise ResumeError(f"resume_from_checkpoint='latest' but {output_dir} holds no complete checkpoint "
                              f"({CHECKPOINT_PREFIX}<step>/ with {STATE_FILE})")
        return ckpts[-1]
    path = Path(resume)
    if not path.exists():
        raise ResumeError(f"checkpoint {path} does not exist")
    if (path / STATE_FILE).exists():
        return path
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    raise ResumeError(f"{path} is not a checkpoint (no {STATE_FILE}) and holds no checkpoint")


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing ``dst`` if it exists (rename-based, so readers see the old
    or the new one, never a half-written one)."""
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextlib.contextmanager
def staged_output_dir(output_dir: str | Path, overwrite: bool = False, resume: bool = False,
                      is_main: bool = True) -> Iterator[Path]:
    """Yield the directory a run should write into, so that a failed run never overwrites a good one.

    - missing or empty ``output_dir``: write there directly (nothing to lose);
    - ``resume``: continue in place;
    - non-empty without ``overwrite``: ``OutputDirError``;
    - non-empty with ``overwrite``: write into a sibling staging directory that replaces ``output_dir`` only
      when the run succeeds; on failure the old directory is untouched and the staging one kept.
    """
    out = Path(output_dir)
    if resume or not _is_nonempty_dir(out):
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
        yield out
        return
    if not overwrite:
        raise OutputDirError(f"output directory {out} already holds files; choose a new output directory, pass "
                             f"--overwrite (overwrite_output_dir; the old one is replaced only if the new run "
                             f"succeeds), or --resume (resume_from_checkpoint latest) to continue it")
    staging = out.with_name(f".{out.name}.staging")
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException as e:
        if isinstance(e, Exception):
            e.add_note(f"{out} was left untouched; the failed run's files are in {staging}")
        raise
    if is_main:
        _replace_dir(staging, out)


def build_optimizer(params: Sequence[nn.Parameter], args: TrainingArguments) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, weight_decay=args.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``ceil(warmup_ratio * total_steps)`` steps, then cosine/linear decay to 0 or
    constant (the same curves as transformers' schedulers)."""
    warmup = math.ceil(args.warmup_ratio * total_steps)
    kind = args.lr_scheduler_type

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and every persistent buffer (cluster states, EMA weights, ...): what a
    checkpoint must hold to continue exactly. The frozen base weights are left out. Uses the model's own
    ``adapter_state_dict`` when it has one."""
    if hasattr(model, "adapter_state_dict"):
        return {k: v.detach().cpu().contiguous().clone() for k, v in model.adapter_state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
            if k in trainable or k in buffers}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`adapter_state_dict` (the model's own loader when it has one)."""
    if hasattr(model, "load_adapter_state_dict"):
        try:
            model.load_adapter_state_dict(state, source="checkpoint")
        except ValueError as e:
            raise ResumeError(str(e)) from e
        return
    own = model.state_dict()
    missing = sorted(set(adapter_state_dict(model)) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ResumeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ResumeError(f"checkpoint tensor {k} has shape {tuple(v.shape)}, model {tuple(own[k].shape)}")
            own[k].copy_(v)


def extra_training_state(model: nn.Module) -> Any:
    """Training state a model keeps outside its state dict: ``model.training_state()`` when it has one,
    else I-LoRA's replay buffer (examples, reservoir count, generator) and task id; None when there is none."""
    if hasattr(model, "training_state"):
        return model.training_state()
    replay = getattr(model, "replay", None)
    if replay is not None and hasattr(replay, "examples") and hasattr(replay, "generator"):
        return {"replay_examples": list(replay.examples), "replay_seen": replay.seen,
                "replay_generator": replay.generator.get_state(), "task_id": getattr(model, "task_id", 0)}
    return None


def load_extra_training_state(model: nn.Module, state: Any) -> None:
    """Inverse of :func:`extra_training_state`."""
    if hasattr(model, "load_training_state"):
        model.load_training_state(state)
        return
    replay = getattr(model, "replay", None)
    if replay is not None and isinstance(state, dict) and "replay_examples" in state:
        replay.examples = list(state["replay_examples"])
        replay.seen = state["replay_seen"]
        replay.generator.set_state(state["replay_generator"])
        model.task_id = state.get("task_id", 0)


def _unwrapped_method(model: nn.Module) -> str:
    cfg = getattr(model, "adapter_config", None)
    return str(getattr(cfg, "method", ""))


MIXTURE_METHODS = {"slim", "mixlora", "mola"}  # top-k routing: some experts get no gradient in a step


# ---------------------------------------------------------------------------------------------- trainer


class Trainer:
    """Train an ``AdapterModel`` on tokenised examples.

    ``eval_fn(model) -> dict[str, float]`` runs every ``eval_steps`` on the main process (model in eval
    mode, RNG streams untouched); with ``eval_dataset`` the held-out loss is logged as ``eval/loss``.
    ``run_config`` (e.g. model name and adapter config) is part of the configuration fingerprint checked on
    resume. ``callbacks`` are called as ``cb(trainer)`` after every optimizer step.
    """

    def __init__(self, model: nn.Module, args: TrainingArguments, train_dataset: Sequence[TokenizedExample], *,
                 pad_token_id: int = 0, eval_dataset: Sequence[TokenizedExample] | None = None,
                 eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 run_config: dict[str, Any] | None = None,
                 callbacks: Sequence[Callable[[Trainer], None]] = ()):
        if not train_dataset:
            raise DataError("the training data is empty")
        self.model = model
        self.args = args
        self.train_dataset = list(train_dataset)
        self.eval_dataset = list(eval_dataset) if eval_dataset else []
        self.eval_fn = eval_fn
        self.collator = Collator(pad_token_id)
        self.run_config = dict(run_config or {})
        self.callbacks = list(callbacks)
        self.state = TrainerState()
        self.run_dir: Path | None = None
        self.accelerator: Any = None
        self.last_log: dict[str, float] = {}

    # -- setup

    def _make_accelerator(self) -> Any:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs

        mixed = "bf16" if self.args.bf16 else "no"
        if AcceleratorState._shared_state:
            st = AcceleratorState()
            if st.distributed_type == "NO" and str(st.mixed_precision) != mixed:
                AcceleratorState._reset_state()  # one process, another precision: a fresh state is allowed
        find_unused = _unwrapped_method(self.model) in MIXTURE_METHODS
        has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        # cpu=True on a machine without an accelerator: processes started by torchrun or `accelerate launch
        # --multi_gpu` then form a MULTI_CPU (gloo) group instead of each running alone
        return Accelerator(mixed_precision=mixed, cpu=not has_accel,
                           kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])

    def fingerprint_config(self) -> dict[str, Any]:
        """What must match for a resume: trajectory hyper-parameters, global batch, data, model, adapter."""
        acc = self.accelerator
        training = {k: getattr(self.args, k) for k in TRAJECTORY_FIELDS}
        training["global_micro_batch"] = self.args.per_device_train_batch_size * acc.num_processes
        cfg = getattr(self.model, "adapter_config", None)
        adapter = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
        return {"training": training, "adapter": adapter, "data": dataset_fingerprint(self.train_dataset),
                "run": self.run_config}

    def _total_steps(self, order: SeededBatchOrder) -> int:
        if self.args.max_steps > 0:
            return self.args.max_steps
        micro = math.ceil(self.args.num_train_epochs * order.batches_per_epoch)
        return max(1, micro // self.args.gradient_accumulation_steps)

    # -- main entry

    def train(self, run_dir: str | Path | None = None) -> TrainOutput:
        """Run (or resume) training; returns the final step, loss and where the adapter was saved.

        Without ``run_dir`` the run writes into ``args.output_dir`` under :func:`staged_output_dir`'s rules;
        a caller that already guards a directory (``slim-peft run``) passes it as ``run_dir``.
        """
        args = self.args
        acc = self._make_accelerator()
        self.accelerator = acc
        configure_threads(args.torch_num_threads, _local_world_size())
        self.checkpoint = None
        in_place = False
        if args.resume_from_checkpoint:
            self.checkpoint = resolve_checkpoint(args.resume_from_checkpoint, run_dir or args.output_dir)
            out_dir = Path(args.output_dir).resolve()
            in_place = out_dir in self.checkpoint.resolve().parents or not _is_nonempty_dir(out_dir)
        if run_dir is not None:
            return self._train_in(Path(run_dir))
        with staged_output_dir(args.output_dir, args.overwrite_output_dir, resume=in_place,
                               is_main=acc.is_main_process) as staged:
            acc.wait_for_everyone()
            out = self._train_in(staged)
        # the staging directory (if any) has become output_dir
        final_dir = Path(args.output_dir)
        out.run_dir = str(final_dir)
        out.adapter_dir = str(final_dir / "adapter")
        return out

    def _train_in(self, run_dir: Path) -> TrainOutput:
        acc = self.accelerator
        self.run_dir = run_dir
        try:
            out = self._train(run_dir)
        except Exception as e:
            if acc.is_main_process:
                _write_json(run_dir / "run_status.json", {"status": "failed", "error": str(e),
                                                           "step": self.state.global_step})
            raise
        if acc.is_main_process:
            _write_json(run_dir / "run_status.json", {"status": "completed", "step": self.state.global_step})
        acc.wait_for_everyone()
        return out

    def _train(self, run_dir: Path) -> TrainOutput:
        args, acc = self.args, self.accelerator
        world, rank = acc.num_processes, acc.process_index
        order = SeededBatchOrder([len(ex) for ex in self.train_dataset],
                                 args.per_device_train_batch_size * world, args.seed, args.group_by_length)
        total_steps = self._total_steps(order)
        fp_config = self.fingerprint_config()
        state = TrainerState(total_steps=total_steps, num_processes=world, config_hash=config_hash(fp_config),
                             config=fp_config)

        model = self.model
        if args.gradient_checkpointing:
            base = getattr(model, "base_model", model)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        optimizer = build_optimizer(_trainable_parameters(model), args)
        scheduler = build_scheduler(optimizer, args, total_steps)
        wrapped, optimizer = acc.prepare(model, optimizer)

        if self.checkpoint is not None:
            ckpt = self.checkpoint
            state = self._load_checkpoint(ckpt, state, wrapped, optimizer, scheduler)
            acc.print(f"resumed from {ckpt} at step {state.global_step}/{total_steps}")
        else:
            seed_everything(args.seed + rank)  # the data order does not depend on it; dropout/masks do
        self.state = state
        if acc.is_main_process:
            _write_json(run_dir / "training_args.json", args.to_dict())
            _write_json(run_dir / "run_config.json", fp_config)
        logger = MetricsLogger(run_dir, args.report_to, acc.is_main_process, truncate_after=state.global_step)
        unwrapped = acc.unwrap_model(wrapped)
        if hasattr(unwrapped, "reset_routing_stats"):
            unwrapped.reset_routing_stats()

        bar = _progress_bar(total_steps, state.global_step, disable=args.disable_tqdm or not acc.is_main_process)
        window: dict[str, float] = defaultdict(float)
        last_eval: dict[str, Any] = {}
        window_start = time.perf_counter()
        last_loss = float("nan")
        try:
            while state.global_step < total_steps:
                t_step = time.perf_counter()
                step_loss, aux, tokens, grad_norm = self._optimizer_step(wrapped, unwrapped, optimizer, scheduler,
                                                                          order)
                step_tok_s = tokens * world / max(time.perf_counter() - t_step, 1e-9)
                state.global_step += 1
                state.tokens_seen += tokens
                last_loss = step_loss
                window["loss"] += step_loss
                window["steps"] += 1
                window["tokens"] += tokens
                window["grad_norm"] += grad_norm
                for k, v in aux.items():
                    window[f"aux/{k}"] += v
                if args.logging_steps and (state.global_step % args.logging_steps == 0
                                           or state.global_step == total_steps):
                    elapsed = time.perf_counter() - window_start
                    record = self._log_window(window, elapsed, scheduler, state)
                    logger.log(record)
                    self.last_log = record
                    window = defaultdict(float)
                    window_start = time.perf_counter()
                bar.set_postfix(_postfix(step_loss, aux, step_tok_s), refresh=False)
                bar.update(1)
                if args.eval_steps and state.global_step % args.eval_steps == 0:
                    last_eval = self._evaluate(unwrapped, state.global_step)
                    logger.log(last_eval)
                if args.save_steps and state.global_step % args.save_steps == 0 and state.global_step < total_steps:
                    self._save_checkpoint(run_dir, state, wrapped, optimizer, scheduler)
                for cb in self.callbacks:
                    cb(self)
            final_metrics = last_eval if last_eval.get("step") == state.global_step else {}
            if not final_metrics and (self.eval_dataset or self.eval_fn):  # always evaluate the final model
                final_metrics = self._evaluate(unwrapped, state.global_step)
                logger.log(final_metrics)
            self._save_final(run_dir, unwrapped, state)
        finally:
            bar.close()
            logger.close()
        return TrainOutput(global_step=state.global_step, final_loss=last_loss, run_dir=str(run_dir),
                           adapter_dir=str(run_dir / "adapter"),
                           metrics={k: v for k, v in final_metrics.items() if k != "step"})

    # -- one optimizer step

    def _next_batch(self, order: SeededBatchOrder) -> dict[str, torch.Tensor]:
        st = self.state
        if st.batch_in_epoch >= order.batches_per_epoch:
            st.epoch += 1
            st.batch_in_epoch = 0
        indices = order.batch_at(st.epoch, st.batch_in_epoch)
        st.batch_in_epoch += 1
        acc = self.accelerator
        local = shard(indices, acc.process_index, acc.num_processes)
        batch = self.collator([self.train_dataset[i] for i in local])
        return {k: v.to(acc.device) for k, v in batch.items()}

    def _optimizer_step(self, wrapped: nn.Module, unwrapped: nn.Module, optimizer: Any, scheduler: Any,
                        order: SeededBatchOrder) -> tuple[float, dict[str, float], int, float]:
        args, acc = self.args, self.accelerator
        accum = args.gradient_accumulation_steps
        loss_sum = 0.0
        aux_sum: dict[str, float] = defaultdict(float)
        tokens = 0
        for micro in range(accum):
            batch = self._next_batch(order)
            tokens += int(batch["attention_mask"].sum())
            sync = micro == accum - 1
            ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(wrapped)
            with ctx:
                out = wrapped(**batch)
                loss = out.loss
                self._check_finite(loss.detach(), "loss")
                acc.backward(loss / accum)
            loss_sum += float(loss.detach())
            if hasattr(unwrapped, "aux_losses"):
                for k, v in unwrapped.aux_losses().items():
                    aux_sum[k] += float(v.detach()) if torch.is_tensor(v) else float(v)
        params = _trainable_parameters(unwrapped)
        if args.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(params, args.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if norm is None:  # DeepSpeed clips inside its engine and returns no norm
            norm = torch.tensor(float("nan"))
        else:
            norm = torch.as_tensor(norm).detach().float()
            self._check_finite(norm, "gradient norm")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(unwrapped, "after_optimizer_step"):
            unwrapped.after_optimizer_step()
        return loss_sum / accum, {k: v / accum for k, v in aux_sum.items()}, tokens, float(norm)

    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        bad = torch.tensor([0.0 if bool(torch.isfinite(value).all()) else 1.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:  # every process must stop together, or the others hang
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad) > 0:
            st = self.state
            last = st.last_checkpoint or "none was written yet"
            raise NonFiniteLossError(
                f"the {what} became {float(value) if value.numel() == 1 else 'non-finite'} at step "
                f"{st.global_step + 1} (epoch {st.epoch}, batch {st.batch_in_epoch}); training stopped. Last good "
                f"checkpoint: {last}. Lower learning_rate (now {self.args.learning_rate}) or check the data, "
                f"then resume with --resume_from_checkpoint.")

    def _log_window(self, window: dict[str, float], elapsed: float, scheduler: Any,
                    state: TrainerState) -> dict[str, Any]:
        acc = self.accelerator
        steps = max(1.0, window["steps"])
        keys = sorted(k for k in window if k not in ("steps", "tokens"))
        values = torch.tensor([window[k] / steps for k in keys] + [window["tokens"]], dtype=torch.float64,
                              device=acc.device)
        if acc.num_processes > 1:
            values = acc.reduce(values, reduction="sum")
            values[:-1] /= acc.num_processes
        record: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch, "lr": scheduler.get_last_lr()[0]}
        record.update({k: float(v) for k, v in zip(keys, values[:-1].tolist(), strict=True)})
        record["tokens_per_s"] = float(values[-1]) / max(elapsed, 1e-9)
        record["tokens_seen"] = state.tokens_seen * acc.num_processes
        return record

    # -- evaluation

    @torch.no_grad()
    def _eval_loss(self, model: nn.Module) -> float:
        total, n = 0.0, 0
        bs = self.args.per_device_train_batch_size
        for i in range(0, len(self.eval_dataset), bs):
            batch = self.collator(self.eval_dataset[i:i + bs])
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
            out = model(**batch)
            total += float(out.loss) * len(batch["input_ids"])
            n += len(batch["input_ids"])
        return total / max(1, n)

    def _evaluate(self, model: nn.Module, step: int) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step}
        acc = self.accelerator
        if acc.is_main_process and (self.eval_dataset or self.eval_fn):
            was_training = model.training
            model.eval()
            try:
                with preserved_rng():
                    if self.eval_dataset:
                        record["eval/loss"] = self._eval_loss(model)
                    if self.eval_fn:
                        record.update({f"eval/{k}": v for k, v in self.eval_fn(model).items()})
            finally:
                model.train(was_training)
        acc.wait_for_everyone()
        return record

    # -- checkpoints

    def _save_checkpoint(self, run_dir: Path, state: TrainerState, wrapped: nn.Module, optimizer: Any,
                         scheduler: Any) -> Path:
        """Write ``checkpoint-<step>`` into a temporary directory, then rename it into place."""
        acc = self.accelerator
        final = run_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
        tmp = run_dir / f".tmp-{CHECKPOINT_PREFIX}{state.global_step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(get_rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
        if _sharded(acc):
            acc.save_state(str(tmp / "accelerate_state"))
        elif acc.is_main_process:
            from safetensors.torch import save_file

            save_file(adapter_state_dict(acc.unwrap_model(wrapped)), str(tmp / MODEL_STATE_FILE))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if acc.is_main_process:
            extra = extra_training_state(acc.unwrap_model(wrapped))
            if extra is not None:
                torch.save(extra, tmp / "extra_state.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            state.last_checkpoint = str(final)
            _write_json(tmp / STATE_FILE, dataclasses.asdict(state))  # written last: marks it complete
        acc.wait_for_everyone()
        if acc.is_main_process:
            _replace_dir(tmp, final)
            self._rotate_checkpoints(run_dir)
        acc.wait_for_everyone()
        state.last_checkpoint = str(final)
        return final

    def _rotate_checkpoints(self, run_dir: Path) -> None:
        limit = self.args.save_total_limit
        if limit is None:
            return
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self, ckpt: Path, fresh: TrainerState, wrapped: nn.Module, optimizer: Any,
                         scheduler: Any) -> TrainerState:
        acc = self.accelerator
        saved = json.loads((ckpt / STATE_FILE).read_text())
        if saved.get("config_hash") != fresh.config_hash:
            diffs = diff_configs(saved.get("config", {}), fresh.config)
            raise ResumeError(f"checkpoint {ckpt} was written by another configuration; it cannot continue "
                              f"this run exactly:\n  " + "\n  ".join(diffs or ["(fingerprints differ)"])
                              + "\nUse the checkpoint's configuration, or start a new --output_dir.")
        if _sharded(acc):
            acc.load_state(str(ckpt / "accelerate_state"))
        else:
            from safetensors.torch import load_file

            load_adapter_state_dict(acc.unwrap_model(wrapped), load_file(str(ckpt / MODEL_STATE_FILE)))
            optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=acc.device, weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        if (ckpt / "extra_state.pt").exists():
            extra = torch.load(ckpt / "extra_state.pt", weights_only=False)
            load_extra_training_state(acc.unwrap_model(wrapped), extra)
        rng_file = ckpt / f"rng_state_{acc.process_index}.pt"
        if not rng_file.exists():
            acc.print(f"warning: {rng_file.name} missing (another number of processes?); using process 0's")
            rng_file = ckpt / "rng_state_0.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
        state.last_checkpoint = str(ckpt)
        state.num_processes = acc.num_processes
        return state

    def _save_final(self, run_dir: Path, unwrapped: nn.Module, state: TrainerState) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            adapter_dir = run_dir / "adapter"
            tmp = run_dir / ".tmp-adapter"
            shutil.rmtree(tmp, ignore_errors=True)
            if hasattr(unwrapped, "save_pretrained"):
                unwrapped.save_pretrained(str(tmp))
            else:  # a plain module (tests): its trainable state
                from safetensors.torch import save_file

                tmp.mkdir(parents=True)
                save_file(adapter_state_dict(unwrapped), str(tmp / MODEL_STATE_FILE))
            if hasattr(unwrapped, "routing_stats"):
                _write_json(tmp / "routing_stats_train.json", unwrapped.routing_stats())
            _replace_dir(tmp, adapter_dir)
            _write_json(run_dir / FINAL_STATE_FILE, dataclasses.asdict(state))
        acc.wait_for_everyone()


# ------------------------------------------------------------------------------------------- logging


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` (always) and TensorBoard (when asked), main process only.
    On resume, records after the resumed step (from the interrupted run) are dropped first."""

    def __init__(self, run_dir: Path, report_to: Sequence[str], enabled: bool, truncate_after: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if truncate_after and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif self.path.exists() and not truncate_after:
            self.path.unlink()
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or len(record) <= 1:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = int(record.get("step", 0))
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _progress_bar(total: int, initial: int, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=disable)


def _postfix(loss: float, aux: dict[str, float], tokens_per_s: float) -> dict[str, str]:
    post = {"loss": f"{loss:.4f}"}
    post.update({k: f"{v:.3g}" for k, v in aux.items()})
    post["tok/s"] = f"{tokens_per_s:.0f}"
    return post


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    if hasattr(model, "trainable_parameters"):
        return list(model.trainable_parameters())
    return [p for p in model.parameters() if p.requires_grad]


def _sharded(acc: Any) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
