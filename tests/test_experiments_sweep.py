"""slim_peft.experiments.sweep: lock files shared by workers, resume (stored jobs skipped), the failure rule,
process isolation and worker spawning. Jobs here are plain strings; nothing is trained."""

from __future__ import annotations

import os
import sys

import pytest

from slim_peft.experiments.sweep import (
    RunLock,
    Sweep,
    run_isolated,
    run_sweep,
    spawn_workers,
    without_option,
)


def test_run_lock_excludes_live_owners_and_takes_over_dead_ones(tmp_path):
    path = tmp_path / "locks" / "mds__slim__seed0.lock"
    first, second = RunLock(path), RunLock(path)
    assert first.acquire()
    assert not second.acquire()  # held by this (live) process
    first.release()
    assert not path.exists()
    path.write_text("999999999")  # a pid that does not exist: a dead worker's lock
    assert second.acquire() and path.read_text() == str(os.getpid())
    second.release()
    second.release()  # releasing twice is harmless
    assert not path.exists()


class Jobs:
    """A sweep over string jobs: `stored` holds what is stored; `fail` the jobs whose execution fails."""

    def __init__(self, tmp_path, stored=(), fail=()):
        self.stored, self.fail, self.executed, self.logged = dict.fromkeys(stored, {}), set(fail), [], []
        self.sweep = Sweep(name=str, is_done=lambda j: j in self.stored, execute=self.execute,
                           store=self.stored.__setitem__, lock_dir=tmp_path / "locks", log=self.logged.append)

    def execute(self, job):
        self.executed.append(job)
        if job in self.fail:
            raise RuntimeError("killed")
        return {"job": job}


def test_stored_jobs_are_skipped_and_new_ones_stored(tmp_path):
    jobs = Jobs(tmp_path, stored=["a"])
    seen = []
    tally = run_sweep(jobs.sweep, ["a", "b", "c"], after_each=lambda j, r, s: seen.append((j, r["job"], s >= 0)))
    assert jobs.executed == ["b", "c"] and tally.done == ["b", "c"] and tally.failures == 0
    assert jobs.stored["c"] == {"job": "c"} and seen == [("b", "b", True), ("c", "c", True)]
    assert not list((tmp_path / "locks").iterdir())  # every lock released
    assert run_sweep(jobs.sweep, ["a", "b", "c"]).done == []  # a rerun has nothing left


def test_a_job_locked_by_a_live_worker_is_left_to_it(tmp_path):
    jobs = Jobs(tmp_path)
    other = RunLock(tmp_path / "locks" / "b.lock")
    assert other.acquire()  # this process holds it, as a live worker would
    tally = run_sweep(jobs.sweep, ["a", "b"])
    assert jobs.executed == ["a"] and tally.done == ["a"]
    assert jobs.logged == ["b: another worker is running it; next"]
    other.release()


def test_max_runs_counts_stored_jobs_only(tmp_path):
    jobs = Jobs(tmp_path, fail=["a"])
    tally = run_sweep(jobs.sweep, ["a", "b", "c", "d"], max_runs=2)
    assert jobs.executed == ["a", "b", "c"] and tally.done == ["b", "c"] and tally.failures == 1


def test_two_failures_in_a_row_stop_the_worker(tmp_path):
    jobs = Jobs(tmp_path, fail=["a", "c", "d"])
    tally = run_sweep(jobs.sweep, ["a", "b", "c", "d", "e"])
    assert jobs.executed == ["a", "b", "c", "d"] and tally.done == ["b"] and tally.failures == 3  # not "e"
    assert sum("FAILED: killed" in m for m in jobs.logged) == 3 and "in a row" in jobs.logged[-1]
    assert "a" not in jobs.stored


def test_without_option_drops_the_option_and_its_value():
    argv = ["--budget", "main", "--workers", "2", "--seeds", "1", "--workers=3", "--workersx"]
    assert without_option(argv, "--workers") == ["--budget", "main", "--seeds", "1", "--workersx"]


def test_run_isolated_returns_the_childs_result_and_raises_when_it_dies():
    result = run_isolated(dict, [("answer", 42)])
    assert result["answer"] == 42 and result["peak_rss_gb"] > 0  # a dict result gets the child's peak memory
    with pytest.raises(RuntimeError, match="_exit exited with code 3"):
        run_isolated(os._exit, 3)


def test_spawn_workers_runs_copies_with_their_own_logs_and_returns_the_worst_code(tmp_path):
    command = [sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(len(sys.argv) - 1)"]
    logged = []
    code = spawn_workers(command, 2, tmp_path / "logs", others_extra=["--no-report"], stagger_s=0,
                         log=logged.append)
    assert code == 1  # worker 1 got one extra argument
    assert (tmp_path / "logs" / "worker0.log").read_text() == "[]\n"
    assert (tmp_path / "logs" / "worker1.log").read_text() == "['--no-report']\n"
    assert [m.split(":")[0] for m in logged] == ["worker 0", "worker 1"]
