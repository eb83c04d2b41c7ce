"""The lm-eval backend (integrations/lm_eval_backend.py), offline: local YAML tasks over JSON files written here.
Our backend on a LoRA adapter scores what lm-eval's own `hf` backend scores on the merged model, and a SLIM
adapter runs through every request type (loglikelihood, loglikelihood_rolling, generate_until)."""

from __future__ import annotations

import json

import pytest
from conftest import WORDS, method_configs, randomize, save_tiny_model

import slim_peft as sp

lm_eval = pytest.importorskip("lm_eval")

TASKS = {
    "toy_choice": """task: toy_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: which word is {{{{answer}}}}? Answer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "toy_rolling": """task: toy_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "toy_generate": """task: toy_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: which word is {{{{answer}}}}? Answer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = [{"answer": WORDS[i % 12], "choices": [WORDS[i % 12], WORDS[(i + 5) % 12], WORDS[(i + 7) % 12]],
             "label": 0, "text": f"the {WORDS[i % 12]} {WORDS[(i + 3) % 12]} is {WORDS[(i + 1) % 12]}"}
            for i in range(12)]
    data = path / "toy.json"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    for name, text in TASKS.items():
        (path / f"{name}.yaml").write_text(text.format(data=data))
    return path


def _evaluate(lm, tasks_dir, tasks):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(tasks_dir)),
                                  log_samples=False)
    return out["results"]


def _adapter(tmp_path, base_dir, cfg):
    base, _ = sp.load_base_model(str(base_dir))
    model = sp.get_adapter_model(base, cfg)
    randomize(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_backend_equals_lm_evals_hf_backend_on_the_merged_lora(tmp_path, tasks_dir):
    from lm_eval.models.huggingface import HFLM

    from slim_peft.integrations.lm_eval_backend import SlimPeftLM
    from slim_peft.integrations.merged import export_merged

    base_dir = save_tiny_model(tmp_path / "base")
    adapter = _adapter(tmp_path, base_dir, sp.LoraConfig(r=4))
    merged = export_merged(adapter, tmp_path / "merged")
    tasks = ["toy_choice", "toy_rolling", "toy_generate"]
    ours = _evaluate(SlimPeftLM(adapter=str(adapter), batch_size=4), tasks_dir, tasks)
    theirs = _evaluate(HFLM(pretrained=str(merged), device="cpu", batch_size=4), tasks_dir, tasks)
    base_only = _evaluate(SlimPeftLM(pretrained=str(base_dir), batch_size=4), tasks_dir, ["toy_rolling"])
    for task in tasks:
        for key, value in theirs[task].items():
            if isinstance(value, float):
                assert ours[task][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, key)
    # the adapter changed the scores, so equal numbers mean the adapter was applied
    assert base_only["toy_rolling"]["word_perplexity,none"] != pytest.approx(
        ours["toy_rolling"]["word_perplexity,none"], rel=1e-4)


def test_a_slim_adapter_runs_every_request_type(tmp_path, tasks_dir):
    from lm_eval.api.registry import get_model

    base_dir = save_tiny_model(tmp_path / "base")
    adapter = _adapter(tmp_path, base_dir, sp.SlimConfig(r=4, num_lora_experts=3))
    lm = get_model("slim-peft")(adapter=str(adapter), batch_size=2)  # registered by name
    assert lm.adapter_model is not None and lm.adapter_model.adapter_config.method == "slim"
    results = _evaluate(lm, tasks_dir, ["toy_choice", "toy_rolling", "toy_generate"])
    assert 0.0 <= results["toy_choice"]["acc,none"] <= 1.0
    assert results["toy_rolling"]["word_perplexity,none"] > 1.0
    assert "exact_match,none" in results["toy_generate"]


def test_the_cli_runs_lm_evals_command_line_with_our_backend(tmp_path, tasks_dir):
    from slim_peft.cli.main import main

    base_dir = save_tiny_model(tmp_path / "base")
    adapter = _adapter(tmp_path, base_dir, sp.LoraConfig(r=4))
    out = tmp_path / "results"
    code = main(["lm-eval", "--adapter", str(adapter), "--tasks", "toy_choice", "--include_path", str(tasks_dir),
                 "--batch_size", "2", "--output_path", str(out)])
    assert code == 0
    written = list(out.rglob("results*.json"))
    assert written and "toy_choice" in json.loads(written[0].read_text())["results"]


@pytest.mark.parametrize("name", sorted(method_configs()))
def test_every_method_scores_through_the_backend_as_through_our_model(tmp_path, tasks_dir, name):
    """The backend's log-likelihoods are those of the AdapterModel itself, for every method."""
    from lm_eval.api.instance import Instance

    from slim_peft.integrations.lm_eval_backend import SlimPeftLM

    base_dir = save_tiny_model(tmp_path / "base")
    adapter = _adapter(tmp_path, base_dir, method_configs(r=4)[name])
    lm = SlimPeftLM(adapter=str(adapter), batch_size=2)
    request = Instance("loglikelihood", {}, ("Question: which word is red? Answer:", " red"), 0)
    (ll, _), = lm.loglikelihood([request], disable_tqdm=True)
    tok = lm.tokenizer
    ctx = tok("Question: which word is red? Answer:", add_special_tokens=False)["input_ids"]
    whole = tok("Question: which word is red? Answer: red", add_special_tokens=False)["input_ids"]
    import torch

    ids = torch.tensor([whole])
    model = sp.AdapterModel.from_pretrained(sp.load_base_model(str(base_dir))[0], adapter).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    expected = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
    assert ll == pytest.approx(expected, abs=1e-4)
