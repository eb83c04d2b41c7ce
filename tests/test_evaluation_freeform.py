"""Generative evaluation of held-out rows (evaluation/freeform.py) and the open-question probe (protocol "open")
on a tiny random Llama with the embedded tokenizer: the batched, left-padded, cached generation equals a plain
greedy loop row by row, every metric is the scorer applied to those answers, ``token_loss`` equals a plain
forward's NLL, sampling is reproducible by its seed; the probe asks without options and scores by
`states_option`; results relabel for a report with two protocols of one task."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import embedded_tokenizer, greedy, sharp_tiny_llama

import slim_peft.evaluation.protocols as protocols
from slim_peft.data import SourcedRow, encode_example, end_of_turn_text, parse_row
from slim_peft.errors import DataError
from slim_peft.evaluation import ANSWER_METRICS, evaluate, evaluate_rows, forgetting_report, states_option
from slim_peft.evaluation.freeform import prompt_and_reference
from slim_peft.reporting import learn_forget_table
from slim_peft.tasks import get_task


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    # an untied head, so the answers are not the prompt's last token repeated
    return sharp_tiny_llama(tokenizer, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)


RAW = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"prompt": "What is the capital of France? Answer in one word, please.", "completion": "Paris"},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "Say the word 'tree'."}, {"from": "gpt", "value": "tree"}]},
]


def rows() -> list[SourcedRow]:
    return [SourcedRow(parse_row(r, f"mem:{i + 1}"), f"mem:{i + 1}", "mem", json.dumps(r)) for i, r in enumerate(RAW)]


def plain_answer(model, tokenizer, prompt: str, n: int) -> str:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    new = greedy(model, ids, n)[0, ids.shape[1]:].tolist()
    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn_text(tokenizer))}
    cut = next((i for i, t in enumerate(new) if t in stop), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True).strip()


def plain_token_loss(model, tokenizer, prompt: str, reference: str) -> float:
    ex, _ = encode_example(tokenizer, prompt, reference, max_seq_length=2048)
    ids, labels = torch.tensor([ex.input_ids]), torch.tensor([ex.labels])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    target = labels[0, 1:]
    keep = target != -100
    return float(-logp[keep].gather(1, target[keep][:, None]).mean())


def test_prompt_is_every_turn_before_the_last_answer(tokenizer):
    r = rows()[3]
    prompt, reference = prompt_and_reference(tokenizer, r)
    assert reference == "tree"
    assert "Hello!" in prompt and "Say the word 'tree'." in prompt and prompt.endswith("<|im_start|>assistant\n")
    text = SourcedRow(parse_row({"text": "just text"}, "mem:9"), "mem:9", "mem", "{}")
    with pytest.raises(DataError, match="mem:9: .*plain text rows have no answer"):
        prompt_and_reference(tokenizer, text)


def test_batched_generation_and_metrics_equal_plain_references(tiny, tokenizer):
    held = rows()
    res = evaluate_rows(tiny, tokenizer, held, max_new_tokens=6, batch_size=3, log_samples=True)
    r = res.tasks["held_out"]
    assert r.protocol == "freeform" and r.metric == "rouge_l" and r.n == len(held) and r.role == "downstream"
    pairs = [prompt_and_reference(tokenizer, x) for x in held]
    answers = [plain_answer(tiny, tokenizer, p, 6) for p, _ in pairs]
    assert [s["generated"] for s in r.samples] == answers and all(answers)
    for metric, fn in ANSWER_METRICS.items():
        values = [fn(a, ref) for a, (_, ref) in zip(answers, pairs, strict=True)]
        assert r.metrics[metric] == pytest.approx(sum(values) / len(values))
    assert r.outcomes == [ANSWER_METRICS["rouge_l"](a, ref) for a, (_, ref) in zip(answers, pairs, strict=True)]
    losses = [plain_token_loss(tiny, tokenizer, p, ref) for p, ref in pairs]
    assert r.metrics["token_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)
    assert r.metrics["rouge_l_stderr"] is not None and r.stderr == r.metrics["rouge_l_stderr"]


def test_sampling_is_reproducible_by_its_seed(tiny, tokenizer):
    held = rows()
    state = torch.get_rng_state()
    a = evaluate_rows(tiny, tokenizer, held, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3,
                      log_samples=True)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was
    b = evaluate_rows(tiny, tokenizer, held, max_new_tokens=8, do_sample=True, temperature=1.5, seed=3,
                      log_samples=True)
    c = evaluate_rows(tiny, tokenizer, held, max_new_tokens=8, do_sample=True, temperature=1.5, seed=4,
                      log_samples=True)
    answers = [[s["generated"] for s in x.tasks["held_out"].samples] for x in (a, b, c)]
    assert a.protocol == "freeform-sampled"
    assert answers[0] == answers[1] and answers[0] != answers[2]


def test_bad_arguments(tiny, tokenizer):
    with pytest.raises(DataError, match="primary metric 'bleu'"):
        evaluate_rows(tiny, tokenizer, rows(), primary="bleu")
    with pytest.raises(DataError, match="no held-out rows"):
        evaluate_rows(tiny, tokenizer, [])


def test_open_probe_asks_without_options_and_scores_by_stating_the_option(tiny, tokenizer, monkeypatch):
    examples = get_task("arc_easy").examples("test", limit=4)
    seen = {}

    def fake_generate(model, tok, prompts, **kw):
        seen["prompts"] = prompts
        right = [ex.choices[ex.label] for ex in examples]
        wrong = [ex.choices[(ex.label + 1) % len(ex.choices)] for ex in examples]
        # right; wrong; right but also a wrong option; nothing
        return [f"It is {right[0]}.", wrong[1], f"{right[2]} or {wrong[2]}", "I do not know"]

    monkeypatch.setattr(protocols, "generate_greedy", fake_generate)
    res = evaluate(tiny, tokenizer, ["arc_easy"], protocol="open", limit=4)
    r = res.tasks["arc_easy"]
    for ex, prompt in zip(examples, seen["prompts"], strict=True):
        assert ex.question.strip() in prompt and prompt.endswith("<|im_start|>assistant\n")
        assert "A." not in prompt and not any(f"\n{c}" in prompt for c in ex.choices)
    assert r.outcomes == [1.0, 0.0, 0.0, 0.0] and r.metric == "open_acc" and r.chance == 0.0
    assert r.metrics["f1"] > 0


def test_open_probe_runs_on_a_model_and_refuses_tasks_without_an_open_form(tiny, tokenizer):
    res = evaluate(tiny, tokenizer, ["sciq", "basic_arithmetic"][:1], protocol="open", limit=3, log_samples=True)
    r = res.tasks["sciq"]
    ex = get_task("sciq").examples("test", limit=3)
    assert r.n == 3 and r.outcomes == [float(states_option(s["generated"], e.choices, e.label))
                                       for s, e in zip(r.samples, ex, strict=True)]
    with pytest.raises(Exception, match="no open-question form"):
        evaluate(tiny, tokenizer, ["boolq"], protocol="open", limit=2)


def test_a_task_under_two_protocols_is_two_rows_and_two_means(tiny, tokenizer):
    loglik = evaluate(tiny, tokenizer, ["arc_easy"], protocol="loglik", limit=4)
    opened = evaluate(tiny, tokenizer, ["arc_easy"], protocol="open", limit=4).relabelled(" (open)", "general")
    merged = loglik.merged(opened)
    assert set(merged.tasks) == {"arc_easy", "arc_easy (open)"}
    assert merged.tasks["arc_easy (open)"].task == "arc_easy (open)"
    report = forgetting_report(merged, merged)
    assert {(r.task, r.protocol) for r in report.general} == {("arc_easy", "loglik"), ("arc_easy (open)", "open")}
    table = learn_forget_table(report)
    assert "mean general (loglik)" in table and "mean general (open)" in table


def test_the_probe_baseline_script_tables_every_protocol(tiny, tokenizer, tmp_path):
    from conftest import load_benchmark

    script = load_benchmark("generative_probe")
    results = script.probe(tiny, tokenizer, limit=2, tasks=("arc_easy", "piqa"))
    assert [list(r.tasks) for r in results] == [["arc_easy", "piqa"], ["basic_arithmetic"]]
    text = script.markdown(results, model="tiny", command="cmd")
    for r in results:
        for name, t in r.tasks.items():
            assert f"| {name} | {t.protocol} | 2 | {t.score:.3f} | {t.stderr:.3f} |" in text
    assert text.count("- arc_easy: gold") == 2
