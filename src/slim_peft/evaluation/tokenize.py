"""lm-evaluation-harness's tokenisation of (context, continuation) pairs, and the token trees that pack all
sequences of one question into one row (shared prefixes computed once; each token attends to its ancestors)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slim_peft.tasks import encode_text


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` exactly as lm-eval 0.4.13's HFLM builds a loglikelihood request."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_text(tokenizer, context + continuation)
    context_ids = encode_text(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


# ============================================================================ token-tree packing
@dataclass
class PackedGroup:
    """The sequences of one question as a token tree.

    ``tokens[i]`` has parent ``parents[i]`` (-1 at the root) and position ``depth[i]``; ``targets[s]`` lists,
    for sequence ``s``, the (node whose output predicts it, token) pairs that are scored.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    targets: list[list[tuple[int, int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def pack_sequences(seqs: Sequence[tuple[list[int], list[int]]], share: bool = True) -> PackedGroup:
    """Merge (context_ids, continuation_ids) sequences into a token tree (no sharing: a forest of chains).

    The last token of a sequence is only an input when another sequence continues it.
    """
    g = PackedGroup()
    children: dict[tuple[int, int, int], int] = {}
    for s, (ctx, cont) in enumerate(seqs):
        if not ctx or not cont:
            raise ValueError("every scored sequence needs a non-empty context and continuation")
        full = list(ctx) + list(cont)
        path = []
        node = -1
        for tok in full[:-1]:
            key = (0 if share else s, node, tok)
            idx = children.get(key)
            if idx is None:
                idx = len(g.tokens)
                children[key] = idx
                g.tokens.append(tok)
                g.parents.append(node)
                g.depth.append(len(path))
            path.append(idx)
            node = idx
        g.targets.append([(path[j - 1], full[j]) for j in range(len(ctx), len(full))])
    return g


def _truncate(ctx: list[int], cont: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Left-truncate like lm-eval: keep the last ``max_length + 1`` tokens of context + continuation."""
    if len(ctx) + len(cont) <= max_length + 1:
        return ctx, cont
    keep = max_length + 1 - len(cont)
    if keep < 1:
        raise ValueError(
            f"a continuation of {len(cont)} tokens does not fit the model's {max_length} positions"
        )
    return ctx[-keep:], cont


def _tree_mask(group: PackedGroup, size: int) -> np.ndarray:
    """[size, size] bool: node i may attend to node j iff j is i or an ancestor of i (padding: itself)."""
    allowed = np.zeros((size, size), dtype=bool)
    for i, p in enumerate(group.parents):
        if p >= 0:
            allowed[i] = allowed[p]
        allowed[i, i] = True
    for i in range(len(group), size):
        allowed[i, i] = True
    return allowed
