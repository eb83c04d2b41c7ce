"""Generation with the KV cache (transformers' generate), for every method of the registry.

- `generate_greedy`: batched, left-padded, sorted by length, cut at a stop string or ended by stop tokens.
- `generate_text`: one reply to a prompt or to a conversation, in the chat template, ended at the end of the
  assistant's turn (the stop rule, `stop_token_ids`), optionally streamed text piece by text piece.
- `ChatSession`: a conversation that keeps its turns (`slim-peft generate --chat`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TextStreamer

from slim_peft.data import end_of_turn_text
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




def stop_token_ids(tokenizer: Any) -> list[int]:
    """The tokens that end a reply: the eos token and the chat template's end-of-turn marker (e.g. ``<|im_end|>``,
    which the generation config of a base model often does not list)."""
    eot = tokenizer.convert_tokens_to_ids(end_of_turn_text(tokenizer))
    return sorted({t for t in (tokenizer.eos_token_id, eot) if isinstance(t, int) and t >= 0})


class CallbackStreamer(TextStreamer):
    """transformers' `TextStreamer` (whole words as they are decoded, the prompt skipped) handing each piece
    of text to `on_text` instead of printing it."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


def render_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool = True) -> str:
    """The text the model continues: `prompt` (a string, or a list of {"role", "content"} messages) in the
    tokenizer's chat template with the assistant's turn opened; a string as it is when `chat` is False or the
    tokenizer has no template."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError("a conversation needs a tokenizer with a chat template")
    return prompt


def generate_text(model: Any, tokenizer: Any, prompt: str | list[dict[str, str]], *, chat: bool = True,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 0.95, seed: int = 0,
                  on_text: Callable[[str], None] | None = None) -> str:
    """One reply to `prompt` (`render_prompt`), ended by `stop_token_ids` or `max_new_tokens`: greedy at
    temperature 0, else nucleus sampling seeded by `seed`. With `on_text`, the reply is also handed over piece
    by piece as it is decoded (the pieces joined and stripped are the returned text)."""
    text = render_prompt(tokenizer, prompt, chat)
    ids = torch.tensor([encode_text(tokenizer, text)], device=_model_device(model))
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id(tokenizer),
                              "eos_token_id": stop_token_ids(tokenizer) or None}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False)
    if on_text is not None:
        kwargs["streamer"] = CallbackStreamer(tokenizer, on_text)
    was_training = getattr(model, "training", False)
    model.eval()
    device = ids.device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=temperature > 0), \
                torch.inference_mode():
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@dataclass
class ChatSession:
    """A conversation with a model: each `send` renders every earlier turn in the chat template, generates the
    assistant's reply (`generate_text`) and keeps it, so the next turn sees the whole conversation."""

    model: Any
    tokenizer: Any
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0
    messages: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat mode needs a tokenizer with a chat template; this one has none "
                             "(use generate without --chat)")
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The assistant's reply to `text` after the conversation so far; both turns are kept. Sampling uses
        `seed` plus the turn number, so a conversation replays exactly."""
        messages = [*self.messages, {"role": "user", "content": text}]
        turn = sum(m["role"] == "user" for m in messages)
        reply = generate_text(self.model, self.tokenizer, messages, max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature, top_p=self.top_p, seed=self.seed + turn,
                              on_text=on_text)
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        return reply

    def reset(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.messages = [m for m in self.messages if m["role"] == "system"]
