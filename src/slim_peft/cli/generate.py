"""``slim-peft generate``: the base model (with an adapter) continues a prompt, in its chat template."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from slim_peft.adapters import AdapterModel
from slim_peft.errors import CLIError
from slim_peft.experiments.setup import load_base, pad_id
from slim_peft.tasks import encode_text


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
        cfg_path = Path(args.adapter) / "adapter_config.json"
        if not cfg_path.is_file():
            raise CLIError(f"{args.adapter} holds no adapter_config.json: not an adapter directory")
        if model_name is None:
            model_name = json.loads(cfg_path.read_text()).get("base_model_name_or_path") or "smollm2-135m"
    model_name = model_name or "smollm2-135m"
    base, tokenizer = load_base(model_name)
    model = base
    if args.adapter:
        model = AdapterModel.from_pretrained(base, args.adapter)
    model.eval()
    text = args.prompt
    if getattr(tokenizer, "chat_template", None) and not args.no_chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    ids = torch.tensor([encode_text(tokenizer, text)])
    torch.manual_seed(args.seed)
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "pad_token_id": pad_id(tokenizer)}
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0
