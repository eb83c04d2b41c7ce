"""slim_peft.experiments.study_report, study_discussion and study_plots: the report and the README headline
from stored JSONs. Checked by the numbers in the tables and lines (fake runs: downstream 0.3 + shift, general
0.5 - shift, arithmetic 0.1, every task at stderr 0.05). No model is loaded."""

from __future__ import annotations

import re

import pytest
from study_fakes import PLAN, env, fake_base, fake_run, md_table, nums, runs_of, section, store_base

from slim_peft.experiments import study_discussion as sd
from slim_peft.experiments import study_report as sr
from slim_peft.experiments.store import write_json
from slim_peft.experiments.study import Run

BASE = {"kind": "base", **fake_base()}


@pytest.fixture
def pilot_report(tmp_path):
    """A report of a pilot: base, LoRA and SLIM with two seeds each, a step timing and a curve run."""
    proto = PLAN.protocols["pilot"]
    store_base(tmp_path, proto)
    for i, run in enumerate(PLAN.runs("pilot", seeds=[0, 1])):  # shifts: LoRA 0, 0.1; SLIM 0.05, 0.15
        write_json(run.path(tmp_path, proto), fake_run(run, proto, shift=0.05 * i))
    write_json(tmp_path / "pilot" / "steps__mixlora.json",
               {"kind": "steps", "method": "mixlora", "steps": 3, "cpu_seconds_per_step": 20.0,
                "environment": env(threads=1)})
    curve = Run("slim", "curve", 0)
    write_json(curve.path(tmp_path, proto), fake_run(curve, proto))
    report = tmp_path / "out" / "forgetting.md"
    sr.write_report(PLAN, tmp_path, report, quiet=True)
    return report


def test_report_tables_hold_the_stored_scores(pilot_report):
    text = pilot_report.read_text()
    down = md_table(section(text, "Downstream accuracy"), "method")
    assert down["base model"] == ["-", "30.0", "30.0", "30.0", "30.0"]
    assert down["LoRA"] == ["2"] + ["35.0 ± 7.1"] * 4 and down["SLIM"] == ["2"] + ["40.0 ± 7.1"] * 4
    general = md_table(section(text, "General capability"), "method")
    assert general["base model"][-3:] == ["50.0", "100.0", "10.0"]
    assert general["LoRA"][-3:] == ["45.0 ± 7.1", "90.0 ± 14.1", "10.0 ± 0.0"]  # mean, retention %, arithmetic
    methods = md_table(section(text, "Methods and learning rates"), "key")
    assert nums(methods["`lora`"][1]) == [PLAN.methods["lora"].lr] and len(methods) == len(PLAN.methods)
    sizing = md_table(section(text, "Sizing"), "method")
    assert sizing["mixlora"][0] == "20.00"  # a measured step cost enters the sizing section
    pending = md_table(section(text, "Planned runs of protocol `pilot`"), "budget")
    assert pending["pilot"] == ["2", "0", "0"]
    others = md_table(section(text, "Ablations, sweeps"), "method")
    assert others["SLIM"][:2] == ["general score over steps", "1"]
    assert "python benchmarks/forgetting.py --budget pilot" in section(text, "Commands that produced")
    for png in ("forgetting_pilot_scatter.png", "forgetting_pilot_curves.png"):
        assert (pilot_report.parent / png).stat().st_size > 1000


def test_status_counts_the_stored_runs_of_each_budget(tmp_path):
    proto = PLAN.protocols["study"]
    for run in PLAN.runs("ablations")[:2]:
        write_json(run.path(tmp_path, proto), fake_run(run, proto))
    lines = sr.status_section(PLAN, {}, tmp_path)
    counts = {line.split("`")[1]: nums(line)[:2] for line in lines if line.startswith("- `")}
    assert counts == {"main": [1, 24], "ablations": [2, 5], "sweeps": [0, 7], "curves": [0, 3], "diagnostics": [0, 8]}


def test_readme_headline_is_written_between_its_markers(tmp_path):
    proto = PLAN.protocols["study"]
    runs_dir = tmp_path / "runs"
    base = store_base(runs_dir, proto)
    runs = runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.1), protocol=proto)
    for r in runs.values():
        write_json(runs_dir / "study" / f"{r['run_id']}.json", r)
    start, end = sr.markers(PLAN)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{start}\nold table\n{end}\n## next\n")
    sr.write_report(PLAN, runs_dir, tmp_path / "results" / "forgetting.md", readme=readme, quiet=True)
    text = readme.read_text()
    assert text.startswith(f"# title\n{start}\n") and text.endswith(f"\n{end}\n## next\n") and "old" not in text
    block = text.split(start)[1].split(end)[0]
    assert md_table(block, "method")["LoRA"] == ["1", "40.0", "40.0", "40.0", "40.0"]
    assert "(results/forgetting_study_scatter.png)" in block  # the plot, relative to the README
    main_claim = sd.checked_claims(PLAN, runs, base)[0]
    assert main_claim.shown in block and main_claim.verdict_text in block
    readme.write_text("# no markers\n")
    assert not sr.update_readme(["x"], readme, (start, end)) and readme.read_text() == "# no markers\n"


def test_claims_section_tables_are_paired_differences():
    runs = runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.1))
    text = "\n".join(sd.claims_section(PLAN, runs, BASE))
    vs_base = md_table(text, "vs base model")
    assert nums(" ".join(vs_base["LoRA"])) == [1, 10.0, 4.1, -10.0, 2.7, 0.0, 7.1]  # no run stored outcomes
    slim_minus = md_table(text, "SLIM minus")
    assert nums(" ".join(slim_minus["LoRA"])) == [1, 1, -10.0, 4.1, 10.0, 2.7, 0.0, 7.1]
    verdicts = md_table(text, "claim (paper)")
    assert len(verdicts) == len(sd.checked_claims(PLAN, runs, BASE))


def effect_runs() -> dict:
    runs = runs_of(("slim", "mds", 0.0), ("lora", "mds", 0.1), ("slim", "no_yield", 0.1), ("slim", "mask0.3", 0.0),
                   ("slim", "mask0.7", 0.0))
    runs["mask0.7__slim__seed0"]["math_score"] = 0.6  # only arithmetic moves
    return runs


def test_effects_section_numbers():
    runs = effect_runs()
    table = md_table("\n".join(sd.effects_section(PLAN, runs, BASE)), "setting")
    assert table["w/o weight yielding (`no_yield`)"] == ["ablation", "1", "+10.0 ± 4.1*", "-10.0 ± 2.7*",
                                                          "+0.0 ± 7.1", "0.300"]
    assert nums(" ".join(table["mask ratio 0.7 (`mask0.7`)"][1:])) == [1, 0.0, 4.1, 0.0, 2.7, 50.0, 7.1, 0.3]
    seed1 = fake_run(Run("slim", "mds", 1), PLAN.protocols["pilot"], shift=0.1)  # main SLIM: downstream 35.0
    lines = sd.effects_section(PLAN, {**runs, "mds__slim__seed1": seed1}, BASE)
    offsets = next(line for line in lines if "seed 0:" in line)
    assert nums(offsets.split("seed 0:")[1])[:3] == [-5.0, 5.0, 0.0]  # seed 0 minus the 2-seed mean
    assert not any("seed 0:" in line for line in sd.effects_section(PLAN, runs, BASE))  # one seed: no offset
    only_main = {k: v for k, v in runs.items() if v["setting"] == "mds"}
    assert not any(line.startswith("| setting") for line in sd.effects_section(PLAN, only_main, BASE))


def test_discussion_lines_are_computed_from_the_runs():
    lines = sd.discussion_section(PLAN, effect_runs(), BASE)
    size = next(line for line in lines if line.startswith("- Size"))
    assert nums(size)[:2] == [10.0, 0.0]  # largest general loss (LoRA), largest arithmetic loss
    assert 20 in nums(size) and 16 in nums(size)  # the pilot's steps and batch
    matched = next(line for line in lines if line.startswith("- At matched downstream"))
    # SLIM settings at or above LoRA's 40.0 downstream: only w/o weight yielding (1 seed, 40.0, general +0.0)
    assert nums(matched)[:4] == [40.0, 1, 40.0, 0.0] and "mask" not in matched
    moved = next(line for line in lines if line.startswith("- What moves SLIM"))
    moving, still = moved.split(": ", 1)[1].split(". ", 1)
    assert [nums(g) for g in re.findall(r"\(([^()]*)\)", moving)] == [[10.0, 4.1, -10.0, 2.7], [50.0, 7.1]]
    assert "0.3" in still and "0.3" not in moving  # mask ratio 0.3 is within noise on every part
    groups = sd.claims_by_verdict(sd.checked_claims(PLAN, effect_runs(), BASE))
    for verdict, names in groups.items():
        heading = next(line for line in lines if line.startswith(f"- {sd.HEADINGS[verdict]}: "))
        assert heading.split(": ", 1)[1] == "; ".join(names) + "."


def test_timing_table_prices_resumed_runs_by_the_steps_they_timed():
    proto = PLAN.protocols["study"]
    runs = {}
    for key, train in (("a", {"resumed": True}), ("b", {"resumed": True, "steps_timed": 2, "cpu_seconds": 160.0}),
                       ("c", {"cpu_seconds": 100.0})):
        r = fake_run(Run("slim", {"a": "mask0.1", "b": "exact_merge", "c": "mds"}[key], 0), proto)
        r["seconds"], r["environment"] = 30.0, env(threads=1)
        r["train"].update(train)
        runs[r["run_id"]] = r
    runs["curve__slim__seed0"] = {**runs["mds__slim__seed0"], "twin_of": "mds__slim__seed0"}
    table = md_table("\n".join(sr.timing_table(PLAN, runs)), "run")
    assert list(table) == ["exact_merge__slim__seed0", "mask0.1__slim__seed0", "mds__slim__seed0"]  # no twin
    assert table["mask0.1__slim__seed0"][1:4] == ["5 (resumed)", "-", "-"]  # steps timed unknown: no figure
    assert nums(" ".join(table["exact_merge__slim__seed0"][1:4])) == [5, 2, 0.6, 80.0]
    assert nums(" ".join(table["mds__slim__seed0"][1:4])) == [5, 0.6, 100.0 / proto.max_steps]


def test_env_line_counts_versions_and_dropouts():
    runs = {"a": {"environment": env(transformers="5.24.0", adapter_dropout="LoraDropout")},
            "b": {"environment": env()}, "c": {"environment": env()}}
    line = sr.env_line(runs, None)
    assert re.search(r"transformers 5\.24\.0 \((\d+) older", line).group(1) == "2"
    assert nums(line.split("adapter dropout:")[1])[:2] == [2, 1]  # 2 runs with nn.Dropout, 1 with LoraDropout
    assert "transformers" not in sr.env_line({"b": runs["b"]}, None)
    assert "dropout" not in sr.env_line({"b": runs["b"]}, None)
