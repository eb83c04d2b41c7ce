"""Evaluation: lm-eval-compatible log-likelihood scoring, letter scoring, generation, forgetting report.

Protocols
- ``loglik``: lm-evaluation-harness 0.4.x multiple choice. Each (context, continuation) pair is tokenised
  as lm-eval does (trailing whitespace of the context moved to the continuation; context + continuation
  encoded whole and split after the context's own token count); acc = argmax of the summed log-probs,
  acc_norm = argmax of the sums divided by the choice's length in characters; stderr as lm-eval's
  ``mean_stderr``: sqrt(p (1 - p) / (n - 1)).
- ``letter``: the question with lettered options in the model's chat template (what training uses); the
  prediction is the option letter whose first token has the highest next-token logit after the prompt.
- ``generate``: greedy decoding, cut at the first newline; ``exact_match`` compares the line's last number
  (lm-eval's "flexible-extract") with the answer, ``exact_match_strict`` the whole stripped line (tasks with
  ``supports_generation``: basic_arithmetic).

Speed: all sequences of one question are packed into one row as a token tree (shared prefixes, e.g. the
question, computed once; each token attends to its ancestors only, positions = depth), rows are sorted by
length, and the LM head runs only at the positions whose next token is scored.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slim_peft.tasks import (
    Example,
    Task,
    chat_prompt,
    encode_prompt_target,
    encode_text,
    get_task,
    letter_prompt,
    letters,
    register_jsonl_task,
)

PROTOCOLS = ("loglik", "letter", "generate")


# ============================================================================ tokenisation (lm-eval's rules)
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


# ============================================================================ model access
def _adapter_model_class() -> type | None:
    try:
        from slim_peft.model import AdapterModel
    except ImportError:  # the model code is optional for evaluating plain transformers models
        return None
    return AdapterModel


def _selected_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None,
    positions: torch.Tensor,
) -> torch.Tensor:
    """fp32 LM-head logits at the True entries of ``positions`` ([B, S]) in row-major order.

    Accepts an :class:`~slim_peft.model.AdapterModel`, a PEFT model or a plain transformers causal LM; the
    attention mask may be 2D (padding) or a custom 4D additive mask.
    """
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    adapter_cls = _adapter_model_class()
    if adapter_cls is not None and isinstance(model, adapter_cls):
        return model(
            input_ids=input_ids, attention_mask=attention_mask, logits_mask=positions, **kwargs
        ).logits
    decoder = model.get_decoder()
    hidden = decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
    ).last_hidden_state
    return model.get_output_embeddings()(hidden[positions]).float()


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
    logits = _selected_logits(
        model, ids.to(device), mask.to(device), position_ids, torch.from_numpy(need).to(device)
    )
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


# ============================================================================ metrics
def mean_stderr(values: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample std / sqrt(n), i.e. sqrt(p(1-p)/(n-1)) for 0/1 values."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, as lm-eval)."""
    return int(np.argmax(np.asarray(values, dtype=np.float64)))


def _summary(values: dict[str, list[float]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, vals in values.items():
        out[name] = sum(vals) / len(vals) if vals else None
        out[f"{name}_stderr"] = mean_stderr(vals)
    return out


# ============================================================================ protocols
def _run_loglik(
    model: Any, tokenizer: Any, task: Task, examples: list[Example], batch_size: int, pack: bool
) -> tuple[dict[str, list[float]], list[dict]]:
    requests = [task.lm_eval_request(ex) for ex in examples]
    groups = [
        [encode_pair(tokenizer, c, x) for c, x in zip(r.contexts, r.continuations, strict=True)]
        for r in requests
    ]
    lls = score_requests(model, groups, batch_size=batch_size, pack=pack)
    metrics: dict[str, list[float]] = {"acc": []}
    if task.has_acc_norm:
        metrics["acc_norm"] = []
    samples = []
    for ex, req, ll in zip(examples, requests, lls, strict=True):
        pred = _argmax(ll)
        lengths = [float(len(c)) for c in req.choice_texts]
        pred_norm = _argmax([v / n for v, n in zip(ll, lengths, strict=True)])
        metrics["acc"].append(float(pred == req.gold))
        if task.has_acc_norm:
            metrics["acc_norm"].append(float(pred_norm == req.gold))
        samples.append({"id": ex.id, "gold": req.gold, "pred": pred, "pred_norm": pred_norm, "loglik": ll})
    return metrics, samples


def letter_requests(tokenizer: Any, ex: Example) -> list[tuple[list[int], list[int]]]:
    """Per option letter: (prompt ids, [first token of the letter as tokenised after the prompt])."""
    prompt = chat_prompt(tokenizer, letter_prompt(ex))
    out = []
    for letter in letters(ex):
        prompt_ids, target_ids = encode_prompt_target(tokenizer, prompt, letter)
        out.append((prompt_ids, target_ids[:1]))
    return out


def _run_letter(
    model: Any, tokenizer: Any, task: Task, examples: list[Example], batch_size: int, pack: bool
) -> tuple[dict[str, list[float]], list[dict]]:
    groups = [letter_requests(tokenizer, ex) for ex in examples]
    lls = score_requests(model, groups, batch_size=batch_size, pack=pack)
    acc, samples = [], []
    for ex, ll in zip(examples, lls, strict=True):
        pred = _argmax(ll)
        acc.append(float(pred == ex.label))
        samples.append({"id": ex.id, "gold": ex.label, "pred": pred, "logprob": ll})
    return {"acc": acc}, samples


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 16,
    batch_size: int = 16,
    stop: str = "\n",
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches sorted by length), cut at ``stop``."""
    encoded = [encode_text(tokenizer, p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out = [""] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]) :] = 1
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                stop_strings=[stop],
                tokenizer=tokenizer,
            )
            for r, i in enumerate(idx):
                text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
                out[i] = text.split(stop)[0]
    return out


def _run_generate(
    model: Any, tokenizer: Any, task: Task, examples: list[Example], batch_size: int, pack: bool
) -> tuple[dict[str, list[float]], list[dict]]:
    if not task.supports_generation:
        raise ValueError(
            f"task {task.name!r} has no generation form; protocol 'generate' supports "
            f"tasks with supports_generation (basic_arithmetic)"
        )
    prompts = [task.lm_eval_request(ex).contexts[0] for ex in examples]
    texts = generate_greedy(model, tokenizer, prompts, batch_size=batch_size)
    em, strict, samples = [], [], []
    for ex, text in zip(examples, texts, strict=True):
        answer = extract_answer(text)
        em.append(float(answer == ex.answer.strip()))
        strict.append(float(text.strip() == ex.answer.strip()))
        samples.append({"id": ex.id, "gold": ex.answer, "generated": text, "extracted": answer})
    return {"exact_match": em, "exact_match_strict": strict}, samples


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(text: str) -> str:
    """The answer in a generated line: its last number (lm-eval's "flexible-extract"), else the stripped
    text. ``" 5 + 91 = 96"`` -> ``"96"``."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


_RUNNERS = {"loglik": _run_loglik, "letter": _run_letter, "generate": _run_generate}


# ============================================================================ public API
def _model_name(model: Any) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "name_or_path", None) or getattr(model, "name_or_path", None) or type(model).__name__


def _adapter_name(model: Any) -> str | None:
    adapter_cls = _adapter_model_class()
    if adapter_cls is not None and isinstance(model, adapter_cls):
        return f"<in memory: {model.adapter_config.method}>"
    if hasattr(model, "peft_config"):
        return "<in memory: peft>"
    return None


def _resolve_task(name: str) -> Task:
    if name.endswith(".jsonl"):
        return register_jsonl_task(name)
    return get_task(name)


def _primary_metric(task: Task, protocol: str) -> str:
    if protocol == "generate":
        return "exact_match"
    return task.primary_metric if protocol == "loglik" else "acc"


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | str,
    protocol: str = "loglik",
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    test_fraction: float | None = None,
    pack: bool = True,
    log_samples: bool = False,
    model_name: str | None = None,
    adapter: str | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate ``model`` on registered tasks (names, or paths of JSONL task files).

    Returns a JSON-able dict: run metadata (model, adapter, protocol, split, limit, seed, versions) and, per
    task, its metrics with stderr, the primary ``metric`` and ``score``, ``n``, the split definition,
    chance level, role and seconds.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    resolved = [_resolve_task(n) for n in names if n]
    torch.manual_seed(seed)
    was_training = getattr(model, "training", False)
    model.eval()
    meta = {
        "model": model_name or _model_name(model),
        "adapter": adapter if adapter is not None else _adapter_name(model),
        "protocol": protocol,
        "split": split,
        "limit": limit,
        "seed": seed,
        "batch_size": batch_size,
        "versions": _versions(),
    }
    results: dict[str, Any] = {**meta, "tasks": {}}
    t_all = time.perf_counter()
    try:
        for task in resolved:
            t0 = time.perf_counter()
            examples = task.examples(split, limit, test_fraction=test_fraction)
            if not examples:
                raise ValueError(f"task {task.name!r} has no examples in split {split!r}")
            values, samples = _RUNNERS[protocol](model, tokenizer, task, examples, batch_size, pack)
            metrics = _summary(values)
            primary = _primary_metric(task, protocol)
            entry = {
                "task": task.name,
                "protocol": protocol,
                "metric": primary,
                "score": metrics[primary],
                "stderr": metrics[f"{primary}_stderr"],
                "metrics": metrics,
                "n": len(examples),
                "split": task.split_info(split, limit, test_fraction),
                "seed": seed,
                "model": meta["model"],
                "adapter": meta["adapter"],
                "chance": 0.0 if protocol == "generate" else task.chance,
                "role": task.role,
                "sample_type": task.sample_type,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            if log_samples:
                entry["samples"] = samples
            results["tasks"][task.name] = entry
            if progress:
                print(
                    f"{task.name}: {primary} {metrics[primary]:.4f} (n={len(examples)}, "
                    f"{entry['seconds']:.1f} s)",
                    file=sys.stderr,
                )
    finally:
        if was_training:
            model.train()
    results["seconds"] = round(time.perf_counter() - t_all, 3)
    return results


def _versions() -> dict[str, str]:
    import transformers

    from slim_peft import __version__

    return {"slim_peft": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def results_table(results: dict) -> str:
    """A Markdown table of one ``evaluate`` result."""
    lines = [
        "| task | metric | score | stderr | acc_norm | n | chance | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["tasks"].items():
        norm = r["metrics"].get("acc_norm")
        lines.append(
            f"| {name} | {r['metric']} | {_fmt(r['score'])} | {_fmt(r['stderr'])} | "
            f"{_fmt(norm) if norm is not None else '-'} | {r['n']} | {r['chance']:.3f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


# ============================================================================ forgetting report
def forgetting_report(base_results: dict, adapted_results: dict, tasks: Sequence[str] | None = None) -> dict:
    """Compare a base and an adapted model's ``evaluate`` results, task by task.

    ``general`` lists every general task (role "general") present in both: base and adapted score, delta,
    the stderr of each and of the delta, and retention (adapted / base); ``mean_retention`` averages it.
    ``downstream`` lists the downstream tasks the same way (what was learned). Results to compare must
    share protocol, split and n per task.
    """
    common = [t for t in base_results["tasks"] if t in adapted_results["tasks"]]
    if tasks is not None:
        missing = [t for t in tasks if t not in common]
        if missing:
            raise ValueError(f"tasks missing from one of the results: {', '.join(missing)}")
        common = list(tasks)
    general, downstream = [], []
    for name in common:
        b, a = base_results["tasks"][name], adapted_results["tasks"][name]
        for key in ("protocol", "metric", "n"):
            if b[key] != a[key]:
                raise ValueError(
                    f"{name}: base and adapted results differ in {key} ({b[key]} vs {a[key]}); "
                    f"compare like with like"
                )
        if (
            b["split"]["name"] != a["split"]["name"]
            or b["split"]["test_fraction"] != a["split"]["test_fraction"]
        ):
            raise ValueError(f"{name}: base and adapted results were computed on different splits")
        row = _report_row(name, b, a)
        (general if b.get("role", "general") == "general" else downstream).append(row)
    retentions = [r["retention"] for r in general if r["retention"] is not None]
    deltas = [r["delta"] for r in general]
    return {
        "base": {"model": base_results.get("model"), "adapter": base_results.get("adapter")},
        "adapted": {"model": adapted_results.get("model"), "adapter": adapted_results.get("adapter")},
        "protocol": base_results.get("protocol"),
        "split": base_results.get("split"),
        "general": general,
        "downstream": downstream,
        "mean_retention": sum(retentions) / len(retentions) if retentions else None,
        "mean_delta": sum(deltas) / len(deltas) if deltas else None,
        "mean_downstream_delta": (sum(r["delta"] for r in downstream) / len(downstream))
        if downstream
        else None,
    }


def _report_row(name: str, b: dict, a: dict) -> dict:
    bs, as_ = b["stderr"], a["stderr"]
    return {
        "task": name,
        "metric": b["metric"],
        "n": b["n"],
        "chance": b.get("chance"),
        "base": b["score"],
        "adapted": a["score"],
        "delta": a["score"] - b["score"],
        "base_stderr": bs,
        "adapted_stderr": as_,
        "delta_stderr": math.sqrt(bs**2 + as_**2) if bs is not None and as_ is not None else None,
        "retention": a["score"] / b["score"] if b["score"] else None,
    }


def forgetting_markdown(report: dict) -> str:
    """The forgetting report as Markdown."""
    head = "| task | metric | n | base | adapted | delta | stderr (delta) | retention |"
    sep = "|---|---|---|---|---|---|---|---|"

    def table(rows: list[dict]) -> list[str]:
        return [head, sep] + [
            f"| {r['task']} | {r['metric']} | {r['n']} | {_fmt(r['base'])} ± {_fmt(r['base_stderr'])} | "
            f"{_fmt(r['adapted'])} ± {_fmt(r['adapted_stderr'])} | {r['delta']:+.4f} | "
            f"{_fmt(r['delta_stderr'])} | "
            f"{_fmt(r['retention'], 3)} |"
            for r in rows
        ]

    lines = [
        "# Forgetting report",
        "",
        f"base: {report['base']['model']} (adapter: {report['base']['adapter']}); adapted: "
        f"{report['adapted']['model']} (adapter: {report['adapted']['adapter']}); "
        f"protocol {report['protocol']}, "
        f"split {report['split']}.",
        "",
        "## General tasks (what is kept)",
        "",
        *table(report["general"]),
        "",
        f"Mean retention (adapted / base): **{_fmt(report['mean_retention'], 3)}**; "
        f"mean delta {_fmt(report['mean_delta'])}.",
    ]
    if report["downstream"]:
        lines += [
            "",
            "## Downstream tasks (what is learned)",
            "",
            *table(report["downstream"]),
            "",
            f"Mean downstream delta: {_fmt(report['mean_downstream_delta'])}.",
        ]
    return "\n".join(lines) + "\n"


def plot_forgetting(report: dict, path: str | Path) -> Path:
    """Bar chart of base vs adapted score per task (error bars = stderr, ticks = chance); PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["general"] + report["downstream"]
    n = len(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * n + 2), 4.0))
    x = np.arange(n)
    w = 0.38
    ax.bar(
        x - w / 2,
        [r["base"] for r in rows],
        w,
        yerr=[r["base_stderr"] or 0 for r in rows],
        label="base",
        color="#8c9fb5",
        capsize=3,
    )
    ax.bar(
        x + w / 2,
        [r["adapted"] for r in rows],
        w,
        yerr=[r["adapted_stderr"] or 0 for r in rows],
        label="adapted",
        color="#d9822b",
        capsize=3,
    )
    for i, r in enumerate(rows):
        if r.get("chance") is not None:
            ax.hlines(r["chance"], i - 0.45, i + 0.45, colors="k", linestyles="dotted", linewidth=1)
    if report["downstream"] and report["general"]:
        ax.axvline(len(report["general"]) - 0.5, color="grey", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(
        [r["task"] + ("" if i < len(report["general"]) else "\n(downstream)") for i, r in enumerate(rows)],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    title = "base vs adapted (dotted: chance)"
    if report["mean_retention"] is not None:
        title += f"; mean retention of general tasks {report['mean_retention']:.3f}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_forgetting_report(report: dict, prefix: str | Path) -> dict[str, Path]:
    """Write ``<prefix>.md``, ``<prefix>.json`` and ``<prefix>.png``; returns the paths."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {
        "md": prefix.with_suffix(".md"),
        "json": prefix.with_suffix(".json"),
        "png": prefix.with_suffix(".png"),
    }
    paths["md"].write_text(forgetting_markdown(report))
    paths["json"].write_text(json.dumps(report, indent=2))
    plot_forgetting(report, paths["png"])
    return paths


# ============================================================================ command line
def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``slim-peft eval``."""
    parser.add_argument(
        "--tasks",
        required=True,
        help="comma-separated task names (e.g. arc_easy,piqa,mmlu) or paths of JSONL task files",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="loglik",
        help="loglik (lm-eval multiple choice), letter (option letter), generate (exact match)",
    )
    parser.add_argument(
        "--split",
        choices=("train", "test", "full"),
        default="test",
        help="hash-based train/test part, or the full file in file order (default: test)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="first N examples of the split in file order (per subject for mmlu), as lm-eval",
    )
    parser.add_argument("--test-fraction", type=float, default=None, help="override the task's test fraction")
    parser.add_argument(
        "--model", default=None, help="base model: 'smollm2-135m' (default), a local dir or HF id"
    )
    parser.add_argument("--adapter", default=None, help="adapter directory saved by slim-peft (or PEFT LoRA)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per forward pass (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--no-pack",
        action="store_true",
        help="one row per (context, choice) pair instead of one token tree per question",
    )
    parser.add_argument("--output", default=None, help="write the results JSON here")
    parser.add_argument(
        "--log-samples", action="store_true", help="include per-example predictions in the JSON"
    )
    parser.add_argument(
        "--forgetting-base",
        default=None,
        metavar="BASE_JSON",
        help="results JSON of the base model: also write a forgetting report (.md/.json/.png) "
        "next to --output",
    )


def _device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model_for_eval(
    model: str | None, adapter: str | None, dtype: str = "float32", device: str = "auto"
) -> tuple[Any, Any]:
    """(model, tokenizer): the base model (embedded by default) with an optional adapter loaded."""
    from slim_peft.assets import EMBEDDED_MODEL, load_base_model

    base, tokenizer = load_base_model(
        model or EMBEDDED_MODEL, dtype=getattr(torch, dtype), device=_device(device)
    )
    if adapter is None:
        return base, tokenizer
    try:
        from slim_peft import AdapterModel
    except ImportError as e:  # pragma: no cover - the model code ships with the package
        raise RuntimeError(f"--adapter needs slim_peft.AdapterModel, which failed to import: {e}") from e
    return AdapterModel.from_pretrained(base, adapter).to(_device(device)), tokenizer


def eval_command(args: argparse.Namespace) -> int:
    """``slim-peft eval``: evaluate, print a table, write the JSON (and a forgetting report)."""
    try:
        model, tokenizer = load_model_for_eval(args.model, args.adapter, args.dtype, args.device)
        results = evaluate(
            model,
            tokenizer,
            args.tasks,
            protocol=args.protocol,
            split=args.split,
            limit=args.limit,
            batch_size=args.batch_size,
            seed=args.seed,
            test_fraction=args.test_fraction,
            pack=not args.no_pack,
            log_samples=args.log_samples,
            adapter=args.adapter,
            progress=True,
        )
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"slim-peft eval: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(results_table(results))
    print(f"total {results['seconds']:.1f} s")
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    if args.forgetting_base:
        base = json.loads(Path(args.forgetting_base).read_text())
        prefix = Path(args.output).with_suffix("") if args.output else Path("forgetting")
        paths = write_forgetting_report(forgetting_report(base, results), f"{prefix}_forgetting")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m slim_peft.evaluate``), the same as ``slim-peft eval``."""
    parser = argparse.ArgumentParser(prog="slim-peft eval", description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    return eval_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
