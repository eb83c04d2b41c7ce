"""``slim-peft merge --adapter DIR --output OUT``: the base model with the adapter folded in, as a transformers
model directory (LoRA, DoRA, I-LoRA; routed methods are refused with the reason)."""

from __future__ import annotations

import argparse

from slim_peft.integrations.merged import DTYPES, export_merged


def add_arguments(merge: argparse.ArgumentParser) -> None:
    merge.add_argument("--adapter", required=True, help="adapter directory")
    merge.add_argument("--output", required=True, help="the model directory to write (must not exist, or be empty)")
    merge.add_argument("--model", default=None, help="base model (default: the adapter's)")
    merge.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights' dtype (default: the base's)")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")


def command(args: argparse.Namespace) -> int:
    out = export_merged(args.adapter, args.output, model=args.model, dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0
