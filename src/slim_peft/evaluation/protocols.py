"""Evaluation: lm-eval-compatible log-likelihood scoring, letter scoring, generation, forgetting report.

Protocols
- ``loglik``: lm-evaluation-harness 0.4.x multiple choice. Each (context, continuation) pair is tokenised
  as lm-eval does (trailing whitespace of the context moved to the continuation; context + continuation
  encoded whole and split after the context's own token count); acc = argmax of the summed log-probs,
  acc_norm = argmax of the sums divided by the choice's length in characters; stderr as lm-eval's
  ``mean_stderr``: sqrt(p (1 - p) / (n - 1)).
- ``letter``: the question with lettered options in the model's chat template (what training uses); the
  prediction is the option letter whose first token has the highest next-token logit after the prompt.
- ``open``: the generative probe: the question asked in the chat template as an open question, without its
  options (a support passage, where the task has one, before it); the greedy answer (at most 32 tokens, to the
  end of the turn) is right when it states the correct option's text and no wrong option's
  (`answers.states_option`); ``f1`` is its token F1 against the correct option (tasks in `OPEN_TASKS`).
- ``generate``: greedy decoding, cut at the first newline; ``exact_match`` compares the line's last number
  (lm-eval's "flexible-extract") with the answer, ``exact_match_strict`` the whole stripped line (tasks with
  ``supports_generation``: basic_arithmetic).

Speed: all sequences of one question are packed into one row as a token tree (shared prefixes, e.g. the
question, computed once; each token attends to its ancestors only, positions = depth), rows are sorted by
length, and the LM head runs only at the positions whose next token is scored.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from slim_peft.adapters import AdapterModel
from slim_peft.errors import ConfigError
from slim_peft.tasks import (
    Example,
    Task,
    chat_prompt,
    encode_prompt_target,
    get_task,
    letter_prompt,
    letters,
    register_jsonl_task,
)

from .answers import states_option, token_f1
from .generation import extract_answer, generate_greedy
from .metrics import _argmax, _summary, ids_digest
from .results import EvalResult, TaskResult
from .scorer import score_requests
from .tokenize import encode_pair

PROTOCOLS = ("loglik", "letter", "generate", "open")
# multiple-choice tasks whose question makes sense without its options (a question with a short answer)
OPEN_TASKS = ("arc_easy", "arc_challenge", "sciq", "commonsense_qa", "openbookqa", "piqa")
OPEN_MAX_NEW_TOKENS = 32


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


def _run_generate(
    model: Any, tokenizer: Any, task: Task, examples: list[Example], batch_size: int, pack: bool
) -> tuple[dict[str, list[float]], list[dict]]:
    if not task.supports_generation:
        raise ConfigError(
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


def open_question(ex: Example) -> str:
    """The question without its options, after its passage when it has one."""
    return f"{ex.context.strip()}\n\n{ex.question.strip()}" if ex.context.strip() else ex.question.strip()


def _run_open(
    model: Any, tokenizer: Any, task: Task, examples: list[Example], batch_size: int, pack: bool
) -> tuple[dict[str, list[float]], list[dict]]:
    base = task.name.split(":")[0]
    if base not in OPEN_TASKS:
        raise ConfigError(f"task {task.name!r} has no open-question form; protocol 'open' supports "
                          f"{', '.join(OPEN_TASKS)}")
    prompts = [chat_prompt(tokenizer, open_question(ex)) for ex in examples]
    texts = generate_greedy(model, tokenizer, prompts, max_new_tokens=OPEN_MAX_NEW_TOKENS, batch_size=batch_size,
                            stop=None)
    acc, f1, samples = [], [], []
    for ex, text in zip(examples, texts, strict=True):
        acc.append(float(states_option(text, ex.choices, ex.label)))
        f1.append(token_f1(text, ex.answer))
        samples.append({"id": ex.id, "gold": ex.answer, "generated": text})
    return {"open_acc": acc, "f1": f1}, samples


_RUNNERS = {"loglik": _run_loglik, "letter": _run_letter, "generate": _run_generate, "open": _run_open}


# ============================================================================ public API
def _model_name(model: Any) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "name_or_path", None) or getattr(model, "name_or_path", None) or type(model).__name__


def _adapter_name(model: Any) -> str | None:
    if isinstance(model, AdapterModel):
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
    if protocol == "open":
        return "open_acc"
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
) -> EvalResult:
    """Evaluate ``model`` on registered tasks (names, or paths of JSONL task files).

    Returns an `EvalResult` (its `to_dict()` is the JSON): run metadata (model, adapter, protocol, split,
    limit, seed, versions) and, per task, a `TaskResult`: metrics with stderr, the primary ``metric`` and
    ``score``, ``n``, the split definition, chance level, role, seconds and per-question outcomes.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    resolved = [_resolve_task(n) for n in names if n]
    torch.manual_seed(seed)
    was_training = getattr(model, "training", False)
    model.eval()
    results = EvalResult(model=model_name or _model_name(model),
                         adapter=adapter if adapter is not None else _adapter_name(model), protocol=protocol,
                         split=split, limit=limit, seed=seed, batch_size=batch_size, versions=_versions())
    t_all = time.perf_counter()
    try:
        for task in resolved:
            entry = _evaluate_task(model, tokenizer, task, protocol, split, limit, batch_size, pack, test_fraction,
                                   results)
            if not log_samples:
                entry.samples = None
            results.tasks[task.name] = entry
            if progress:
                print(f"{task.name}: {entry.metric} {entry.score:.4f} (n={entry.n}, {entry.seconds:.1f} s)",
                      file=sys.stderr)
    finally:
        if was_training:
            model.train()
    results.seconds = round(time.perf_counter() - t_all, 3)
    return results


def _evaluate_task(model: Any, tokenizer: Any, task: Task, protocol: str, split: str, limit: int | None,
                   batch_size: int, pack: bool, test_fraction: float | None, run: EvalResult) -> TaskResult:
    """One task's result: metrics with stderr, primary score, per-question outcomes and samples."""
    t0, c0 = time.perf_counter(), time.process_time()
    examples = task.examples(split, limit, test_fraction=test_fraction)
    if not examples:
        raise ConfigError(f"task {task.name!r} has no examples in split {split!r}")
    values, samples = _RUNNERS[protocol](model, tokenizer, task, examples, batch_size, pack)
    metrics = _summary(values)
    primary = _primary_metric(task, protocol)
    return TaskResult(
        task=task.name, protocol=protocol, metric=primary, score=metrics[primary],
        stderr=metrics[f"{primary}_stderr"], metrics=metrics, n=len(examples),
        split=task.split_info(split, limit, test_fraction), seed=run.seed, model=run.model, adapter=run.adapter,
        chance=0.0 if protocol in ("generate", "open") else task.chance, role=task.role, sample_type=task.sample_type,
        seconds=round(time.perf_counter() - t0, 3), cpu_seconds=round(time.process_time() - c0, 2),
        outcomes=values[primary],
        ids_digest=ids_digest([ex.id for ex in examples]), samples=samples)


def _versions() -> dict[str, str]:
    import transformers

    from slim_peft import __version__

    return {"slim_peft": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
