"""slim_peft.experiments.sizing: the stderr the test sizes give, the costs measured by stored runs and step
timings, and the projected hours of the budgets. No model is loaded."""

from __future__ import annotations

import math
import re

import pytest
from study_fakes import PLAN, TASKS, env, fake_run, md_table, nums

from slim_peft.experiments.sizing import (
    measured_costs,
    projection,
    sizing_section,
    stderr_markdown,
    stderr_table,
)
from slim_peft.experiments.study import MMLU_SUBJECTS, Run

STUDY = PLAN.protocols["study"]
ALL_TASKS = [*TASKS.downstream, *TASKS.general, TASKS.math]
CURRENT = env(threads=1, adapter_dropout="LoraDropout")


def hours(text: str) -> list[float]:
    """The core-hours figures of a projection, main budget first."""
    return [float(x) for x in re.findall(r"= ([\d.]+) core-hours", text)]


def test_study_test_sizes_meet_the_stderr_target():
    st = stderr_table(PLAN, STUDY)
    assert st["ok"] and st["se_mean"] <= PLAN.stderr_target == 0.015
    assert st["se_mean_worst"] <= PLAN.stderr_target  # even if every task sat at p = 0.5
    rows = {r["task"]: r for r in st["rows"]}
    assert rows["mmlu"]["n"] == 3 * MMLU_SUBJECTS and rows["piqa"]["p"] == PLAN.prior_acc["piqa"]
    assert rows["piqa"]["se"] == pytest.approx(math.sqrt(0.634 * 0.366 / 199))
    table = md_table(stderr_markdown(st), "task")
    assert nums(table["piqa"][0]) == [200] and nums(table["piqa"][2]) == [pytest.approx(100 * rows["piqa"]["se"],
                                                                                          abs=0.005)]
    base = {"general": {t: {"score": 0.5, "n": 100} for t in TASKS.general}}
    with_base = stderr_table(PLAN, STUDY, base)
    assert with_base["se_mean"] == pytest.approx(math.sqrt(7 * 0.25 / 99) / 7)
    assert {r["source"] for r in with_base["rows"]} == {"base"}


def _costs(step: float) -> dict:
    return {"step": {m: step for m in PLAN.main_methods}, "question": {t: 0.01 for t in ALL_TASKS}}


def test_projection_adds_up_the_measured_costs():
    text = "\n".join(projection(PLAN, _costs(1.0), STUDY))
    sizes = {t: min(STUDY.downstream_limit, TASKS.test_sizes[t]) for t in TASKS.downstream}
    general_n = sum(STUDY.general_limit(t) * (MMLU_SUBJECTS if t == "mmlu" else 1) for t, _ in STUDY.general_sizes)
    eval_s = 0.01 * (sum(sizes.values()) + general_n + STUDY.math_limit)
    curve_s = (STUDY.curve_points - 1) * 0.01 * (general_n + STUDY.math_limit)
    main_h = (eval_s + 3 * curve_s + 24 * (STUDY.max_steps + eval_s + 10)) / 3600  # 3 main runs score curves
    rest = {r for b in ("ablations", "sweeps", "diagnostics") for r in PLAN.runs(b) if r.setting != "mds"}
    rest_h = len(rest) * (STUDY.max_steps + eval_s + 10) / 3600  # the curve runs: trained by the main budget
    assert hours(text) == [pytest.approx(main_h, abs=0.005), pytest.approx(rest_h, abs=0.005)]
    assert f"**{main_h / 2:.2f} h with 2 workers" in text and f"**{rest_h / 2:.2f} h**" in text
    assert text.count(": met") == 2
    assert "not met" in "\n".join(projection(PLAN, _costs(1000.0), STUDY))
    assert projection(PLAN, {"step": {}, "question": {}}, STUDY) == ["(no 1-thread measurement stored yet)"]
    missing = {"step": {"lora": 1.0}, "question": {"piqa": 0.1}}
    assert "boolq" in projection(PLAN, missing, STUDY)[0]


def _run(method, setting, cpu_per_step, current, tokens_per_step=2000):
    r = fake_run(Run(method, setting, 0), STUDY)
    r["environment"] = CURRENT if current else env(threads=1)
    r["train"].update(cpu_seconds=cpu_per_step * STUDY.max_steps, tokens_seen=tokens_per_step * STUDY.max_steps)
    return r


def test_measured_costs_prefer_current_code_and_scale_step_timings_to_the_runs_tokens():
    runs = [_run("slim", "mds", 30.0, False), _run("slim", "mds", 20.0, True), _run("slim", "exact_merge", 80.0, True),
            _run("lora", "mds", 15.0, False)]
    resumed = _run("slim", "mask0.1", 2.0, True)  # timed 1/25 of its steps and did not say so: not a cost
    resumed["train"]["resumed"] = True
    runs.append(resumed)
    steps = {"mixlora_dy": {"kind": "steps", "method": "mixlora_dy", "cpu_seconds_per_step": 40.0,
                            "tokens_per_step": 1000, "environment": CURRENT}}
    costs = measured_costs({"runs": {str(i): r for i, r in enumerate(runs)}, "steps": steps, "base": None})
    # slim: only its current-code runs (20, 80), not the older 30; lora: its older run, as it has nothing newer
    assert costs["step"]["slim"] == 50.0 and costs["step"]["lora"] == 15.0
    assert costs["current"] == {"slim", "mixlora_dy"}
    assert costs["step"]["mixlora_dy"] == 80.0  # 40 s/step over 1000 tokens; the runs average 2000 per step
    assert costs["run_step"][("study", "exact_merge__slim__seed0")] == 80.0
    assert ("study", "mds__lora__seed0") not in costs["run_step"]  # older code: the method median is used
    timed = _run("slim", "exact_merge", 0.0, True)  # resumed at step 48: its CPU time covers 2 steps
    timed["train"].update(resumed=True, steps_timed=2, cpu_seconds=160.0)
    runs.append(timed)
    assert measured_costs({"runs": {str(i): r for i, r in enumerate(runs)}, "steps": {}})["step"]["slim"] == 80.0
    twin = {**_run("lora", "curve", 1e6, True), "twin_of": "mds__lora__seed0"}  # the same training again
    assert measured_costs({"runs": {"a": runs[3], "b": twin}, "steps": {}})["step"] == {"lora": 15.0}


def test_costs_per_allocator_prefer_its_own_measurements():
    def timing(method, setting, cpu, allocator=None):
        return {"kind": "steps", "method": method, "setting": setting, "cpu_seconds_per_step": cpu,
                "protocol": STUDY.to_dict(), "tokens_per_step": None,
                "environment": {**CURRENT, **({"allocator": allocator} if allocator else {})}}

    steps = {"slim": timing("slim", "mds", 20.0), "lora": timing("lora", "mds", 16.0),
             "j/slim": timing("slim", "mds", 16.0, "jemalloc"),
             "j/exact": timing("slim", "exact_merge", 60.0, "jemalloc"),
             "t/lora": timing("lora", "mds", 1.0, "tcmalloc")}  # another allocator: in neither projection
    data = {"runs": {}, "steps": steps, "base": None}
    system, fast = measured_costs(data), measured_costs(data, "jemalloc")
    assert system["step"] == {"slim": 20.0, "lora": 16.0} and system["run_step"] == {}
    assert fast["step"] == {"slim": 16.0, "lora": 16.0}  # lora: no jemalloc timing, glibc's is used
    assert fast["own_allocator"]["step"] == {"slim"}
    assert fast["run_step"] == {("study", "exact_merge__slim__seed0"): 60.0}  # a setting prices its own runs

    base = {"kind": "base", "environment": CURRENT, **{part: {t: {"cpu_seconds": 2.0, "n": 10} for t in tasks}
                                                      for part, tasks in TASKS.parts.items()}}
    fast_base = {"kind": "base", "environment": {**CURRENT, "allocator": "jemalloc"},  # the general suite only
                 "general": {t: {"cpu_seconds": 1.0, "n": 10} for t in TASKS.general}}
    data["bases"] = [base, fast_base]
    text = "\n".join(sizing_section(PLAN, data))
    step_table = md_table(text, "method")
    assert step_table["slim"] == ["20.00", "16.00", "1.25x"] and step_table["lora"] == ["16.00", "-", "-"]
    question_table = md_table(text, "task")
    assert question_table["arc_easy"] == ["0.200", "0.100", "2.00x"] and question_table["boolq"] == ["0.200", "-", "-"]
    assert len(hours(text)) == 4  # main and the rest, with each allocator
    assert sizing_section(PLAN, {"runs": {}, "steps": {}}) == []
