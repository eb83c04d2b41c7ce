"""The saved adapter layout (PEFT's): file names, key prefix, the base-model fingerprint an adapter must match,
and reading a saved config back (ours, or a stock PEFT LoRA/DoRA one)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from slim_peft.errors import AdapterError

from .config import AdapterConfig
from .registry import config_from_dict

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size")


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What an adapter must match in its base model: architecture and shapes (and the name, for messages)."""
    cfg = model.config
    fp = {k: getattr(cfg, k, None) for k in FINGERPRINT_KEYS}
    fp["name_or_path"] = getattr(cfg, "name_or_path", None)
    return fp


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], AdapterConfig]:
    """(the raw adapter_config.json, our config from it) of an adapter directory; a clear error otherwise."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} holds no {CONFIG_NAME}: not an adapter directory")
    raw = json.loads(path.read_text())
    return raw, config_from_saved(raw, path)


def config_from_saved(raw: dict[str, Any], path: Path) -> AdapterConfig:
    if "slim_peft" in raw:
        return config_from_dict(raw["slim_peft"]["config"])
    if raw.get("peft_type") == "LORA":  # a stock PEFT adapter
        d = {"method": "dora" if raw.get("use_dora") else "lora", "r": raw["r"],
             "lora_alpha": raw["lora_alpha"], "lora_dropout": raw.get("lora_dropout", 0.0),
             "target_modules": raw["target_modules"],
             "base_model_name_or_path": raw.get("base_model_name_or_path")}
        return config_from_dict(d)
    raise AdapterError(f"{path}: peft_type {raw.get('peft_type')!r} is not an adapter this library can load")


def check_base_model(base_model: nn.Module, saved: dict[str, Any] | None, source: Path) -> None:
    """Raise AdapterError naming each field where `base_model` differs from the adapter's base."""
    if not saved:
        return
    current = base_fingerprint(base_model)
    diffs = [f"{k}: adapter {saved.get(k)!r} vs model {current.get(k)!r}" for k in FINGERPRINT_KEYS
             if saved.get(k) is not None and saved.get(k) != current.get(k)]
    if diffs:
        raise AdapterError(f"the adapter in {source} was trained on another base model "
                           f"({saved.get('name_or_path')!r}): " + "; ".join(diffs))
