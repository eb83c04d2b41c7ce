"""Generative evaluation of held-out instruction or chat rows: each row's last assistant turn is the reference,
everything before it the prompt (in the chat template, the assistant turn opened). The model answers to the end
of its turn (greedy, or sampled with a seed; batched, left-padded, the KV cache), and each answer is scored
with `answers.ANSWER_METRICS` (exact, normalised, contains, token F1, ROUGE-L); ``token_loss`` is the mean
negative log-likelihood per token of the reference (+ end of turn) given the prompt, computed by teacher
forcing. Every metric is a mean over rows with lm-eval's stderr, in the same `TaskResult` as the other
protocols (``protocol="freeform"``; ``outcomes`` are the primary metric's per-row values, for paired deltas).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from slim_peft.adapters import selected_logits
from slim_peft.data import Collator, SourcedRow, encode_example, end_of_turn_text
from slim_peft.errors import DataError
from slim_peft.tasks import pad_token_id

from .answers import ANSWER_METRICS
from .generation import generate_greedy, stop_token_ids
from .metrics import _summary, ids_digest
from .results import EvalResult, TaskResult

FREEFORM_METRICS = (*ANSWER_METRICS, "token_loss")


def prompt_and_reference(tokenizer: Any, row: SourcedRow) -> tuple[str, str]:
    """The rendered prompt (every message before the last assistant turn, generation prompt on) and the
    reference answer (the last assistant turn's text)."""
    messages = list(row.row.messages)
    if not messages:
        raise DataError(f"{row.where}: a held-out row must be a conversation or an instruction with an answer; "
                        f"plain text rows have no answer to generate")
    prompt = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages[:-1]],
                                           tokenize=False, add_generation_prompt=True)
    return prompt, messages[-1].content


def reference_token_loss(model: Any, tokenizer: Any, prompts: Sequence[str], references: Sequence[str], *,
                         batch_size: int = 8, max_seq_length: int = 2048) -> list[float]:
    """Per row, the mean NLL of the reference's tokens (+ end of turn) after its prompt."""
    end = end_of_turn_text(tokenizer)
    examples = [encode_example(tokenizer, p, r, max_seq_length=max_seq_length, end_text=end)[0]
                for p, r in zip(prompts, references, strict=True)]
    collate = Collator(pad_token_id(tokenizer))
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size])
            labels = batch["labels"]
            targets = labels[:, 1:]
            need = torch.zeros_like(labels, dtype=torch.bool)
            need[:, :-1] = targets != -100
            logits = selected_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                     need.to(device))
            nll = torch.nn.functional.cross_entropy(logits.float(), targets[targets != -100].to(device),
                                                    reduction="none").cpu()
            counts = (targets != -100).sum(1).tolist()
            at = 0
            for c in counts:
                out.append(float(nll[at:at + c].mean()))
                at += c
    return out


def evaluate_rows(model: Any, tokenizer: Any, rows: Sequence[SourcedRow], *, name: str = "held_out",
                  primary: str = "rouge_l", max_new_tokens: int = 64, batch_size: int = 16, do_sample: bool = False,
                  temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, split: dict[str, Any] | None = None,
                  log_samples: bool = False, model_name: str | None = None, progress: bool = False) -> EvalResult:
    """Generate an answer for every held-out row and score it (module docstring); one `TaskResult` `name`."""
    if primary not in FREEFORM_METRICS:
        raise DataError(f"primary metric {primary!r} is not one of {FREEFORM_METRICS}")
    if not rows:
        raise DataError("no held-out rows to evaluate")
    t0, c0 = time.perf_counter(), time.process_time()
    pairs = [prompt_and_reference(tokenizer, r) for r in rows]
    prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        eos = stop_token_ids(tokenizer)
        answers = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                  stop=None, eos_token_ids=eos or None, do_sample=do_sample,
                                  temperature=temperature, top_p=top_p, seed=seed)
        values: dict[str, list[float]] = {m: [fn(a, r) for a, r in zip(answers, refs, strict=True)]
                                          for m, fn in ANSWER_METRICS.items()}
        values["token_loss"] = reference_token_loss(model, tokenizer, prompts, refs, batch_size=max(1, batch_size // 2))
    finally:
        model.train(was_training)
    metrics = _summary(values)
    protocol = "freeform" + ("-sampled" if do_sample else "")
    run = EvalResult(model=model_name, adapter=None, protocol=protocol, split="held-out", limit=len(rows),
                     seed=seed, batch_size=batch_size, versions={})
    samples = [{"where": r.where, "reference": ref, "generated": a} for r, ref, a in zip(rows, refs, answers,
                                                                                          strict=True)]
    run.tasks[name] = TaskResult(
        task=name, protocol=protocol, metric=primary, score=metrics[primary], stderr=metrics[f"{primary}_stderr"],
        metrics=metrics, n=len(rows), split=split or {"name": "held-out"}, seed=seed, model=model_name,
        adapter=None, chance=0.0, role="downstream", sample_type=1, seconds=round(time.perf_counter() - t0, 3),
        cpu_seconds=round(time.process_time() - c0, 2), outcomes=values[primary],
        ids_digest=ids_digest([r.raw_json for r in rows]), samples=samples if log_samples else None)
    run.seconds = run.tasks[name].seconds
    if progress:
        print(f"{name}: {primary} {metrics[primary]:.4f} (n={len(rows)}, {run.seconds:.1f} s)", file=sys.stderr)
    return run
