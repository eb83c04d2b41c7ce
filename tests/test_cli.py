"""The command line: `run` on the embedded model writes every report file; `train` from YAML with
overrides; every bad input gives its one-line error; inspect, generate, bench. Apart from the `run` test,
a tiny random Llama with a tiny tokenizer saved to a directory stands in for the model."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WORDS, greedy, save_tiny_model

import slim_peft as sp
from slim_peft.cli.main import main
from slim_peft.errors import ConfigError
from slim_peft.training.checkpoint import list_checkpoints
from slim_peft.training.job import coerce, parse_overrides, split_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with a byte-level BPE tokenizer and a ChatML template, saved to disk."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(48):
        choices = rng.sample(WORDS, 3)
        rows.append({"question": f"which one is {choices[i % 3]}?", "choices": choices, "label": i % 3})
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_argv(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model_dir), "--tasks", str(data), "--train_split", "full",
            "--method", "lora", "--r", "4", "--lora_alpha", "8", "--target_modules", "q_proj,v_proj",
            "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "8",
            "--logging_steps", "1", "--save_steps", "2", "--disable_tqdm", "--learning_rate", "1e-2", *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------- unit parts


def test_overrides_and_types():
    assert parse_overrides(["--learning-rate", "2e-4", "--bf16", "--max_steps=3", "--resume"]) == {
        "learning_rate": "2e-4", "bf16": "true", "max_steps": "3", "resume_from_checkpoint": "latest"}
    targs, data, adapter = split_config({"learning_rate": "2e-4", "max_steps": "7", "method": "slim",
                                         "top_k": "1", "target_modules": "gate_proj", "save_total_limit": "null",
                                         "tasks": "boolq", "report_to": "tensorboard"})
    assert targs.learning_rate == 2e-4 and targs.max_steps == 7 and targs.save_total_limit is None
    assert adapter.method == "slim" and adapter.top_k == 1 and adapter.target_modules == ["gate_proj"]
    assert data.tasks == ["boolq"] and targs.report_to == ["jsonl", "tensorboard"]
    assert coerce("r", "16", int) == 16
    with pytest.raises(ConfigError, match="r: expected int, got 'sixteen'"):
        coerce("r", "sixteen", int)
    with pytest.raises(ConfigError, match="bf16: expected bool"):
        split_config({"bf16": "maybe"})


def test_every_example_config_is_valid():
    from slim_peft.adapters import METHODS
    from slim_peft.training.job import load_yaml_config

    methods = set()
    for path in sorted(EXAMPLES.glob("*.yaml")):
        _, _, adapter = split_config(load_yaml_config(path))
        methods.add(adapter.method)
    assert methods == set(METHODS)  # one example per method


# --------------------------------------------------------------------------------- train from the CLI


def test_train_from_yaml_with_overrides(tmp_path, tiny_model_dir, task_file, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model_name_or_path: {tiny_model_dir}\ntasks: {task_file}\ntrain_split: full\n"
                   f"method: slim\nr: 4\nlora_alpha: 8\nnum_lora_experts: 2\nnum_identity_experts: 1\n"
                   f"num_clusters: 2\nlearning_rate: 5e-3\nmax_steps: 50\nper_device_train_batch_size: 8\n"
                   f"logging_steps: 1\nsave_steps: 0\ndisable_tqdm: true\neval_tasks: {task_file}\n"
                   f"eval_limit: 8\neval_protocol: letter\noutput_dir: {tmp_path / 'ignored'}\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["train", "--config", str(cfg), "--max-steps", "3", "--output_dir", str(out)],
                                capsys)
    assert code == 0, err
    final = json.loads((out / "final_state.json").read_text())
    assert final["global_step"] == 3  # the override won over the YAML's 50
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    routing = json.loads((out / "adapter" / "routing_stats_train.json").read_text())
    assert 0.0 <= routing["mean_identity_share"] <= 1.0
    assert routing["sites"] and all(site["tokens"] > 0 for site in routing["sites"].values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    accuracies = [r["eval/toy"] for r in records if "eval/toy" in r]  # the periodic/final evaluation hook
    assert accuracies and all(0.0 <= a <= 1.0 and (8 * a) == round(8 * a) for a in accuracies)  # k of 8
    l1 = [r["aux/l1"] for r in records if "aux/l1" in r]
    assert len(l1) == 3 and all(v >= 0.0 for v in l1)
    written = (out / "config.yaml").read_text()
    assert "max_steps: 3" in written and "method: slim" in written
    from slim_peft.training.job import load_yaml_config

    again, data, adapter = split_config(load_yaml_config(out / "config.yaml"))  # it reads back
    assert again.max_steps == 3 and data.tasks == [str(task_file)] and adapter.num_lora_experts == 2
    # inspect and generate on the result
    from safetensors.torch import load_file

    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    elements = sum(t.numel() for t in weights.values())
    code, stdout, err = run_cli(["inspect", str(out)], capsys)
    assert code == 0, err
    assert "method: slim" in stdout and "adapter_model.safetensors" in stdout and "identity" in stdout
    assert f"{elements:,}" in stdout
    code, stdout, err = run_cli(["inspect", "--json", str(out)], capsys)
    assert code == 0, err
    info = json.loads(stdout)
    assert info["tensor_elements"] == elements
    assert info["files"]["adapter_model.safetensors"] == (out / "adapter" / "adapter_model.safetensors").stat().st_size
    assert info["config"]["r"] == 4 and info["config"]["num_lora_experts"] == 2
    assert info["routing"]["training data (during training)"]["mean_identity_share"] == pytest.approx(
        routing["mean_identity_share"])
    code, stdout, err = run_cli(["generate", "--adapter", str(out / "adapter"), "--max-new-tokens", "4",
                                 "which one is red?"], capsys)
    assert code == 0, err
    # the same greedy continuation as the adapter model's own argmax, token by token
    base, tok = sp.load_base_model(str(tiny_model_dir))
    model = sp.AdapterModel.from_pretrained(base, out / "adapter").eval()
    text = tok.apply_chat_template([{"role": "user", "content": "which one is red?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    new = greedy(model, ids, 4)[0, ids.shape[1]:].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new  # generation stops at eos
    assert stdout.strip() == tok.decode(new, skip_special_tokens=True).strip()


def test_console_script_runs_train(tmp_path, tiny_model_dir, task_file):
    exe = Path(sys.executable).parent / "slim-peft"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "slim_peft.cli"]
    res = subprocess.run(cmd + train_argv(tiny_model_dir, task_file, tmp_path / "out"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "done: 4 steps" in res.stdout
    out = tmp_path / "out"
    assert json.loads((out / "final_state.json").read_text())["global_step"] == 4
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2, 3, 4]  # --logging_steps 1
    # --save_steps 2: a checkpoint at step 2; the last step writes the adapter instead
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# -------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("extra,message", [
    (["--learning_rat", "1e-3"], "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    (["--num_lora_expert", "4", "--method", "slim"], "did you mean 'num_lora_experts'?"),
    (["--method", "slm"], "unknown method 'slm' (did you mean 'slim'?)"),
    (["--r", "0"], "r must be a positive integer, got 0"),
    (["--method", "slim", "--top_k", "12"], "top_k=12 must be between 1 and the number of experts"),
    (["--method", "slim", "--mask_ratio", "1.0"], "mask_ratio must be in [0, 1), got 1.0"),
    (["--warmup_ratio", "2"], "warmup_ratio must be in [0, 1)"),
    (["--target_modules", "qproj"], "has no linear module matching target_modules [qproj] (did you mean 'q_proj'?)"),
])
def test_bad_values_give_one_line_errors(tmp_path, tiny_model_dir, task_file, capsys, extra, message):
    code, _, err = run_cli(train_argv(tiny_model_dir, task_file, tmp_path / "out", *extra), capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("content,message", [
    (None, r"toy.jsonl.*(no such file|does not exist)"),
    ("", r"toy.jsonl.*holds no examples"),
    ('{"question": "q", "choices": ["a", "b"], "label": 0}\n{not json\n', r"toy.jsonl(:|, line )2: not valid JSON"),
    ('{"question": "q", "choices": ["a"], "label": 0}\n', r"'choices' must be a list of at least 2"),
])
def test_bad_data_files(tmp_path, tiny_model_dir, capsys, content, message):
    data = tmp_path / "toy.jsonl"
    if content is not None:
        data.write_text(content)
    code, _, err = run_cli(train_argv(tiny_model_dir, data, tmp_path / "out"), capsys)
    assert code == 2 and re.search(message, err), err


def test_bad_config_files(tmp_path, capsys):
    code, _, err = run_cli(["train", "--config", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: [1e-4\n")
    code, _, err = run_cli(["train", "--config", str(bad)], capsys)
    assert code == 2 and "not valid YAML" in err
    bad.write_text("- a\n- b\n")
    code, _, err = run_cli(["train", "--config", str(bad)], capsys)
    assert code == 2 and "must be a mapping" in err


def test_resume_with_another_config_is_a_clear_error(tmp_path, tiny_model_dir, task_file, capsys):
    out = tmp_path / "out"
    assert run_cli(train_argv(tiny_model_dir, task_file, out), capsys)[0] == 0
    code, _, err = run_cli(train_argv(tiny_model_dir, task_file, out, "--resume", "--learning_rate", "1e-3"), capsys)
    assert code == 2
    assert "another configuration" in err and "learning_rate: 0.01 in the checkpoint, 0.001 now" in err
    code, _, err = run_cli(train_argv(tiny_model_dir, task_file, out, "--resume", str(tmp_path / "nope")), capsys)
    assert code == 2 and "does not exist" in err


def test_nan_loss_stops_cli_and_never_overwrites_a_good_dir(tmp_path, tiny_model_dir, task_file, capsys):
    good = tmp_path / "good"
    assert run_cli(train_argv(tiny_model_dir, task_file, good), capsys)[0] == 0
    snapshot = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    code, _, err = run_cli(train_argv(tiny_model_dir, task_file, good), capsys)
    assert code == 2 and "already holds files" in err
    nan = ["--learning_rate", "1e30", "--warmup_ratio", "0", "--max_grad_norm", "0", "--max_steps", "40",
           "--save_steps", "1"]
    code, _, err = run_cli(train_argv(tiny_model_dir, task_file, good, *nan, "--overwrite"), capsys)
    assert code == 1
    assert "became nan" in err or "became inf" in err
    assert "Last good checkpoint" in err and "left untouched" in err
    assert {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()} == snapshot
    fresh = tmp_path / "fresh"  # a fresh directory keeps the checkpoints written before the failure
    code, _, err = run_cli(train_argv(tiny_model_dir, task_file, fresh, *nan), capsys)
    assert code == 1 and list_checkpoints(fresh)


def test_inspect_and_bench_errors(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert code == 2 and "neither an adapter directory" in err
    monkeypatch.setenv("SLIM_PEFT_BENCHMARKS", str(tmp_path))
    code, _, err = run_cli(["bench", "speed"], capsys)
    assert code == 2 and "speed.py not found" in err
    code, _, err = run_cli(["run", "--method", "lorra", "--output-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "unknown method 'lorra' (did you mean 'lora'?)" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "summary.md").write_text("a good run")
    code, _, err = run_cli(["run", "--output-dir", str(taken)], capsys)
    assert code == 2 and "already holds files" in err and "--overwrite" in err
    assert (taken / "summary.md").read_text() == "a good run"


# ------------------------------------------------------------------------------- the main job, for real


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """The learn/forget table's rows in `text`, keyed by (task, kind): the cells after those two (metric, n,
    before, after, delta, its stderr)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and len(cells) == 8 and cells[1] in ("learn", "keep"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


@pytest.mark.slow
def test_run_on_the_embedded_model_writes_every_report_file(tmp_path):
    """Every report file is written, and the numbers in the summary (and the printed table) are those of
    results.json, which are those of the per-question outcomes before and after training and of the log."""
    from slim_peft.reporting import REPORT_FILES

    out = tmp_path / "run"
    exe = Path(sys.executable).parent / "slim-peft"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "slim_peft.cli"]
    res = subprocess.run(cmd + ["run", "--max-steps", "5", "--limit", "16", "--output-dir", str(out)],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in REPORT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    card = (out / "adapter" / "README.md").read_text()  # the model card: training and the learn/forget table
    assert "## Training" in card and "## Learned and forgotten" in card and "| boolq |" in card
    results = json.loads((out / "results.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = (out / "summary.md").read_text()
    # training: 5 steps (logged as one window of 5), its final loss in the summary
    assert results["training"]["steps"] == 5 and metrics[-1]["step"] == 5
    assert f"final loss {results['training']['final_loss']:.3f}" in summary
    # results.json: each row from the outcomes of the same questions before and after
    lf = results["learn_forget"]
    assert {r["task"] for r in lf["downstream"]} == {"openbookqa", "social_iqa", "boolq"}
    rows = table_rows(summary)
    assert len(rows) == len(lf["downstream"]) + len(lf["general"]) + 2  # + the two mean rows
    assert table_rows(res.stdout) == rows  # the printed table is the summary's
    for kind, part in (("learn", "downstream"), ("keep", "general")):
        for r in lf[part]:
            b = results["before"][part]["tasks"][r["task"]]["outcomes"]
            a = results["after"][part]["tasks"][r["task"]]["outcomes"]
            assert r["n"] == len(b) == len(a) and 0 < r["n"]
            assert r["base"] == pytest.approx(sum(b) / len(b)) and r["adapted"] == pytest.approx(sum(a) / len(a))
            assert r["delta"] == pytest.approx(r["adapted"] - r["base"])
            d = [y - x for x, y in zip(b, a, strict=True)]
            mean = sum(d) / len(d)
            se = (sum((v - mean) ** 2 for v in d) / (len(d) - 1)) ** 0.5 / len(d) ** 0.5  # paired stderr
            assert r["delta_stderr"] == pytest.approx(se, abs=1e-12)
            # summary.md: metric, n, before, after, delta, stderr of this row
            assert rows[(r["task"], kind)] == [r["metric"], str(r["n"]), f"{r['base']:.3f}", f"{r['adapted']:.3f}",
                                               f"{r['delta']:+.3f}", f"{r['delta_stderr']:.3f}"]
    learned = sum(r["delta"] for r in lf["downstream"]) / len(lf["downstream"])
    general = sum(r["delta"] for r in lf["general"]) / len(lf["general"])
    assert lf["mean_downstream_delta"] == pytest.approx(learned) and lf["mean_delta"] == pytest.approx(general)
    assert rows[("**mean downstream**", "learn")][4] == f"**{learned:+.3f}**"
    assert rows[("**mean general**", "keep")][4] == f"**{general:+.3f}**"
    share = results["routing"]["general"]["mean_identity_share"]
    assert 0.0 <= share <= 1.0 and f"{share:.3f}" in summary
