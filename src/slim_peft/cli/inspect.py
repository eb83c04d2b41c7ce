"""``slim-peft inspect DIR``: an adapter's (or a run's) config, file sizes, tensor counts and routing statistics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from slim_peft.errors import CLIError
from slim_peft.reporting import identity_share_per_layer


def add_arguments(ins: argparse.ArgumentParser) -> None:
    ins.add_argument("dir", help="adapter directory or run directory")
    ins.add_argument("--json", action="store_true", help="print JSON")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def command(args: argparse.Namespace) -> int:
    """``slim-peft inspect DIR``: config, file sizes, parameter counts, routing statistics."""
    root = Path(args.dir)
    if not root.exists():
        raise CLIError(f"{root} does not exist")
    adapter = root if (root / "adapter_config.json").is_file() else root / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise CLIError(f"{root} is neither an adapter directory (adapter_config.json) nor a run directory "
                       f"with adapter/")
    raw = json.loads((adapter / "adapter_config.json").read_text())
    cfg = raw.get("slim_peft", {}).get("config", raw)
    info: dict[str, Any] = {"adapter_dir": str(adapter), "peft_type": raw.get("peft_type"),
                            "base_model": raw.get("base_model_name_or_path"), "config": cfg, "files": {}}
    for f in sorted(adapter.iterdir()):
        if f.is_file():
            info["files"][f.name] = f.stat().st_size
    weights = adapter / "adapter_model.safetensors"
    groups: dict[str, int] = {}
    total = 0
    if weights.is_file():
        with safe_open(str(weights), "pt") as fh:
            for key in fh.keys():
                n = 1
                for d in fh.get_slice(key).get_shape():
                    n *= d
                total += n
                kind = key.rsplit(".", 1)[0].rsplit(".", 1)[-1] if key.endswith(".weight") else key.rsplit(".", 1)[-1]
                groups[kind] = groups.get(kind, 0) + n
    info["tensor_elements"] = total
    info["tensor_elements_by_kind"] = groups
    routing = {}
    for candidate in sorted(adapter.glob("routing_stats*.json")) + [root / "results.json"]:
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            if candidate.name == "results.json":
                routing.update({f"{k} data (after training)": v for k, v in data.get("routing", {}).items()})
            else:
                routing[candidate.stem.replace("routing_stats_", "") + "ing data (during training)"] = data
    info["routing"] = {k: {"mean_identity_share": v.get("mean_identity_share"),
                           "identity_share_per_layer": identity_share_per_layer(v)} for k, v in routing.items()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"adapter: {adapter}")
    print(f"method: {cfg.get('method', raw.get('peft_type'))}   base model: {info['base_model']}")
    print("config:")
    for k, v in cfg.items():
        print(f"  {k}: {v}")
    print("files:")
    for name, size in info["files"].items():
        print(f"  {name}: {_human(size)}")
    print(f"adapter tensors: {total:,} elements " + "(" + ", ".join(f"{k} {v:,}" for k, v in groups.items()) + ")")
    if routing:
        print("routing (share of weight on identity experts):")
        for name, v in info["routing"].items():
            share = v["mean_identity_share"]
            print(f"  {name}: mean {share if share is None else f'{share:.3f}'}")
            items = [f"{layer:>3}: {s:.2f}" for layer, s in v["identity_share_per_layer"].items()]
            for i in range(0, len(items), 10):
                print("    layer " + "  ".join(items[i:i + 10]))
    else:
        print("routing: no statistics saved (methods without routers, or an adapter saved outside the trainer)")
    return 0
