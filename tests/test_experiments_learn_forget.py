"""`run_learn_forget` on the user's own rows (`slim-peft run --data`, `slim-peft train --data`) with a tiny Llama
saved to disk: the held-out rows are the generatively judged downstream side and never trained on, the general
side gains the open-question probe and arithmetic by generation, the report holds both; every bad input fails
before the model is loaded and writes nothing; the embedded demo set shares no question with any evaluation
split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import WORDS, save_tiny_model

import slim_peft.experiments.learn_forget as learn_forget
import slim_peft.experiments.setup as setup
from slim_peft.cli.main import main
from slim_peft.data import EMBEDDED_DATA, held_out_split, parse_sources, read_sources
from slim_peft.errors import ConfigError
from slim_peft.experiments.learn_forget import LearnForgetConfig, run_learn_forget, run_suites
from slim_peft.training.job import load_yaml_config, split_config


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def chat_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        rows.append({"messages": [{"role": "user", "content": f"which {a} is {b}? {i}"},
                                  {"role": "assistant", "content": f"{b} {a}"}]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data_config(model_dir: Path, data: Path, out: Path, **kw) -> LearnForgetConfig:
    base = dict(method="lora", model=str(model_dir), data=str(data), general_tasks=("arc_easy",),
                probe_tasks=("arc_easy", "basic_arithmetic"), eval_limit=5, probe_limit=3, max_steps=2,
                output_dir=str(out), adapter={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                progress=lambda s: None)
    return LearnForgetConfig(**{**base, **kw})


def test_a_run_on_own_rows_judges_the_held_out_rows_and_the_probe(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows())
    cfg = data_config(tiny_model_dir, data, tmp_path / "run")
    result = run_learn_forget(cfg)
    rows = read_sources(parse_sources(str(data)))
    train, held = held_out_split(rows, cfg.held_out_fraction)
    assert result.training["examples"] == len(train) and result.config["held_out_rows"] == len(held)
    (down,) = result.learn_forget.downstream
    assert down.task == "held_out" and down.protocol == "freeform" and down.metric == "rouge_l"
    assert down.n == min(len(held), cfg.eval_limit)
    general = {(r.task, r.protocol) for r in result.learn_forget.general}
    assert general == {("arc_easy", "loglik"), ("arc_easy (open)", "open"), ("basic_arithmetic (gen)", "generate")}
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["before"]) == {"downstream", "general", "probe", "arithmetic"}
    assert results["before"]["probe"]["tasks"]["arc_easy (open)"]["role"] == "general"
    held_where = {r.where for r in held}
    samples = results["after"]["downstream"]["tasks"]["held_out"]
    assert samples["n"] == down.n and samples["outcomes"] is not None
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "Trained on " + str(data) in summary and "## Generated answers: every metric" in summary
    assert "mean general (open)" in summary and "| held_out | token_loss |" in summary
    # the effective config trains on the same rows again
    _, data_args, _ = split_config(load_yaml_config(tmp_path / "run" / "config.yaml"))
    assert data_args.data == str(data) and data_args.tasks == []
    assert held_where and not held_where & {r.where for r in train}


def test_the_tasks_a_demo_set_comes_from_leave_the_general_side(tmp_path):
    cfg = LearnForgetConfig(data="sciq_instruct", progress=lambda s: None)
    data = learn_forget.read_training_data(cfg)
    assert data.related == {"sciq"}
    suites = run_suites(cfg, data, ["arc_easy", "piqa"])
    assert "sciq" not in suites["probe"].tasks and suites["arithmetic"].tasks == ("basic_arithmetic",)
    assert suites["downstream"].protocol == "freeform" and len(suites["downstream"].rows) == len(data.held_out)
    with pytest.raises(ConfigError, match=r"probe tasks \['boolq'\] have neither an open-question form"):
        run_suites(LearnForgetConfig(data="sciq_instruct", probe_tasks=("boolq",)), data, [])


def test_the_demo_set_shares_no_question_with_an_evaluation_split():
    from slim_peft.tasks import get_task

    rows = EMBEDDED_DATA["sciq_instruct"].load()
    train_half = get_task("sciq").examples("train")
    test_questions = {ex.question.strip() for ex in get_task("sciq").examples("test")}
    assert len(rows) == len(train_half) > 400
    assert all(f"Question: {q}" not in r["input"] for r in rows for q in test_questions)
    for r, ex in zip(rows, train_half, strict=True):
        assert r["output"] == ex.answer.strip() and ex.question.strip() in r["input"]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: bad input must be refused before."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(setup, "load_base_model", refuse)


BAD = [
    ([{"foo": 1}], "", r"bad.jsonl:1: a row with fields \['foo'\] matches no known format"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}], "",
     r"bad.jsonl:1: message 1 is an empty assistant turn"),
    ([{"text": "x"}, {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}], "",
     r"bad.jsonl:2: message 0 has role 'assistant' where 'user' is expected"),
    ([{"text": "hello"}], "alpaca", r"bad.jsonl:1: field 'instruction' must be a string"),
    (None, "", r"dataset id 'someone/some-data' needs the Hugging Face Hub"),
]


@pytest.mark.parametrize("rows,data_format,message", BAD)
@pytest.mark.parametrize("command", ["run", "train"])
def test_bad_data_fails_before_the_model_and_writes_nothing(tmp_path, capsys, monkeypatch, no_model, rows,
                                                            data_format, message, command):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    data = "someone/some-data" if rows is None else str(write_jsonl(tmp_path / "bad.jsonl", rows))
    out = tmp_path / "out"
    fmt = ["--data-format" if command == "run" else "--data_format", data_format] if data_format else []
    argv = (["run", "--data", data, "--output-dir", str(out), *fmt] if command == "run" else
            ["train", "--data", data, "--output_dir", str(out), *fmt])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_a_file_in_another_format_than_its_name_says(tmp_path, capsys, no_model):
    path = tmp_path / "rows.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')  # JSONL named .json
    code = main(["run", "--data", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "rows.json:2: not valid JSON" in err and "name the file .jsonl" in err
    assert not (tmp_path / "out").exists()


def test_train_on_own_rows_reports_truncation(tmp_path, tiny_model_dir, capsys):
    rows = chat_rows(12)
    rows[0]["messages"][0]["content"] = " ".join(WORDS * 20)  # far longer than max_seq_length
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--method", "lora", "--r", "4",
                 "--target_modules", "q_proj,v_proj", "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--max_seq_length", "64", "--output_dir", str(tmp_path / "out"), "--disable_tqdm"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "training data: 12 examples ({'chat': 12, 'truncated': 1})" in out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_eval_scores_own_rows_generatively(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(10))
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--held-out", "1", "--metric", "f1",
                 "--max-new-tokens", "4", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    task = json.loads(out.read_text())["tasks"]["held_out"]
    assert task["protocol"] == "freeform" and task["metric"] == "f1" and task["n"] == 10
    assert "| held_out |" in printed
    held = held_out_split(read_sources(parse_sources(str(data))), 0.5)[1]
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--held-out", "0.5",
                 "--output", str(out)])
    assert code == 0 and json.loads(out.read_text())["tasks"]["held_out"]["n"] == len(held)
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir)]) == 2
    assert "give --tasks (benchmark tasks) or --data" in capsys.readouterr().err
