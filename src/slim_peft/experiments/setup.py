"""The steps every job starts with: resolve task names (registering task files), load the base model, add
the adapter, with one-line errors that name the problem."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slim_peft.adapters import get_adapter_model
from slim_peft.assets import load_base_model
from slim_peft.errors import CLIError
from slim_peft.tasks import get_task, register_jsonl_task


def register_tasks(names: Sequence[str]) -> list[str]:
    """Task names, registering JSONL files (a missing, empty or malformed file is a clear error)."""
    out = []
    for name in names:
        if name.endswith(".jsonl") or os.sep in name:
            out.append(register_jsonl_task(name).name)
        else:
            get_task(name)  # unknown name: KeyError listing the known ones
            out.append(name)
    return out


def attach_adapter(base: Any, cfg: Any, model_name: str) -> Any:
    try:
        return get_adapter_model(base, cfg)
    except (ValueError, KeyError) as e:
        raise CLIError(f"cannot add a {cfg.method} adapter to {model_name}: {e.args[0] if e.args else e}") from None


def load_base(name: str) -> tuple[Any, Any]:
    if name != "smollm2-135m" and not Path(name).expanduser().exists() and name.count("/") != 1:
        raise CLIError(f"model {name!r} is neither the embedded 'smollm2-135m', a local directory nor a "
                       f"Hugging Face id (owner/name)")
    try:
        return load_base_model(name)
    except OSError as e:
        raise CLIError(f"cannot load model {name!r}: {e}") from None



