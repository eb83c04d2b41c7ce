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

Precision: ``bf16=True`` is accelerate's bf16 autocast (on CUDA, and on CPUs with bf16 support; on a CPU without
AVX512-BF16 or AMX the bf16 matmuls are emulated, 17x slower than fp32 on an AVX2 machine,
benchmarks/results/train_step.md, and the trainer warns: `cpu_has_native_bf16`); a base loaded in bf16 or fp16
keeps its dtype while the adapters, routers and cluster statistics stay fp32 (PEFT's autocast_adapter_dtype
behaviour), and routing runs in fp32 with autocast off. ``gradient_checkpointing=True``
checkpoints every decoder layer (non-reentrant); the adapters' forward statistics skip the recompute and move
once per optimizer step (``AdapterModel.after_optimizer_step``), so gradients and cluster states equal those of
the plain forward (tests/test_training_scale.py).

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

FSDP version 2 wraps every decoder layer (``Qwen2DecoderLayer``, ``MistralDecoderLayer`` for those models) and
then the root. The adapter parameters are sharded with their layer; buffers (SLIM's clusters, I-LoRA's slow
learner) stay whole on every process and are kept identical by the all-reduced statistics; adapter losses that
read parameters are computed inside the layers' forward, where FSDP has them unsharded; the final adapter is
gathered whole on every process and written by the main one. accelerate does not run FSDP on a CPU-only
machine (its state falls back to one process or MULTI_CPU), so tests/test_training_fsdp.py checks this
wrapping with torch's ``fully_shard`` on 2 gloo processes against one process. Under FSDP/DeepSpeed,
intermediate checkpoints hold ``accelerator.save_state`` (sharded model and optimizer) instead of the
adapter-only state; that path and DeepSpeed are not exercised on the CPU-only machine the tests run on.

A checkpoint (``output_dir/checkpoint-<step>``, written into a temporary directory and renamed into place)
holds the trainable parameters and buffers (``model_state.safetensors``), the optimizer and scheduler
states, every process's RNG states (python, numpy, torch), training state outside the state dict (I-LoRA's
replay buffer, ``method_state.*``), the data position and a fingerprint of the
configuration; ``resume_from_checkpoint`` (a path or ``"latest"``) continues the run exactly and refuses a
checkpoint written by another configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slim_peft.data import Collator, PackingCollator, SeededBatchOrder, TokenizedExample, dataset_fingerprint, shard
from slim_peft.errors import ConfigError, DataError, NonFiniteLossError, TrainingError

from .args import TRAJECTORY_FIELDS, TrainingArguments
from .checkpoint import (
    FINAL_STATE_FILE,
    MODEL_STATE_FILE,
    TrainerState,
    adapter_state_dict,
    config_hash,
    is_nonempty_dir,
    load_checkpoint,
    preserved_rng,
    replace_dir,
    resolve_checkpoint,
    save_checkpoint,
    staged_output_dir,
)
from .logging import MetricsLogger, postfix, progress_bar, write_json


@dataclass
class TrainOutput:
    global_step: int
    final_loss: float
    run_dir: str
    adapter_dir: str
    metrics: dict[str, float]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (call before building the adapter so its initialisation is fixed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (AVX512-BF16 or AMX tiles), as oneDNN needs for bf16
    autocast to pay."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


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
        if args.packing and not getattr(model, "supports_packing", True):
            raise ConfigError(f"packing is not supported by {type(model).__name__} (its replay buffer keeps whole "
                              f"rows, which packing would mix); set packing: false")
        self.model = model
        self.args = args
        self.train_dataset = list(train_dataset)
        self.eval_dataset = list(eval_dataset) if eval_dataset else []
        self.eval_fn = eval_fn
        self.collator = PackingCollator(pad_token_id, args.max_seq_length) if args.packing else \
            Collator(pad_token_id)
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
        has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
        if self.args.bf16 and not has_accel and not cpu_has_native_bf16():
            warnings.warn("bf16=True on a CPU without AVX512-BF16 or AMX: its bf16 matmuls are emulated and run "
                          "much slower than fp32 (17x for one linear's forward and backward on an AVX2 machine); "
                          "train in fp32 here (drop --bf16) unless you need bf16's numbers", stacklevel=3)
        if AcceleratorState._shared_state:
            st = AcceleratorState()
            if st.distributed_type == "NO" and str(st.mixed_precision) != mixed:
                AcceleratorState._reset_state()  # one process, another precision: a fresh state is allowed
        method = getattr(self.model, "method", None)  # an AdapterModel's registry entry
        find_unused = bool(getattr(method, "sparse_routing", False))  # top-k: some experts get no gradient
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
            in_place = out_dir in self.checkpoint.resolve().parents or not is_nonempty_dir(out_dir)
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
                write_json(run_dir / "run_status.json", {"status": "failed", "error": str(e),
                                                           "step": self.state.global_step})
            raise
        if acc.is_main_process:
            write_json(run_dir / "run_status.json", {"status": "completed", "step": self.state.global_step})
        acc.wait_for_everyone()
        return out

    def _prepare(self, run_dir: Path, total_steps: int) -> tuple[nn.Module, nn.Module, Any, Any, TrainerState]:
        """Checkpointing, optimizer, scheduler, accelerate's wrapping, and the resumed (or fresh) state."""
        args, acc = self.args, self.accelerator
        fp_config = self.fingerprint_config()
        state = TrainerState(total_steps=total_steps, num_processes=acc.num_processes,
                             config_hash=config_hash(fp_config), config=fp_config)
        model = self.model
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        optimizer = build_optimizer(_trainable_parameters(model), args)
        scheduler = build_scheduler(optimizer, args, total_steps)
        wrapped, optimizer = acc.prepare(model, optimizer)
        if self.checkpoint is not None:
            state = load_checkpoint(acc, self.checkpoint, state, wrapped, optimizer, scheduler)
            acc.print(f"resumed from {self.checkpoint} at step {state.global_step}/{total_steps}")
        else:
            seed_everything(args.seed + acc.process_index)  # the data order does not depend on it; dropout does
        if acc.is_main_process:
            write_json(run_dir / "training_args.json", args.to_dict())
            write_json(run_dir / "run_config.json", fp_config)
        unwrapped = acc.unwrap_model(wrapped)
        if hasattr(unwrapped, "reset_routing_stats"):
            unwrapped.reset_routing_stats()
        return wrapped, unwrapped, optimizer, scheduler, state

    def _train(self, run_dir: Path) -> TrainOutput:
        args, acc = self.args, self.accelerator
        world = acc.num_processes
        order = SeededBatchOrder([len(ex) for ex in self.train_dataset],
                                 args.per_device_train_batch_size * world, args.seed, args.group_by_length)
        total_steps = self._total_steps(order)
        wrapped, unwrapped, optimizer, scheduler, state = self._prepare(run_dir, total_steps)
        self.state = state
        logger = MetricsLogger(run_dir, args.report_to, acc.is_main_process, truncate_after=state.global_step)
        bar = progress_bar(total_steps, state.global_step, disable=args.disable_tqdm or not acc.is_main_process)
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
                for k, v in {"loss": step_loss, "steps": 1, "tokens": tokens, "grad_norm": grad_norm,
                             **{f"aux/{k}": v for k, v in aux.items()}}.items():
                    window[k] += v
                if args.logging_steps and (state.global_step % args.logging_steps == 0
                                           or state.global_step == total_steps):
                    elapsed = time.perf_counter() - window_start
                    record = self._log_window(window, elapsed, scheduler, state)
                    logger.log(record)
                    self.last_log = record
                    window = defaultdict(float)
                    window_start = time.perf_counter()
                bar.set_postfix(postfix(step_loss, aux, step_tok_s), refresh=False)
                bar.update(1)
                if args.eval_steps and state.global_step % args.eval_steps == 0:
                    last_eval = self._evaluate(unwrapped, state.global_step)
                    logger.log(last_eval)
                if args.save_steps and state.global_step % args.save_steps == 0 and state.global_step < total_steps:
                    save_checkpoint(self.accelerator, run_dir, state, wrapped, optimizer, scheduler,
                                    args.save_total_limit)
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

    def _save_final(self, run_dir: Path, unwrapped: nn.Module, state: TrainerState) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        # every process gathers (FSDP-sharded adapters are collected whole), the main one writes
        gathered = unwrapped.adapter_state_dict() if hasattr(unwrapped, "save_pretrained") else None
        if hasattr(unwrapped, "card_sections"):
            unwrapped.card_sections["Training"] = self._training_card(state)
        if acc.is_main_process:
            adapter_dir = run_dir / "adapter"
            tmp = run_dir / ".tmp-adapter"
            shutil.rmtree(tmp, ignore_errors=True)
            if gathered is not None:
                unwrapped.save_pretrained(str(tmp), state_dict=gathered)
            else:  # a plain module (tests): its trainable state
                from safetensors.torch import save_file

                tmp.mkdir(parents=True)
                save_file(adapter_state_dict(unwrapped), str(tmp / MODEL_STATE_FILE))
            if hasattr(unwrapped, "routing_stats"):
                write_json(tmp / "routing_stats_train.json", unwrapped.routing_stats())
            replace_dir(tmp, adapter_dir)
            write_json(run_dir / FINAL_STATE_FILE, dataclasses.asdict(state))
        acc.wait_for_everyone()


    def _training_card(self, state: TrainerState) -> str:
        """The model card's training section: data, steps, batch and the trajectory's hyper-parameters."""
        args, acc = self.args, self.accelerator
        global_batch = args.per_device_train_batch_size * acc.num_processes * args.gradient_accumulation_steps
        rows = {"examples": len(self.train_dataset), "optimizer steps": state.global_step,
                "global batch": global_batch, "tokens seen": state.tokens_seen * acc.num_processes,
                "processes": acc.num_processes, "final loss": self.last_log.get("loss"),
                **{k: getattr(args, k) for k in TRAJECTORY_FIELDS},
                **{f"run: {k}": v for k, v in self.run_config.items()}}
        return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows.items()])


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint every decoder layer, non-reentrant (`AdapterModel.activation_checkpointing_enable`; a plain
    transformers model directly)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    if hasattr(model, "trainable_parameters"):
        return list(model.trainable_parameters())
    return [p for p in model.parameters() if p.requires_grad]


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
