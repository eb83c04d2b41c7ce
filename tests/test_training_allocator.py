"""slim_peft.training.allocator: finding jemalloc, the environment it is preloaded with, and re-executing under it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slim_peft.training import allocator


def test_this_process_runs_with_the_system_malloc_unless_preloaded():
    preload = os.environ.get("LD_PRELOAD", "")
    expected = "jemalloc" if "libjemalloc" in preload else "tcmalloc" if "libtcmalloc" in preload else "system"
    assert allocator.loaded_allocator() == expected


class _Maps:
    """Stands in for `Path` in the allocator module: `/proc/self/maps` reads as `text` (or fails when None)."""

    def __init__(self, text: str | None) -> None:
        self.text = text

    def __call__(self, path: str) -> _Maps:
        assert path == "/proc/self/maps"
        return self

    def read_text(self) -> str:
        if self.text is None:
            raise OSError("no /proc here")
        return self.text


GLIBC = "7f00-7f10 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


@pytest.mark.parametrize("maps, expected", [
    (GLIBC, "system"),
    (GLIBC + "7f20-7f30 r-xp 00000000 08:01 456 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n", "jemalloc"),
    (GLIBC + "7f20-7f30 r-xp 00000000 08:01 789 /usr/lib/libtcmalloc_minimal.so.4\n", "tcmalloc"),
    (None, "system"),  # no /proc (not Linux)
], ids=["glibc", "jemalloc", "tcmalloc", "no-proc"])
def test_the_allocator_is_read_from_the_mapped_libraries(monkeypatch, maps, expected):
    monkeypatch.setattr(allocator, "Path", _Maps(maps))
    assert allocator.loaded_allocator() == expected


def test_the_environment_variable_names_the_library_and_a_wrong_one_fails_early(tmp_path, monkeypatch):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setenv("SLIM_PEFT_JEMALLOC", str(lib))
    assert allocator.find_jemalloc() == lib
    monkeypatch.setenv("SLIM_PEFT_JEMALLOC", str(tmp_path / "missing.so"))
    with pytest.raises(FileNotFoundError, match="SLIM_PEFT_JEMALLOC=.*missing.so is not a file"):
        allocator.find_jemalloc()
    # without the variable, a conda environment's lib/ is searched first
    monkeypatch.delenv("SLIM_PEFT_JEMALLOC")
    conda = tmp_path / "conda"
    (conda / "lib").mkdir(parents=True)
    (conda / "lib" / "libjemalloc.so.2").write_bytes(b"")
    monkeypatch.setenv("CONDA_PREFIX", str(conda))
    assert allocator.find_jemalloc() == conda / "lib" / "libjemalloc.so.2"


def test_jemalloc_env_prepends_the_library_and_turns_decay_off(tmp_path):
    env = allocator.jemalloc_env(tmp_path / "libjemalloc.so.2", {"LD_PRELOAD": "/other.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == f"{tmp_path / 'libjemalloc.so.2'}:/other.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    assert allocator.jemalloc_env(tmp_path / "j.so", {"MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"


def test_reexec_replaces_the_process_with_jemalloc_preloaded(tmp_path, monkeypatch):
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "system")
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: lib)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    calls = []

    def fake_execve(path, args, env):
        calls.append((path, args, env))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execve", fake_execve)
    assert allocator.reexec_with_jemalloc("system") == "system" and not calls
    with pytest.raises(SystemExit):
        allocator.reexec_with_jemalloc("auto", ["script.py", "--budget", "main"])
    path, args, env = calls[0]
    assert path == sys.executable and args == [sys.executable, "script.py", "--budget", "main"]
    # this process's environment, plus the library preloaded and jemalloc's decay turned off
    assert env == {**os.environ, "LD_PRELOAD": str(lib), "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
    # preloaded but not mapped (not a jemalloc library): an error, not an endless loop of re-executions
    monkeypatch.setenv("LD_PRELOAD", str(lib))
    with pytest.raises(RuntimeError, match="was not loaded"):
        allocator.reexec_with_jemalloc("auto", ["script.py"])
    with pytest.raises(ValueError, match="choose from auto, jemalloc, system"):
        allocator.reexec_with_jemalloc("tcmalloc")


def test_without_a_library_auto_goes_on_and_jemalloc_says_how_to_get_one(monkeypatch, capsys):
    monkeypatch.setattr(allocator, "loaded_allocator", lambda: "system")
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("nothing to preload"))
    assert allocator.reexec_with_jemalloc("auto") == "system"
    assert "apt-get install libjemalloc2" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no libjemalloc.so.2 found.*SLIM_PEFT_JEMALLOC"):
        allocator.reexec_with_jemalloc("jemalloc")


def test_a_real_reexec_runs_under_jemalloc(tmp_path):
    """End to end where the machine has the library (.ci/run fetches it when it can)."""
    try:
        library = allocator.find_jemalloc()
    except FileNotFoundError:
        library = None
    if library is None or not sys.platform.startswith("linux"):
        pytest.skip("no libjemalloc.so.2 on this machine (apt-get install libjemalloc2, or SLIM_PEFT_JEMALLOC)")
    script = tmp_path / "job.py"
    script.write_text("from slim_peft.training.allocator import reexec_with_jemalloc, loaded_allocator\n"
                      "print('start', flush=True)\n"
                      "reexec_with_jemalloc('jemalloc')\n"
                      "print(loaded_allocator())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["start", "start", "jemalloc"]  # the second start: the same script, re-executed
