"""A merged model directory: the base model with an adapter folded into its weights, in transformers' layout
(model.safetensors, config.json, generation_config.json, the tokenizer), which `AutoModelForCausalLM
.from_pretrained`, vLLM and llama.cpp's converter read.

Only methods whose update does not depend on the input merge: LoRA, DoRA (W' = m (W + s B A) / ||W + s B A||_c)
and I-LoRA (its `eval_with` learner, the slow one by default). A routed method (SLIM, MixLoRA, LoRAMoE, MoLA) is
refused with its reason before the base model is loaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from slim_peft.adapters import AdapterModel, get_method
from slim_peft.adapters.io import read_adapter_config
from slim_peft.assets import EMBEDDED_MODEL
from slim_peft.errors import AdapterError, OutputDirError
from slim_peft.experiments.setup import load_base

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def saved_adapter(adapter_dir: str | os.PathLike) -> tuple[str, str]:
    """(method, base model name) of a saved adapter directory; a clear error for anything else."""
    raw, cfg = read_adapter_config(adapter_dir)
    return cfg.method, raw.get("base_model_name_or_path") or EMBEDDED_MODEL


def merge_refusal(method: str) -> str | None:
    """Why `method` cannot be merged into the base weights (None: it can)."""
    reason = get_method(method).merge_refusal
    if reason is None:
        return None
    return (f"a {method} adapter cannot be merged into a plain model: {reason} Use it through slim-peft instead: "
            f"`slim-peft generate --adapter DIR`, `slim-peft lm-eval --adapter DIR --tasks ...` (lm-eval's tasks "
            f"with our backend), `slim-peft eval --adapter DIR`, or `AdapterModel.from_pretrained`.")


def export_merged(adapter_dir: str | os.PathLike, output: str | os.PathLike, model: str | None = None,
                  dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the merged model of `adapter_dir` (on its base, or on `model`) to `output`, in `dtype` ("bf16",
    "fp16", "fp32"; default: the base's). Written into a temporary directory and renamed into place; an
    existing non-empty `output` is refused unless `overwrite`."""
    method, base_name = saved_adapter(adapter_dir)
    reason = merge_refusal(method)
    if reason:
        raise AdapterError(reason)
    if dtype is not None and dtype not in DTYPES:
        raise AdapterError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputDirError(f"{out} exists and is not empty; choose another --output or pass --overwrite")
    base, tokenizer = load_base(model or base_name)
    merged = AdapterModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if dtype is not None:
        merged = merged.to(DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
