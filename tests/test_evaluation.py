"""Evaluator: the packed loglik scorer against a direct per-choice computation, lm-eval's tokenisation rules,
metrics, the letter and generate protocols, results JSON, forgetting report and the CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import embedded_tokenizer, sharp_tiny_llama

import slim_peft.cli.eval as eval_cli
import slim_peft.evaluation as ev
import slim_peft.evaluation.protocols as protocols
from slim_peft.cli.eval import add_arguments as add_eval_arguments
from slim_peft.cli.eval import command as eval_command
from slim_peft.cli.main import main as cli_main
from slim_peft.evaluation import (
    EvalResult,
    encode_pair,
    evaluate,
    forgetting_report,
    letter_requests,
    mean_stderr,
    pack_sequences,
)
from slim_peft.evaluation.scorer import score_requests
from slim_peft.reporting import write_forgetting_report
from slim_peft.tasks import get_task


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return sharp_tiny_llama(tokenizer)


def direct_loglik(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of log p(cont | ctx) from one plain forward of ctx + cont."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0].double(), dim=-1)
    return float(sum(logprobs[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def groups_for(tokenizer, names: list[str], n: int) -> list[list[tuple[list[int], list[int]]]]:
    out = []
    for name in names:
        task = get_task(name)
        for ex in task.examples("full", limit=n):
            req = task.lm_eval_request(ex)
            out.append(
                [encode_pair(tokenizer, c, x) for c, x in zip(req.contexts, req.continuations, strict=True)]
            )
    return out


# ----------------------------------------------------------------------------------------- scorer
def test_packed_scorer_equals_direct_per_choice_logprobs(tiny, tokenizer):
    groups = groups_for(tokenizer, ["arc_easy", "winogrande", "piqa", "copa"], 4)
    assert ev.packing_stats(groups, batch_size=3)["rows"] < len(groups)  # rows hold several questions
    packed = score_requests(tiny, groups, batch_size=3, pack=True)
    chains = score_requests(tiny, groups, batch_size=5, pack=False)
    for group, got_p, got_c in zip(groups, packed, chains, strict=True):
        for (ctx, cont), p, c in zip(group, got_p, got_c, strict=True):
            want = direct_loglik(tiny, ctx, cont)
            assert p == pytest.approx(want, abs=2e-3)
            assert c == pytest.approx(want, abs=2e-3)


def test_packing_shares_prefixes_and_skips_final_tokens():
    g = pack_sequences([([1, 2, 3], [4, 5]), ([1, 2, 3], [4, 6]), ([1, 2, 3], [7])])
    # tree: 1-2-3-4 (5, 6 and 7 are final tokens, never inputs)
    assert g.tokens == [1, 2, 3, 4] and g.parents == [-1, 0, 1, 2] and g.depth == [0, 1, 2, 3]
    assert g.targets == [[(2, 4), (3, 5)], [(2, 4), (3, 6)], [(2, 7)]]
    chains = pack_sequences([([1, 2], [3]), ([1, 2], [4])], share=False)
    assert chains.tokens == [1, 2, 1, 2]


def test_encode_pair_follows_lm_eval(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: why?\nAnswer: ", "because")
    assert ctx == tokenizer.encode("Question: why?\nAnswer:")  # trailing space moved to the continuation
    whole = tokenizer.encode("Question: why?\nAnswer: because")
    assert ctx + cont == whole[: len(ctx)] + whole[len(ctx) :] and cont == whole[len(ctx) :]


def test_mean_stderr_is_lm_evals():
    vals = [1.0, 0.0, 1.0, 1.0, 0.0]
    p = 0.6
    assert mean_stderr(vals) == pytest.approx(math.sqrt(p * (1 - p) / (len(vals) - 1)))
    assert mean_stderr([1.0]) is None


# ----------------------------------------------------------------------------------------- protocols
def test_loglik_results_match_direct_argmax(tiny, tokenizer):
    res = evaluate(
        tiny,
        tokenizer,
        ["arc_easy", "winogrande"],
        split="test",
        limit=6,
        batch_size=4,
        log_samples=True,
        seed=3,
    )
    assert EvalResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res  # the JSON round-trips
    for name in ("arc_easy", "winogrande"):
        r = res.tasks[name]
        task = get_task(name)
        assert r.task == name and r.protocol == "loglik" and r.n == 6 and r.seed == 3
        assert r.split["name"] == "test" and r.model and len(r.outcomes) == 6
        accs, norms = [], []
        for ex, sample in zip(task.examples("test", limit=6), r.samples, strict=True):
            req = task.lm_eval_request(ex)
            lls = [
                direct_loglik(tiny, *encode_pair(tokenizer, c, x))
                for c, x in zip(req.contexts, req.continuations, strict=True)
            ]
            assert sample["loglik"] == pytest.approx(lls, abs=2e-3)
            accs.append(float(max(range(len(lls)), key=lambda i: lls[i]) == req.gold))
            norms.append(
                float(max(range(len(lls)), key=lambda i: lls[i] / len(req.choice_texts[i])) == req.gold)
            )
        assert r.metrics["acc"] == pytest.approx(sum(accs) / 6)
        assert r.metrics["acc_stderr"] == pytest.approx(mean_stderr(accs))
        if task.has_acc_norm:
            assert r.metrics["acc_norm"] == pytest.approx(sum(norms) / 6)
        else:
            assert "acc_norm" not in r.metrics


def test_letter_protocol_scores_the_next_token_after_the_chat_prompt(tiny, tokenizer):
    task = get_task("openbookqa")
    exs = task.examples("test", limit=4)
    res = evaluate(tiny, tokenizer, ["openbookqa"], protocol="letter", limit=4, log_samples=True)
    for ex, sample in zip(exs, res.tasks["openbookqa"].samples, strict=True):
        reqs = letter_requests(tokenizer, ex)
        prompt = reqs[0][0]
        assert all(r[0] == prompt and len(r[1]) == 1 for r in reqs)  # one prompt, one token per letter
        assert [tokenizer.decode(r[1]) for r in reqs] == ["A", "B", "C", "D"]
        with torch.no_grad():
            last = F.log_softmax(tiny(torch.tensor([prompt])).logits[0, -1].double(), dim=-1)
        assert sample["logprob"] == pytest.approx([float(last[r[1][0]]) for r in reqs], abs=2e-3)


def test_generate_protocol_exact_match(tiny, tokenizer, monkeypatch):
    def fake_generate(model, tok, prompts, batch_size=16, **kw):
        exs = get_task("basic_arithmetic").examples("test", limit=4)
        assert prompts[0] == f"Question: {exs[0].question}\nAnswer:"
        a = [ex.answer for ex in exs]
        # right; wrong; right after restating the sum (flexible extract); wrong number containing the answer
        return [f" {a[0]} ", "no idea", f" 2 + 3 = {a[2]}", f" {a[3]}1"]

    monkeypatch.setattr(protocols, "generate_greedy", fake_generate)  # the name the protocol calls
    res = evaluate(tiny, tokenizer, ["basic_arithmetic"], protocol="generate", limit=4)
    r = res.tasks["basic_arithmetic"]
    assert r.metric == "exact_match" and r.score == 0.5 and r.chance == 0.0
    assert r.outcomes == [1.0, 0.0, 1.0, 0.0]  # per question, in order
    assert r.metrics["exact_match_strict"] == 0.25
    assert ev.extract_answer(" 5 + 91 = 96") == "96" and ev.extract_answer(" -3.5 ") == "-3.5"
    with pytest.raises(ValueError, match="no generation form"):
        evaluate(tiny, tokenizer, ["piqa"], protocol="generate", limit=2)


def test_generate_greedy_runs_on_a_real_model(tiny, tokenizer):
    texts = ev.generate_greedy(tiny, tokenizer, ["Question: 1 + 1 =\nAnswer:", "Hi"], max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) and "\n" not in t for t in texts)


def test_adapter_model_scores_like_unpacked(tiny, tokenizer):
    sp = pytest.importorskip("slim_peft")
    if not hasattr(sp, "get_adapter_model"):
        pytest.skip("adapter model code not available")
    import copy

    model = sp.get_adapter_model(
        copy.deepcopy(tiny), sp.SlimConfig(r=4, num_lora_experts=4, num_identity_experts=2, top_k=2)
    )
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    model.eval()
    groups = groups_for(tokenizer, ["arc_easy", "winogrande"], 3)
    packed = score_requests(model, groups, batch_size=2, pack=True)
    chains = score_requests(model, groups, batch_size=4, pack=False)
    assert [v for g in packed for v in g] == pytest.approx([v for g in chains for v in g], abs=2e-3)


# ----------------------------------------------------------------------------------------- report
def _fake_results(scores: dict[str, float], adapter=None, outcomes: dict[str, list[float]] | None = None
                  ) -> EvalResult:
    tasks = {}
    for name, s in scores.items():
        task = get_task(name)
        tasks[name] = {
            "task": name, "protocol": "loglik", "metric": "acc", "score": s, "stderr": math.sqrt(s * (1 - s) / 99),
            "metrics": {"acc": s}, "n": 100, "split": task.split_info("test"), "seed": 0, "model": "m",
            "adapter": adapter, "chance": task.chance, "role": task.role, "sample_type": task.sample_type,
            "seconds": 0.0,
        }
        if outcomes and name in outcomes:  # n and stderr of these questions
            tasks[name].update(outcomes=outcomes[name], ids_digest="same-questions", n=len(outcomes[name]),
                               stderr=mean_stderr(outcomes[name]))
    return EvalResult.from_dict({"model": "m", "adapter": adapter, "protocol": "loglik", "split": "test",
                                 "limit": None, "seed": 0, "tasks": tasks})


def test_forgetting_report_and_writers(tmp_path):
    base = _fake_results({"arc_easy": 0.5, "piqa": 0.6, "openbookqa": 0.3})
    adapted = _fake_results({"arc_easy": 0.45, "piqa": 0.6, "openbookqa": 0.5}, adapter="dir")
    rep = forgetting_report(base, adapted)
    assert [r.task for r in rep.general] == ["arc_easy", "piqa"]
    assert [r.task for r in rep.downstream] == ["openbookqa"]
    arc = rep.general[0]
    assert arc.delta == pytest.approx(-0.05) and arc.retention == pytest.approx(0.9)
    # results without per-question outcomes: the independent-samples stderr
    assert arc.delta_stderr == pytest.approx(math.hypot(arc.base_stderr, arc.adapted_stderr))
    assert rep.mean_retention == pytest.approx((0.9 + 1.0) / 2)
    assert rep.learned == pytest.approx(0.2) and rep.forgotten == pytest.approx(0.025)
    paths = write_forgetting_report(rep, tmp_path / "rep")
    assert "| arc_easy | acc | 100 | 0.5000 ± 0.0503 | 0.4500 ± 0.0500 | -0.0500 |" in paths["md"].read_text()
    assert json.loads(paths["json"].read_text())["mean_retention"] == pytest.approx(0.95)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    other = _fake_results({"arc_easy": 0.4})
    other.tasks["arc_easy"].n = 50
    with pytest.raises(ValueError, match="differ in n"):
        forgetting_report(base, other)


def test_delta_stderr_is_paired_when_both_results_carry_outcomes():
    """The same 8 questions: the adapted model gains 2 and loses none. Paired: the stderr of the 8
    differences (0,0,0,0,0,0,1,1), sqrt(var / n) = sqrt((2/8 * 6/8) * 8/7 / 8) = 0.1637; the unpaired formula
    would add both sides' variances."""
    before = [1, 1, 1, 0, 0, 0, 0, 0]
    after = [1, 1, 1, 0, 0, 0, 1, 1]
    base = _fake_results({"arc_easy": 3 / 8}, outcomes={"arc_easy": [float(x) for x in before]})
    adapted = _fake_results({"arc_easy": 5 / 8}, outcomes={"arc_easy": [float(x) for x in after]})
    row = forgetting_report(base, adapted).general[0]
    assert row.delta_stderr == pytest.approx(0.16366, abs=1e-5)
    assert row.delta_stderr < math.hypot(row.base_stderr, row.adapted_stderr)
    adapted.tasks["arc_easy"].ids_digest = "other-questions"  # not the same questions: no pairing
    assert forgetting_report(base, adapted).general[0].delta_stderr == pytest.approx(
        math.hypot(row.base_stderr, row.adapted_stderr))


# ----------------------------------------------------------------------------------------- CLI
def test_cli_parses_the_documented_command_and_writes_json(tiny, tokenizer, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    args = parser.parse_args(
        "--tasks arc_easy,piqa --split full --limit 400 --protocol loglik --output results.json".split()
    )
    assert (args.tasks, args.split, args.limit, args.protocol, args.output) == (
        "arc_easy,piqa",
        "full",
        400,
        "loglik",
        "results.json",
    )
    assert args.model is None and args.adapter is None and args.batch_size == 16 and args.seed == 0

    monkeypatch.setattr(eval_cli, "load_model_for_eval", lambda *a, **k: (tiny, tokenizer))
    out = tmp_path / "results.json"
    args = parser.parse_args(
        ["--tasks", "arc_easy,piqa", "--split", "full", "--limit", "3", "--output", str(out)]
    )
    assert eval_command(args) == 0
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"arc_easy", "piqa"} and res["tasks"]["piqa"]["n"] == 3
    assert res["split"] == "full" and res["limit"] == 3 and res["protocol"] == "loglik"
    assert cli_main(["eval", "--tasks", "nope"]) == 2  # the CLI's one error handler: a line, exit status 2
    assert "unknown task 'nope'" in capsys.readouterr().err
