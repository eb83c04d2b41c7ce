"""Continual learning (experiments/continual.py, evaluation/continual.py): the metrics on a hand-written matrix; the
stage loop on a tiny Llama with 3 tasks (the replay buffer offers only earlier tasks' rows, SLIM's kept clusters
grow by one task per boundary and hold the finished task's clusters); a run killed during stage 2 and resumed ends
with the same adapter as an uninterrupted one; bad sequences are refused before any model is loaded."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import WORDS, save_tiny_model
from safetensors.torch import load_file

import slim_peft.experiments.setup as setup
from slim_peft.adapters.replay import ReplayBuffer
from slim_peft.cli.main import main
from slim_peft.errors import ConfigError
from slim_peft.evaluation import TaskResult
from slim_peft.evaluation.continual import continual_metrics
from slim_peft.experiments.continual import END_STATE, ContinualConfig, run_continual
from slim_peft.training import Trainer

# ------------------------------------------------------------------------------------------------ metrics


def result(outcomes: list[float], name: str = "t") -> TaskResult:
    n = len(outcomes)
    mean = sum(outcomes) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in outcomes) / (n - 1)) / math.sqrt(n)
    return TaskResult(task=name, protocol="letter", metric="acc", score=mean, stderr=se, metrics={}, n=n,
                      split={"name": "test", "test_fraction": 0.5}, seed=0, model=None, adapter=None, chance=0.25,
                      role="downstream", sample_type=1, seconds=0.0, outcomes=outcomes, ids_digest=name)


def test_metrics_on_a_hand_written_matrix():
    # 3 tasks, 4 questions each; rows: base, after stage 1, 2, 3
    o = {  # (stage, task) -> outcomes
        (0, 0): [0, 0, 1, 0], (0, 1): [0, 1, 0, 0], (0, 2): [0, 0, 0, 0],
        (1, 0): [1, 1, 1, 0], (1, 1): [1, 1, 0, 0], (1, 2): [0, 0, 1, 0],
        (2, 0): [1, 0, 1, 0], (2, 1): [1, 1, 1, 1], (2, 2): [0, 1, 1, 0],
        (3, 0): [1, 0, 0, 0], (3, 1): [1, 1, 1, 0], (3, 2): [1, 1, 1, 1],
    }
    R = [[result([float(x) for x in o[(i, j)]], f"t{j}") for j in range(3)] for i in range(4)]
    m = continual_metrics(R)
    # AP: last row 0.25, 0.75, 1.0
    assert m.average.value == pytest.approx((0.25 + 0.75 + 1.0) / 3)
    assert m.average.stderr == pytest.approx(math.sqrt(sum(R[3][j].stderr ** 2 for j in range(3))) / 3)
    # BWT: task 0: R[3][0] - R[1][0] = 0.25 - 0.75; task 1: R[3][1] - R[2][1] = 0.75 - 1.0
    assert m.backward_transfer.value == pytest.approx(((0.25 - 0.75) + (0.75 - 1.0)) / 2)
    # paired: per-question differences of task 0 (-0, -1, -1, 0) and task 1 (0, 0, 0, -1)
    se0 = math.sqrt(sum((d + 0.5) ** 2 for d in (0, -1, -1, 0)) / 3) / 2
    se1 = math.sqrt(sum((d + 0.25) ** 2 for d in (0, 0, 0, -1)) / 3) / 2
    assert m.backward_transfer.stderr == pytest.approx(math.sqrt(se0 ** 2 + se1 ** 2) / 2)
    # FWT: task 1: R[1][1] - R[0][1] = 0.5 - 0.25; task 2: R[2][2] - R[0][2] = 0.5 - 0
    assert m.forward_transfer.value == pytest.approx((0.25 + 0.5) / 2)
    general = [[result([1.0, 1.0, 0.0, 1.0], "g")], [result([1.0, 0.0, 0.0, 1.0], "g")],
               [result([1.0, 1.0, 0.0, 1.0], "g")], [result([0.0, 0.0, 0.0, 1.0], "g")]]
    m = continual_metrics(R, general)
    assert [e.value for e in m.general_retention] == pytest.approx([-0.25, 0.0, -0.5])
    with pytest.raises(ValueError, match="T \\+ 1 rows of T results"):
        continual_metrics(R[:2])


# ------------------------------------------------------------------------------------------ the stage loop


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> list[Path]:
    """Three multiple-choice task files of different question shapes."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    files = []
    for t, template in enumerate(["which {} is {}?", "is the {} {}?", "where does the {} go, {}?"]):
        rows = []
        for i in range(24):
            choices = rng.sample(WORDS, 3)
            rows.append({"question": template.format(choices[i % 3], WORDS[i % len(WORDS)]), "choices": choices,
                         "label": i % 3})
        path = root / f"task{t + 1}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)
    return files


def config(model_dir: Path, files: list[Path], out: Path, method: str, **kw) -> ContinualConfig:
    adapter = {"r": 4, "target_modules": ["q_proj", "v_proj"]} if method != "slim" else \
        {"r": 4, "num_lora_experts": 2, "num_identity_experts": 1, "top_k": 1}
    base = dict(tasks=[str(f) for f in files], method=method, model=str(model_dir), max_steps=4, eval_limit=6,
                general_tasks=(), batch_size=4, save_steps=2, output_dir=str(out), adapter=adapter,
                progress=lambda s: None)
    return ContinualConfig(**{**base, **kw, "adapter": {**adapter, **kw.get("adapter", {})}})


def test_replay_offers_only_earlier_tasks_rows(tmp_path, tiny_model_dir, task_files, monkeypatch):
    offered: list[tuple[int, list[int]]] = []
    eligible = ReplayBuffer.eligible

    def spy(self, before_task=None):
        picked = eligible(self, before_task)
        offered.append((before_task, [self.examples[i].task for i in picked]))
        return picked

    monkeypatch.setattr(ReplayBuffer, "eligible", spy)
    res = run_continual(config(tiny_model_dir, task_files, tmp_path / "run", "ilora"))
    assert res.config["adapter"]["replay_from"] == "previous_tasks"  # the paper's setting, by default
    by_stage = {b: tasks for b, tasks in offered}
    assert by_stage[0] == []  # stage 1: nothing to replay
    assert by_stage[1] and set(by_stage[1]) == {0}  # stage 2: only stage 1's rows
    assert by_stage[2] and set(by_stage[2]) <= {0, 1}
    assert all(t < b for b, tasks in offered for t in tasks)
    # the report: a 4 x 3 matrix, each entry the judged score, and the files
    assert len(res.matrix) == 4 and all(len(row) == 3 for row in res.matrix)
    stored = json.loads((tmp_path / "run" / "results.json").read_text())
    assert stored["matrix"] == res.matrix and stored["tasks"] == ["task1", "task2", "task3"]
    for name in ("summary.md", "accuracy_matrix.png", "task_curves.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    assert "| after 2: task2 |" in (tmp_path / "run" / "summary.md").read_text()


def test_slim_keeps_each_finished_tasks_clusters(tmp_path, tiny_model_dir, task_files):
    out = tmp_path / "run"
    res = run_continual(config(tiny_model_dir, task_files, out, "slim",
                               adapter={"clusters_across_tasks": "keep", "max_tasks": 4}))
    final = load_file(str(out / "stage3-task3" / END_STATE))
    stage1 = load_file(str(out / "stage1-task1" / END_STATE))
    stage2 = load_file(str(out / "stage2-task2" / END_STATE))
    counts = {k: int(v) for k, v in final.items() if k.endswith("kept.count")}
    assert counts and set(counts.values()) == {2}  # two boundaries in three tasks
    assert {int(v) for k, v in stage2.items() if k.endswith("kept.count")} == {1}
    for key in counts:
        site = key[: -len("kept.count")]
        torch.testing.assert_close(final[site + "kept.centres"][0], stage1[site + "clusters.centres"])
        torch.testing.assert_close(final[site + "kept.centres"][1], stage2[site + "clusters.centres"])
        assert not torch.equal(final[site + "clusters.centres"], stage2[site + "clusters.centres"])  # slid on
    assert res.config["adapter"]["clusters_across_tasks"] == "keep"


@pytest.mark.parametrize("method", ["ilora", "slim"])
def test_a_run_killed_in_stage_2_resumes_to_the_same_adapter(tmp_path, tiny_model_dir, task_files, monkeypatch,
                                                            method):
    extra = {"adapter": {"clusters_across_tasks": "keep"}} if method == "slim" else {}
    whole = run_continual(config(tiny_model_dir, task_files, tmp_path / "whole", method, **extra))
    step = Trainer._optimizer_step

    def killed(self, *args):
        if self.run_dir.name.startswith("stage2") and self.state.global_step == 3:
            raise KeyboardInterrupt("killed during stage 2")
        return step(self, *args)

    monkeypatch.setattr(Trainer, "_optimizer_step", killed)
    cfg = config(tiny_model_dir, task_files, tmp_path / "parts", method, **extra)
    with pytest.raises(KeyboardInterrupt):
        run_continual(cfg)
    assert (tmp_path / "parts" / "stage2-task2" / "checkpoint-2").is_dir()
    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    resumed = run_continual(config(tiny_model_dir, task_files, tmp_path / "parts", method, resume=True, **extra))
    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed.matrix == whole.matrix


def test_a_sequence_of_tasks_and_instruction_data(tmp_path, task_files):
    from slim_peft.experiments.continual import read_sequence

    rows = tmp_path / "chats.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"say {w} {i}", "completion": w}) + "\n"
                            for i, w in enumerate(WORDS * 3)))
    seq = read_sequence(ContinualConfig(tasks=[str(task_files[0]), "sciq_instruct", str(rows)]))
    assert [t.registered is not None for t in seq] == [True, False, False]
    assert [t.name for t in seq] == ["task1", "sciq_instruct", "chats"]
    assert seq[2].held_out and not {r.where for r in seq[2].held_out} & {r.where for r in seq[2].rows}
    assert seq[1].suite(5).protocol == "freeform" and seq[0].suite(5).protocol == "letter"


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(setup, "load_base_model", refuse)


@pytest.mark.parametrize("tasks,message", [
    ("boolq,no_such_task", "no_such_task"),
    ("boolq,social_iqa,boolq", "task 'boolq' appears twice in the sequence"),
    ("boolq", "a task sequence needs at least 2 tasks"),
])
def test_bad_sequences_are_refused_before_training(tmp_path, capsys, no_model, tasks, message):
    out = tmp_path / "out"
    code = main(["continual", "--tasks", tasks, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_resume_with_other_settings_is_refused(tmp_path, tiny_model_dir, task_files):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "continual_config.json").write_text(json.dumps({"max_steps": 99}))
    (out / "marker").write_text("x")
    with pytest.raises(ConfigError, match="started with other settings"):
        run_continual(config(tiny_model_dir, task_files, out, "lora", resume=True))


def test_cli_prints_the_matrix_and_the_metrics(tmp_path, tiny_model_dir, task_files, capsys):
    code = main(["continual", "--tasks", ",".join(str(f) for f in task_files[:2]), "--method", "er",
                 "--model", str(tiny_model_dir), "--max-steps", "2", "--limit", "4", "--general-tasks", "",
                 "--batch-size", "4", "--set", "r=4", "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| after stage | task1 | task2 |" in out and "| BWT (backward transfer) |" in out
    assert json.loads((tmp_path / "run" / "results.json").read_text())["config"]["adapter"]["method"] == "er"
