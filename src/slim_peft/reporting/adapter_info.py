"""What a saved adapter (or a run directory) holds: config, file sizes, tensor counts by kind, and the routing
statistics saved beside it (`slim-peft inspect`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from slim_peft.adapters.io import CONFIG_NAME, WEIGHTS_NAME
from slim_peft.errors import AdapterError

from .run_report import identity_share_per_layer


def find_adapter_dir(root: Path) -> Path:
    """`root` itself when it holds adapter_config.json, else its `adapter/` (a run directory)."""
    if not root.exists():
        raise AdapterError(f"{root} does not exist")
    adapter = root if (root / CONFIG_NAME).is_file() else root / "adapter"
    if not (adapter / CONFIG_NAME).is_file():
        raise AdapterError(f"{root} is neither an adapter directory ({CONFIG_NAME}) nor a run directory "
                           f"with adapter/")
    return adapter


def tensor_elements(weights: Path) -> tuple[int, dict[str, int]]:
    """(total elements, elements per kind: lora_A, lora_B, router, centres, ...) of a safetensors file, read
    from its header only."""
    groups: dict[str, int] = {}
    total = 0
    if not weights.is_file():
        return 0, groups
    with safe_open(str(weights), "pt") as fh:
        for key in fh.keys():
            n = 1
            for d in fh.get_slice(key).get_shape():
                n *= d
            total += n
            kind = key.rsplit(".", 1)[0].rsplit(".", 1)[-1] if key.endswith(".weight") else key.rsplit(".", 1)[-1]
            groups[kind] = groups.get(kind, 0) + n
    return total, groups


def saved_routing(adapter: Path, root: Path) -> dict[str, dict[str, Any]]:
    """Routing statistics saved by the trainer (training data) and by `slim-peft run` (after training)."""
    routing: dict[str, Any] = {}
    for candidate in sorted(adapter.glob("routing_stats*.json")) + [root / "results.json"]:
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            if candidate.name == "results.json":
                routing.update({f"{k} data (after training)": v for k, v in data.get("routing", {}).items()})
            else:
                routing[candidate.stem.replace("routing_stats_", "") + "ing data (during training)"] = data
    return {k: {"mean_identity_share": v.get("mean_identity_share"),
                "identity_share_per_layer": identity_share_per_layer(v)} for k, v in routing.items()}


def adapter_info(root: str | Path) -> dict[str, Any]:
    """Everything `slim-peft inspect` shows about an adapter or run directory, JSON-able."""
    root = Path(root)
    adapter = find_adapter_dir(root)
    raw = json.loads((adapter / CONFIG_NAME).read_text())
    total, groups = tensor_elements(adapter / WEIGHTS_NAME)
    return {"adapter_dir": str(adapter), "peft_type": raw.get("peft_type"),
            "base_model": raw.get("base_model_name_or_path"), "config": raw.get("slim_peft", {}).get("config", raw),
            "files": {f.name: f.stat().st_size for f in sorted(adapter.iterdir()) if f.is_file()},
            "tensor_elements": total, "tensor_elements_by_kind": groups, "routing": saved_routing(adapter, root)}
