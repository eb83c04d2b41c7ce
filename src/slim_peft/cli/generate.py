"""``slim-peft generate``: the base model (with an adapter) continues a prompt, in its chat template."""

from __future__ import annotations

import argparse

from slim_peft.adapters import AdapterModel
from slim_peft.adapters.io import read_adapter_config
from slim_peft.assets import EMBEDDED_MODEL
from slim_peft.evaluation.generation import generate_text
from slim_peft.experiments.setup import load_base


def add_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt")
    gen.add_argument("--adapter", default=None, help="adapter directory (its base model is used by default)")
    gen.add_argument("--model", default=None, help="base model (default: the adapter's, else smollm2-135m)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")


def command(args: argparse.Namespace) -> int:
    """``slim-peft generate``: the base model (with an adapter) continues a prompt."""
    model_name = args.model
    if args.adapter:
        raw, _ = read_adapter_config(args.adapter)
        if model_name is None:
            model_name = raw.get("base_model_name_or_path") or EMBEDDED_MODEL
    base, tokenizer = load_base(model_name or EMBEDDED_MODEL)
    model = AdapterModel.from_pretrained(base, args.adapter) if args.adapter else base
    print(generate_text(model, tokenizer, args.prompt, chat=not args.no_chat_template,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed))
    return 0
