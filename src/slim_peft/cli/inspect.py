"""``slim-peft inspect DIR``: an adapter's (or a run's) config, file sizes, tensor counts and routing statistics."""

from __future__ import annotations

import argparse
import json
from typing import Any

from slim_peft.reporting.adapter_info import adapter_info
from slim_peft.training.plan import human_bytes


def add_arguments(ins: argparse.ArgumentParser) -> None:
    ins.add_argument("dir", help="adapter directory or run directory")
    ins.add_argument("--json", action="store_true", help="print JSON")


def command(args: argparse.Namespace) -> int:
    """Print `adapter_info(DIR)` as text (or JSON)."""
    info = adapter_info(args.dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg: dict[str, Any] = info["config"]
    print(f"adapter: {info['adapter_dir']}")
    print(f"method: {cfg.get('method', info['peft_type'])}   base model: {info['base_model']}")
    print("config:")
    for k, v in cfg.items():
        print(f"  {k}: {v}")
    print("files:")
    for name, size in info["files"].items():
        print(f"  {name}: {human_bytes(size)}")
    groups = info["tensor_elements_by_kind"]
    print(f"adapter tensors: {info['tensor_elements']:,} elements ("
          + ", ".join(f"{k} {v:,}" for k, v in groups.items()) + ")")
    if not info["routing"]:
        print("routing: no statistics saved (methods without routers, or an adapter saved outside the trainer)")
        return 0
    print("routing (share of weight on identity experts):")
    for name, v in info["routing"].items():
        share = v["mean_identity_share"]
        print(f"  {name}: mean {share if share is None else f'{share:.3f}'}")
        items = [f"{layer:>3}: {s:.2f}" for layer, s in v["identity_share_per_layer"].items()]
        for i in range(0, len(items), 10):
            print("    layer " + "  ".join(items[i:i + 10]))
    return 0
