"""benchmarks/forgetting.py: its command line and what each mode runs (plan, report, resume, workers, step
timing) through slim_peft.experiments. No model is loaded: runs execute in this process with fake results."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import load_benchmark
from study_fakes import PLAN, fake_run, nums, store_base

from slim_peft.experiments import runner, sweep
from slim_peft.experiments.study import Run, run_status


@pytest.fixture(scope="module")
def fg():
    return load_benchmark("forgetting")


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    """Runs execute in this process (the script spawns a fresh process per run), so the fakes below apply."""
    monkeypatch.setattr(sweep, "run_isolated", lambda target, *args: target(*args))


@pytest.fixture
def executed(monkeypatch):
    """Runs "executed" (a fake result each); the base model must not be scored again (it is stored)."""
    done: list[Run] = []

    def execute(self, run):
        done.append(run)
        return fake_run(run, self.protocol)

    monkeypatch.setattr(runner.Study, "execute", execute)
    monkeypatch.setattr(runner.Study, "ensure_base", lambda self, *a, **kw: pytest.fail("the base is stored"))
    return done


def common(tmp_path) -> list[str]:
    return ["--runs-dir", str(tmp_path), "--report", str(tmp_path / "r.md"), "--no-report",
            "--work-dir", str(tmp_path / "work")]


def test_defaults_and_choices(fg):
    args = fg.parse_args([])
    assert (args.budget, args.workers, args.threads, args.allocator) == ("main", 1, 1, "system")
    assert args.runs_dir == fg.RUNS_DIR and args.report == fg.REPORT and fg.PLAN.script == "benchmarks/forgetting.py"
    args = fg.parse_args(["--budget", "sweeps", "--settings", "experts2", "--seeds", "1,2", "--measure-steps", "3",
                          "--allocator", "jemalloc", "--max-runs", "4", "--rerun-stale", "--keep-adapters"])
    assert (args.budget, args.settings, args.seeds, args.measure_steps, args.max_runs) == (
        "sweeps", "experts2", "1,2", 3, 4)
    assert args.rerun_stale and args.keep_adapters and args.allocator == "jemalloc"
    with pytest.raises(SystemExit):
        fg.parse_args(["--budget", "nope"])


@pytest.mark.parametrize("argv, message", [(["--methods", "lorra"], "unknown method(s) ['lorra']"),
                                           (["--budget", "sweeps", "--settings", "yield0.5"], "not in budget")])
def test_bad_selections_exit_with_the_reason(fg, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        fg.main([*argv, "--plan", "--runs-dir", str(tmp_path)])
    assert message in str(exc.value.code)


def test_plan_only_runs_nothing(fg, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner.Study, "execute", lambda self, run: pytest.fail("--plan must not train"))
    proto = PLAN.protocols["study"]
    done = Run("slim", "mds", 2)
    store_base(tmp_path, proto)
    (tmp_path / "study" / f"{done.run_id}.json").write_text(json.dumps(fake_run(done, proto)))
    assert fg.main(["--plan", "--budget", "main", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert nums(out[0])[-3:] == [24, 1, 0]  # runs, done, stale
    status = {line.split()[0]: line.split()[1] for line in out[1:25]}
    assert len(status) == 24 and status[done.run_id] == "done" and status["mds__lora__seed0"] == "pending"
    assert not (tmp_path / "work").exists()


def test_resume_skips_stored_runs_and_keeps_stale_ones(fg, tmp_path, executed):
    proto = PLAN.protocols["pilot"]
    done, other = PLAN.runs("pilot")
    (tmp_path / "pilot").mkdir()
    done.path(tmp_path, proto).write_text(json.dumps(fake_run(done, proto)))
    stale = fake_run(other, proto)
    stale["protocol_digest"] = "something-else"
    other.path(tmp_path, proto).write_text(json.dumps(stale))
    store_base(tmp_path, proto)
    assert fg.main(["--budget", "pilot", *common(tmp_path)]) == 0
    assert executed == []  # one done, one stale (kept without --rerun-stale)
    assert fg.main(["--budget", "pilot", "--rerun-stale", *common(tmp_path)]) == 0
    assert executed == [other] and run_status(PLAN, other, tmp_path, proto) == "done"


def test_pending_runs_are_executed_and_stored_under_their_protocol(fg, tmp_path, executed):
    proto = PLAN.make_protocol("pilot", max_steps=2)
    store_base(tmp_path, proto)
    assert fg.main(["--budget", "pilot", "--max-steps", "2", "--max-runs", "1", *common(tmp_path)]) == 0
    stored = sorted((tmp_path / proto.name).glob("*__seed*.json"))
    assert [p.name for p in stored] == ["mds__lora__seed0.json"] and proto.name.startswith("custom-")
    data = json.loads(stored[0].read_text())
    assert data["protocol"]["max_steps"] == 2 and data["learning_rate"] == PLAN.methods["lora"].lr


def test_a_main_run_that_is_also_a_curve_run_is_trained_once_and_stored_twice(fg, tmp_path, executed):
    store_base(tmp_path, PLAN.protocols["study"])
    assert fg.main(["--budget", "main", "--methods", "lora,dora", "--seeds", "0", *common(tmp_path)]) == 0
    stored = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "study").glob("*__seed*.json")}
    assert set(stored) == {"mds__lora__seed0", "curve__lora__seed0", "mds__dora__seed0"}
    assert stored["curve__lora__seed0"]["twin_of"] == "mds__lora__seed0"
    assert stored["curve__lora__seed0"]["downstream_mean"] == stored["mds__lora__seed0"]["downstream_mean"]
    executed.clear()
    assert fg.main(["--budget", "curves", *common(tmp_path)]) == 0
    assert executed == [Run("mixlora", "curve", 0), Run("slim", "curve", 0)]  # lora's is stored
    assert json.loads((tmp_path / "study" / "mds__slim__seed0.json").read_text())["twin_of"] == "curve__slim__seed0"


def test_a_failed_run_is_not_stored_and_fails_the_command(fg, tmp_path, monkeypatch):
    def killed(self, run):
        raise RuntimeError("execute exited with code -9 (killed: out of memory?)")

    monkeypatch.setattr(runner.Study, "execute", killed)
    store_base(tmp_path, PLAN.protocols["pilot"])
    assert fg.main(["--budget", "pilot", *common(tmp_path)]) == 1
    assert not list((tmp_path / "pilot").glob("*__seed*.json"))


def test_the_base_model_is_scored_first_when_missing(fg, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner.Study, "ensure_base", lambda self, wait=True: calls.append(("base", wait)))
    monkeypatch.setattr(runner.Study, "execute",
                        lambda self, run: calls.append(run.run_id) or fake_run(run, self.protocol))
    assert fg.main(["--budget", "pilot", "--methods", "slim", *common(tmp_path)]) == 0
    assert calls == [("base", False), "mds__slim__seed0"]  # runs do not wait for it; only the report needs it


def test_measure_steps_stores_one_timing_per_method_and_setting(fg, tmp_path, monkeypatch):
    timed = []

    def measure(self, run, steps):
        timed.append((run, steps))
        return {"kind": "steps", "cpu_seconds_per_step": 1.0, "wall_seconds_per_step": 1.0, "peak_rss_gb": 1.0,
                "environment": {"allocator": "jemalloc" if run.setting == "mask0.1" else "system"}}

    monkeypatch.setattr(runner.Study, "measure_steps", measure)
    argv = ["--budget", "sweeps", "--settings", "mask0.1,experts2", "--seeds", "1,2", "--measure-steps", "3"]
    assert fg.main([*argv, *common(tmp_path)]) == 0
    assert timed == [(Run("slim", "mask0.1", 0), 3), (Run("slim", "experts2", 0), 3)]  # seeds do not matter
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["steps__experts2__slim.json",
                                                                       "steps__mask0.1__slim__jemalloc.json"]


def test_workers_are_copies_of_the_command_with_one_worker_each(fg, tmp_path, monkeypatch):
    spawned = {}

    def spawn(command, workers, log_dir, others_extra=(), **kw):
        spawned.update(command=command, workers=workers, log_dir=log_dir, extra=list(others_extra))
        return 0

    monkeypatch.setattr(sweep, "spawn_workers", spawn)
    argv = ["--budget", "pilot", "--workers", "2", *common(tmp_path)]
    assert fg.main(argv) == 0
    cmd = spawned["command"]
    assert cmd[0] == sys.executable and cmd[1].endswith("benchmarks/forgetting.py")
    assert cmd[2:] == ["--budget", "pilot", *common(tmp_path), "--workers", "1"]
    assert spawned["workers"] == 2 and spawned["log_dir"] == tmp_path / "work" / "logs"
    assert spawned["extra"] == ["--no-report"]  # only the first worker writes the report as it goes


def test_report_only_updates_the_readme_for_the_repositorys_own_report_only(fg, tmp_path, monkeypatch):
    start, end = "<!-- forgetting-headline:start -->", "<!-- forgetting-headline:end -->"
    readme = tmp_path / "README.md"
    readme.write_text(f"{start}\nold\n{end}\n")
    runs_dir = tmp_path / "runs"
    store_base(runs_dir, PLAN.protocols["study"])
    monkeypatch.setattr(fg, "README", readme)
    assert fg.main(["--report-only", "--runs-dir", str(runs_dir), "--report", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").is_file() and readme.read_text() == f"{start}\nold\n{end}\n"  # another report
    monkeypatch.setattr(fg, "RUNS_DIR", runs_dir)
    monkeypatch.setattr(fg, "REPORT", tmp_path / "results" / "forgetting.md")
    assert fg.main(["--report-only"]) == 0
    assert "old" not in readme.read_text() and "| base model |" in readme.read_text()


def test_the_command_line_is_recorded_quoted(fg):
    assert fg.command_line(["--budget", "main", "--methods", "a b"]) == \
        "python benchmarks/forgetting.py --budget main --methods 'a b'"


def test_the_study_runs_with_the_system_malloc_unless_asked(fg):
    """jemalloc is opt-in: with its decay off the exact-merge run outgrew the machine's memory."""
    assert fg._allocator_choice([]) == "system"
    assert fg._allocator_choice(["--budget", "main"]) == "system"
    assert fg._allocator_choice(["--allocator", "jemalloc"]) == "jemalloc"
    assert fg._allocator_choice(["--allocator=auto", "--budget", "main"]) == "auto"
