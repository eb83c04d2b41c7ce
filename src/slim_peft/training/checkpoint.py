"""Checkpoints that continue a run exactly: atomic directories (written aside, renamed into place) holding
the adapter weights and buffers, optimizer and scheduler states, every process's RNG streams, the method's
own training state (I-LoRA's replay buffer), the data position and a fingerprint of the configuration.
Everything is safetensors or JSON except the optimizer and scheduler states, which are loaded with
``weights_only=True``; nothing is unpickled."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slim_peft.errors import OutputDirError, ResumeError

from .logging import write_json

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
FINAL_STATE_FILE = "final_state.json"
MODEL_STATE_FILE = "model_state.safetensors"
METHOD_TENSORS_FILE = "method_state.safetensors"
METHOD_META_FILE = "method_state.json"


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


def save_rng_state(path_stem: Path) -> None:
    """This process's RNG states as ``<stem>.safetensors`` (torch generators) + ``<stem>.json`` (python and
    numpy): nothing pickled, so resuming never unpickles a file."""
    state = get_rng_state()
    version, words, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    meta = {"python": [version, list(words), gauss],
            "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch": state["torch"]} | {f"cuda.{i}": t for i, t in enumerate(state.get("cuda", []))}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path_stem.with_suffix(".safetensors")))
    write_json(path_stem.with_suffix(".json"), meta)


def load_rng_state(path_stem: Path) -> None:
    """Inverse of :func:`save_rng_state`."""
    meta = json.loads(path_stem.with_suffix(".json").read_text())
    tensors = load_file(str(path_stem.with_suffix(".safetensors")))
    version, words, gauss = meta["python"]
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    state: dict[str, Any] = {"python": (version, tuple(words), gauss),
                             "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
                             "torch": tensors["torch"]}
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda:
        state["cuda"] = cuda
    set_rng_state(state)


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


def is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def replace_dir(src: Path, dst: Path) -> None:
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
    if resume or not is_nonempty_dir(out):
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
        replace_dir(staging, out)


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


def save_method_state(model: nn.Module, directory: Path) -> None:
    """The method's training state outside its weights (`AdapterModel.training_state`, e.g. I-LoRA's replay
    buffer) as ``method_state.safetensors`` + ``method_state.json``; nothing when it has none."""
    state = model.training_state() if hasattr(model, "training_state") else None
    if state is None:
        return
    tensors, meta = state
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / METHOD_TENSORS_FILE))
    write_json(directory / METHOD_META_FILE, meta)


def load_method_state(model: nn.Module, directory: Path) -> None:
    """Inverse of :func:`save_method_state`."""
    if (directory / METHOD_META_FILE).exists():
        meta = json.loads((directory / METHOD_META_FILE).read_text())
        model.load_training_state(load_file(str(directory / METHOD_TENSORS_FILE)), meta)


def save_checkpoint(acc: Any, run_dir: Path, state: TrainerState, wrapped: nn.Module, optimizer: Any,
                    scheduler: Any, save_total_limit: int | None) -> Path:
    """Write ``checkpoint-<step>`` into a temporary directory, then rename it into place (and drop the oldest
    beyond ``save_total_limit``)."""
    final = run_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    tmp = run_dir / f".tmp-{CHECKPOINT_PREFIX}{state.global_step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_rng_state(tmp / f"rng_state_{acc.process_index}")
    if is_sharded(acc):
        acc.save_state(str(tmp / "accelerate_state"))
    elif acc.is_main_process:
        save_file(adapter_state_dict(acc.unwrap_model(wrapped)), str(tmp / MODEL_STATE_FILE))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if acc.is_main_process:
        save_method_state(acc.unwrap_model(wrapped), tmp)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        state.last_checkpoint = str(final)
        write_json(tmp / STATE_FILE, dataclasses.asdict(state))  # written last: marks it complete
    acc.wait_for_everyone()
    if acc.is_main_process:
        replace_dir(tmp, final)
        if save_total_limit is not None:
            for old in list_checkpoints(run_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    state.last_checkpoint = str(final)
    return final


def load_checkpoint(acc: Any, ckpt: Path, fresh: TrainerState, wrapped: nn.Module, optimizer: Any,
                    scheduler: Any) -> TrainerState:
    """Restore a checkpoint written by :func:`save_checkpoint` into model, optimizer, scheduler and RNG
    streams; refuses one written by another configuration (naming each difference)."""
    if (ckpt / "rng_state_0.pt").exists() or (ckpt / "extra_state.pt").exists():
        raise ResumeError(f"checkpoint {ckpt} was written by slim-peft before 0.1.0's redesign (pickled RNG and "
                          f"method state, which are no longer unpickled); start a new --output_dir")
    saved = json.loads((ckpt / STATE_FILE).read_text())
    if saved.get("config_hash") != fresh.config_hash:
        diffs = diff_configs(saved.get("config", {}), fresh.config)
        raise ResumeError(f"checkpoint {ckpt} was written by another configuration; it cannot continue "
                          f"this run exactly:\n  " + "\n  ".join(diffs or ["(fingerprints differ)"])
                          + "\nUse the checkpoint's configuration, or start a new --output_dir.")
    if is_sharded(acc):
        acc.load_state(str(ckpt / "accelerate_state"))
    else:
        load_adapter_state_dict(acc.unwrap_model(wrapped), load_file(str(ckpt / MODEL_STATE_FILE)))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=acc.device, weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    load_method_state(acc.unwrap_model(wrapped), ckpt)
    rng_stem = ckpt / f"rng_state_{acc.process_index}"
    if not rng_stem.with_suffix(".json").exists():
        acc.print(f"warning: {rng_stem.name} missing (another number of processes?); using process 0's")
        rng_stem = ckpt / "rng_state_0"
    load_rng_state(rng_stem)
    state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
    state.last_checkpoint = str(ckpt)
    state.num_processes = acc.num_processes
    return state


def is_sharded(acc: Any) -> bool:
    """FSDP / DeepSpeed: checkpoints hold accelerate's sharded state instead of the adapter-only state."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
