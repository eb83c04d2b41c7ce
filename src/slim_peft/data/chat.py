"""Conversations to training sequences through the model's chat template, with the loss on the assistant turns
only: every assistant turn of a multi-turn chat is supervised, its content and the template's end-of-turn
marker (what the model must learn to write, and to stop with); the system and user turns and the template's
role headers are not. Plain text rows are supervised on every token, plus eos.

Supervised spans are found in the rendered text: for assistant turn i, the chat template renders messages[:i]
with the generation prompt (everything up to where the answer starts) and messages[:i + 1] (the answer and its
end); the full conversation must extend both renderings (templates that rewrite earlier turns are refused). The
text is tokenised once, and a token is supervised when its first character lies in a span.

Too long: whole earliest user/assistant pairs (after the system message) are dropped while more than one turn
remains; a single turn still too long loses tokens from the left; `encode_row` reports whether it cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slim_peft.errors import DataError

from .encode import IGNORE_INDEX, TokenizedExample, end_of_turn_text
from .schemas import Message, Row
from .sources import SourcedRow


def _render(tokenizer: Any, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans of its assistant turns: content + end-of-turn)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template: conversations need one (use plain `text` rows, or a "
                        "model with a template)")
    full = _render(tokenizer, messages, False)
    end = end_of_turn_text(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[:i + 1], False)
        if not (full.startswith(before) and full.startswith(upto) and upto.startswith(before)):
            raise DataError("the chat template renders earlier turns differently once later ones follow; the "
                            "assistant turns cannot be located (use prompt/completion rows of one turn)")
        start = len(before)
        stop = upto.index(end, start) + len(end) if end in upto[start:] else len(upto)
        spans.append((start, stop))
    return full, spans


def encode_conversation(tokenizer: Any, messages: list[Message], *, max_seq_length: int, sample_type: int = 1
                        ) -> tuple[TokenizedExample, bool]:
    """Token ids and labels of a conversation (assistant turns supervised); whether it was truncated."""
    cut = False
    while True:
        text, spans = assistant_spans(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) <= max_seq_length or _turns(messages) <= 1:
            break
        messages = _drop_first_turn(messages)
        cut = True
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX for t, (s, _) in zip(ids, offsets, strict=True)]
    if len(ids) > max_seq_length:
        ids, labels, cut = ids[-max_seq_length:], labels[-max_seq_length:], True
    if all(t == IGNORE_INDEX for t in labels):
        raise DataError("no assistant token is left after truncation: raise max_seq_length")
    return TokenizedExample(tuple(ids), tuple(labels), sample_type), cut


def encode_text(tokenizer: Any, text: str, *, max_seq_length: int, sample_type: int = 1
                ) -> tuple[TokenizedExample, bool]:
    """Plain text + eos, every token supervised; long texts keep their first `max_seq_length` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    cut = len(ids) > max_seq_length
    ids = ids[:max_seq_length]
    return TokenizedExample(tuple(ids), tuple(ids), sample_type), cut


def encode_row(tokenizer: Any, row: Row, *, max_seq_length: int) -> tuple[TokenizedExample, bool]:
    """A parsed row (`schemas.parse_row`) as a training sequence; whether it was truncated."""
    sample_type = 1 if row.sample_type is None else row.sample_type
    if row.text is not None:
        return encode_text(tokenizer, row.text, max_seq_length=max_seq_length, sample_type=sample_type)
    return encode_conversation(tokenizer, list(row.messages), max_seq_length=max_seq_length, sample_type=sample_type)


def _turns(messages: list[Message]) -> int:
    return sum(1 for m in messages if m.role == "assistant")


def _drop_first_turn(messages: list[Message]) -> list[Message]:
    """Without the earliest user/assistant pair (the system message stays)."""
    head = messages[:1] if messages[0].role == "system" else []
    body = messages[len(head):]
    return head + body[2:]


def build_row_examples(tokenizer: Any, rows: Sequence[SourcedRow], *, max_seq_length: int
                       ) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Training sequences of parsed rows (`sources.read_sources`), and counts: rows per source and
    "truncated" (rows that lost turns or tokens to `max_seq_length`). A row that cannot be encoded is a
    `DataError` naming its file and line."""
    out: list[TokenizedExample] = []
    counts: dict[str, int] = {}
    truncated = 0
    for r in rows:
        try:
            ex, cut = encode_row(tokenizer, r.row, max_seq_length=max_seq_length)
        except DataError as e:
            raise DataError(f"{r.where}: {e}") from None
        out.append(ex)
        counts[r.source] = counts.get(r.source, 0) + 1
        truncated += int(cut)
    counts["truncated"] = truncated
    return out, counts
