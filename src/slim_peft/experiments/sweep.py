"""Executing a sweep of runs: locked, resumable, each run in a fresh process, shared by several workers.

Generic over what a run is: a sweep knows only how to name a job, whether it is already stored, how to execute
and how to store it. Why each piece:

- `RunLock`: several worker processes share one list of jobs; a lock file holding the owner's pid lets a job be
  left to a live worker and taken over from a dead one.
- `run_isolated`: a run's memory goes back to the system when its process ends (a training run's peak is far
  above its result), and a run killed by the kernel (out of memory) becomes an exception, not a dead worker.
- `run_sweep`: jobs already stored are skipped (checked again under the lock, another worker may have just
  finished one), so the same command continues a sweep; two failures in a row stop the worker, since the cause
  is then rarely the job.
- `spawn_workers`: N copies of a command, each with its own log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

J = TypeVar("J")


class RunLock:
    """An exclusive lock file (``O_EXCL``) holding the owner's pid, so that several worker processes can share
    one budget: a run locked by a live process is left to it; a lock left by a dead process is taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    return False
                self.path.unlink(missing_ok=True)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGTERM this process when its parent dies. Without it, killing the study (or a
    worker) leaves the spawned run training on its own while a restarted study takes the run's lock over and
    trains it a second time."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):  # not Linux: nothing to do
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child(target: Callable[..., Any], args: tuple, out: str, parent: int) -> None:
    import resource

    _die_with_parent(parent)
    result = target(*args)
    if isinstance(result, dict):
        result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    Path(out).write_text(json.dumps(result, default=str))


def run_isolated(target: Callable[..., Any], *args: Any) -> Any:
    """``target(*args)`` in a fresh (spawned) process, its JSON-able result returned (a dict result gets the
    process's `peak_rss_gb`). `target` must pickle: a module-level function or a bound method of a picklable
    object. Raises RuntimeError when the process fails or is killed."""
    import multiprocessing as mp
    import tempfile

    name = getattr(target, "__name__", repr(target))
    fd, out = tempfile.mkstemp(prefix=f"{name}-", suffix=".json")
    os.close(fd)
    try:
        proc = mp.get_context("spawn").Process(target=_child, args=(target, args, out, os.getpid()))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            why = " (killed: out of memory?)" if proc.exitcode == -9 else ""
            raise RuntimeError(f"{name} exited with code {proc.exitcode}{why}")
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


@dataclass
class Sweep(Generic[J]):
    """What a worker needs to work through a list of jobs: their names, whether one is stored, how to execute
    one (typically through `run_isolated`) and how to store its result."""

    name: Callable[[J], str]
    is_done: Callable[[J], bool]
    execute: Callable[[J], dict]
    store: Callable[[J, dict], None]
    lock_dir: Path
    log: Callable[[str], None] = print


STOP_AFTER_FAILURES = 2  # failures in a row after which a worker stops


@dataclass
class SweepTally:
    """What one worker did: jobs executed and stored, and failures."""

    done: list[Any] = field(default_factory=list)
    failures: int = 0


def run_sweep(sweep: Sweep[J], todo: Iterable[J], max_runs: int | None = None,
              after_each: Callable[[J, dict, float], None] | None = None) -> SweepTally:
    """Execute and store each job of `todo` not stored yet and not locked by another live worker, at most
    `max_runs` of them; `after_each(job, result, seconds)` follows each stored one. Stops after
    `STOP_AFTER_FAILURES` failures in a row (rerunning continues: stored jobs are skipped)."""
    tally, streak = SweepTally(), 0
    for job in todo:
        if max_runs is not None and len(tally.done) >= max_runs:
            break
        lock = RunLock(sweep.lock_dir / f"{sweep.name(job)}.lock")
        if not lock.acquire():
            sweep.log(f"{sweep.name(job)}: another worker is running it; next")
            continue
        try:
            if sweep.is_done(job):  # another worker finished it meanwhile
                continue
            t0 = time.perf_counter()
            try:
                result = sweep.execute(job)
            except RuntimeError as e:
                tally.failures += 1
                streak += 1
                sweep.log(f"{sweep.name(job)}: FAILED: {e}")
                if streak >= STOP_AFTER_FAILURES:
                    sweep.log("two runs failed in a row; stopping this worker (rerun the same command to continue: "
                              "stored runs are skipped, started ones resume from their checkpoints)")
                    break
                continue
            streak = 0
            sweep.store(job, result)
        finally:
            lock.release()
        tally.done.append(job)
        if after_each is not None:
            after_each(job, result, time.perf_counter() - t0)
    return tally


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` without `option` and its value (either `--opt VALUE` or `--opt=VALUE`)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == option:
            skip = True
            continue
        if a.startswith(option + "="):
            continue
        out.append(a)
    return out


def spawn_workers(command: Sequence[str], workers: int, log_dir: Path, others_extra: Sequence[str] = (),
                  stagger_s: float = 5.0, log: Callable[[str], None] = print) -> int:
    """Run `workers` copies of `command` (`others_extra` appended to all but the first, which starts
    `stagger_s` ahead: it takes the shared first steps, such as scoring a base model), each logging to
    `log_dir/worker<i>.log`. Returns the worst exit code."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(workers):
        out = open(log_dir / f"worker{i}.log", "a")  # noqa: SIM115 - kept open for the child
        cmd = [*command, *(others_extra if i > 0 else ())]
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
        log(f"worker {i}: pid {procs[-1].pid}, log {out.name}")
        if i == 0:
            time.sleep(stagger_s)
    return max(p.wait() for p in procs)


def python_command(script: Path, argv: Sequence[str]) -> list[str]:
    """The command that runs `script` with `argv` under this interpreter."""
    return [sys.executable, str(Path(script).resolve()), *argv]
