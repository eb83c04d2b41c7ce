"""`load_dataset`: instruction, chat or text rows from any supported source, as training sequences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .chat import build_row_examples
from .encode import TokenizedExample
from .sources import SourcedRow, parse_sources, read_sources


def load_dataset(spec: str | Sequence[Any], tokenizer: Any | None = None, *, max_seq_length: int = 2048,
                 data_format: str | None = None, split: str = "train", subset: str | None = None, seed: int = 0
                 ) -> list[SourcedRow] | tuple[list[TokenizedExample], dict[str, int]]:
    """The rows of `spec` (files, save_to_disk directories, embedded names or Hub ids, `*W` weights; see
    `sources.parse_sources`), parsed and validated. With a `tokenizer`: their training sequences (assistant
    turns supervised, through the chat template) and the counts per source plus "truncated"."""
    rows = read_sources(parse_sources(spec, split=split, subset=subset, data_format=data_format), seed=seed)
    if tokenizer is None:
        return rows
    return build_row_examples(tokenizer, rows, max_seq_length=max_seq_length)
