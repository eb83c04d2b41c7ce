"""Batched greedy generation with the KV cache (transformers' generate), cut at a stop string."""

from __future__ import annotations

import re
from typing import Any

import torch

from slim_peft.tasks import encode_text, pad_token_id

from .scorer import _model_device


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    stop: str | None = "\n",
    *,
    eos_token_ids: list[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Continuations of the rendered ``prompts`` (left-padded batches sorted by length, the KV cache), cut at
    ``stop`` and ended by ``eos_token_ids`` (default the model's generation config). Greedy unless
    ``do_sample``: nucleus sampling from a generator seeded with ``seed`` before the first batch (the caller's
    RNG state is left as it was; a sample depends on the batch size)."""
    encoded = [encode_text(tokenizer, p) for p in prompts]
    pad_id = pad_token_id(tokenizer)
    device = _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out = [""] * len(prompts)
    kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if stop:
        kwargs.update(stop_strings=[stop], tokenizer=tokenizer)
    if eos_token_ids:
        kwargs["eos_token_id"] = eos_token_ids
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=do_sample), torch.inference_mode():
        if do_sample:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for r, i in enumerate(idx):
                text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
                out[i] = text.split(stop)[0] if stop else text.strip()
    return out


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The answer in a generated line: its last number (lm-eval's "flexible-extract"), else the stripped
    text. ``" 5 + 91 = 96"`` -> ``"96"``."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()




def generate_text(model: Any, tokenizer: Any, prompt: str, *, chat: bool = True, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 0.95, seed: int = 0) -> str:
    """One continuation of `prompt` (in the tokenizer's chat template unless `chat` is False): greedy at
    temperature 0, else nucleus sampling seeded by `seed`."""
    text = prompt
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    ids = torch.tensor([encode_text(tokenizer, text)], device=_model_device(model))
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id(tokenizer)}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
