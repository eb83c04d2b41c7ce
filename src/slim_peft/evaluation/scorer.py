"""The shared-prefix log-likelihood scorer: sums of log-probabilities of continuations given contexts, rows of
packed token trees sorted by length, the LM head only where a next token is scored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from slim_peft.adapters import selected_logits

from .tokenize import PackedGroup, _tree_mask, _truncate, pack_sequences


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def _max_length(model: Any) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _supports_custom_masks(model: Any) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return "flash" not in impl


# ============================================================================ the scorer
@dataclass
class _Row:
    """One row of a forward pass: the sequences of one or more questions merged into one token tree."""

    members: list[tuple[int, int, int]]  # (group, first sequence, number of sequences)
    tree: PackedGroup
    questions: int


def _plan_rows(sizes: list[int], capacity: int) -> list[list[int]]:
    """Groups per row: the largest remaining group, then the smallest ones while the row stays within
    ``capacity`` tokens (a group larger than ``capacity`` gets a row of its own)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    rows, lo, hi = [], 0, len(order) - 1
    while lo <= hi:
        row, used = [order[lo]], sizes[order[lo]]
        lo += 1
        while lo <= hi and used + sizes[order[hi]] <= capacity:
            row.append(order[hi])
            used += sizes[order[hi]]
            hi -= 1
        rows.append(row)
    return rows


def score_requests(
    model: Any,
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    batch_size: int = 16,
    pack: bool = True,
    row_tokens: int = 192,
) -> list[list[float]]:
    """Summed log-probs of each continuation given its context, for groups of token sequences.

    ``groups[q]`` holds the (context_ids, continuation_ids) pairs of one question; the result has the same
    shape. With ``pack``, several questions share a row of up to ``row_tokens`` tokens (a longer question
    gets a row of its own) as one token tree: common prefixes are computed once, and padding nearly
    vanishes. Without, one right-padded row per pair, as lm-eval. A forward pass holds at most
    ``batch_size`` questions (rows when not packing).
    """
    pack = pack and _supports_custom_masks(model)
    rows = _build_rows(groups, pack, row_tokens, _max_length(model))
    out: list[list[float]] = [[0.0] * len(seqs) for seqs in groups]
    device, dtype = _model_device(model), _model_dtype(model)
    with torch.inference_mode():
        for batch in _batches(rows, batch_size, batch_size * row_tokens if pack else None):
            sums = _score_batch(model, [r.tree for r in batch], pack, device, dtype)
            for row, row_sums in zip(batch, sums, strict=True):
                k = 0
                for q, first, n in row.members:
                    out[q][first : first + n] = row_sums[k : k + n]
                    k += n
    return out


def _build_rows(
    groups: Sequence[Sequence[tuple[list[int], list[int]]]], pack: bool, row_tokens: int, max_len: int
) -> list[_Row]:
    """The rows of all forward passes, longest first (see :func:`score_requests`)."""
    seqs_of = [[_truncate(list(c), list(x), max_len) for c, x in seqs] for seqs in groups]
    rows: list[_Row] = []
    if pack:
        sizes = [len(pack_sequences(seqs)) if seqs else 0 for seqs in seqs_of]
        for members in _plan_rows(sizes, row_tokens):
            flat = [seq for q in members for seq in seqs_of[q]]
            if flat:
                members_info = [(q, 0, len(seqs_of[q])) for q in members]
                rows.append(_Row(members_info, pack_sequences(flat), len(members)))
    else:
        rows = [
            _Row([(q, s, 1)], pack_sequences([seq]), 1)
            for q, seqs in enumerate(seqs_of)
            for s, seq in enumerate(seqs)
        ]
    rows.sort(key=lambda r: -len(r.tree))
    return rows


def packing_stats(
    groups: Sequence[Sequence[tuple[list[int], list[int]]]],
    batch_size: int = 16,
    pack: bool = True,
    row_tokens: int = 192,
    max_len: int = 2048,
) -> dict[str, int]:
    """The work :func:`score_requests` would do: input tokens, with padding, and LM-head positions."""
    rows = _build_rows(groups, pack, row_tokens, max_len)
    batches = _batches(rows, batch_size, batch_size * row_tokens if pack else None)
    padded = sum(max(len(r.tree) for r in b) * len(b) for b in batches)
    heads = sum(len({node for t in r.tree.targets for node, _ in t}) for r in rows)
    return {
        "rows": len(rows),
        "tokens": sum(len(r.tree) for r in rows),
        "padded_tokens": padded,
        "head_positions": heads,
    }


def _batches(rows: list[_Row], max_questions: int, max_tokens: int | None = None) -> list[list[_Row]]:
    """Consecutive rows (longest first), at most ``max_questions`` questions and ``max_tokens`` padded
    tokens per batch (at least one row)."""
    batches: list[list[_Row]] = []
    current: list[_Row] = []
    count = 0
    for row in rows:
        too_many = count + row.questions > max_questions
        too_long = (
            max_tokens is not None and (len(current) + 1) * len(current[0].tree) > max_tokens
            if current
            else False
        )
        if current and (too_many or too_long):
            batches.append(current)
            current, count = [], 0
        current.append(row)
        count += row.questions
    if current:
        batches.append(current)
    return batches


def _score_batch(
    model: Any, packed: list[PackedGroup], tree_mask: bool, device: torch.device, dtype: torch.dtype
) -> list[list[float]]:
    """One forward over padded rows; per row, the summed log-prob of each of its sequences."""
    size = max(len(g) for g in packed)
    n_rows = len(packed)
    ids = torch.zeros(n_rows, size, dtype=torch.long)
    pos = torch.zeros(n_rows, size, dtype=torch.long)
    need = np.zeros((n_rows, size), dtype=bool)
    for r, g in enumerate(packed):
        ids[r, : len(g)] = torch.tensor(g.tokens)
        pos[r, : len(g)] = torch.tensor(g.depth)
        for targets in g.targets:
            need[r, [node for node, _ in targets]] = True
    if tree_mask:
        allowed = torch.from_numpy(np.stack([_tree_mask(g, size) for g in packed]))[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        position_ids: torch.Tensor | None = pos.to(device)
    else:  # chains only: an ordinary right-padded batch
        mask = (torch.arange(size)[None, :] < torch.tensor([len(g) for g in packed])[:, None]).long()
        position_ids = None
    logits = selected_logits(model, ids.to(device), mask.to(device), torch.from_numpy(need).to(device), position_ids)
    return _sequence_sums(logits, packed, need)


def _sequence_sums(logits: torch.Tensor, packed: list[PackedGroup], need: np.ndarray) -> list[list[float]]:
    """Per row and sequence, the summed log-probs of the scored tokens from the selected logits."""
    index = np.full(need.shape, -1, dtype=np.int64)
    index[need] = np.arange(int(need.sum()))
    flat, toks, owner, counts = [], [], [], []
    n_seqs = 0
    for r, g in enumerate(packed):
        counts.append(len(g.targets))
        for targets in g.targets:
            for node, tok in targets:
                flat.append(int(index[r, node]))
                toks.append(tok)
                owner.append(n_seqs)
            n_seqs += 1
    flat_t = torch.tensor(flat, device=logits.device)
    toks_t = torch.tensor(toks, device=logits.device)
    lse = torch.logsumexp(logits, dim=-1)
    picked = (logits[flat_t, toks_t] - lse[flat_t]).double().cpu()
    sums = torch.zeros(n_seqs, dtype=torch.float64).index_add_(0, torch.tensor(owner), picked)
    out, start = [], 0
    for c in counts:
        out.append(sums[start : start + c].tolist())
        start += c
    return out
