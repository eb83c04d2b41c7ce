"""Run a CPU job under jemalloc instead of glibc's malloc (Linux), when the library is on the machine.

Why: a CPU training step allocates and frees the same large activations every micro-batch. glibc hands large
blocks back to the kernel and takes them again, so every step faults its pages in anew: about a million
minor page faults per step of the forgetting study, at ~10 us each in a VM (`benchmarks/step_profile.py`).
jemalloc with its decay turned off keeps freed pages for reuse. Numbers do not change (same kernels, same
order); steps get 1.1-1.3x faster (`benchmarks/results/step_profile.md`). torch's CPU tuning guide gives the
same advice.

The price is memory: a page once used stays resident. On the forgetting study's exact-merge run (SLIM with
elementwise DARE masks) the process grew to 23 GB by step 16 and was killed, where glibc peaked at 8.0 GB over
10 steps; with jemalloc's default decay instead (`MALLOC_CONF=dirty_decay_ms:10000`) the memory stayed low
(5.0 GB) but the steps ran 1.6x slower than glibc's. So the study's default stays the system malloc and
jemalloc is opt-in, for jobs whose peak fits with room to spare.

The library is not a Python package: it comes with the OS (`apt-get install libjemalloc2`, `dnf install
jemalloc`, conda's `jemalloc`). Without root on Debian/Ubuntu:

    apt-get download libjemalloc2 && dpkg-deb -x libjemalloc2_*.deb jem
    export SLIM_PEFT_JEMALLOC=$PWD/jem/usr/lib/x86_64-linux-gnu/libjemalloc.so.2

An allocator must be in place before the process starts, so `reexec_with_jemalloc` replaces the current
process by the same command with `LD_PRELOAD` set; children inherit it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from slim_peft.errors import ConfigError

JEMALLOC_ENV = "SLIM_PEFT_JEMALLOC"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # keep freed pages: no madvise, no refault
STANDARD_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
CHOICES = ("auto", "jemalloc", "system")


def loaded_allocator() -> str:
    """The malloc this process runs with: "jemalloc", "tcmalloc", or "system" (glibc's, or not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in ("jemalloc", "tcmalloc") if f"lib{name}" in maps), "system")


def find_jemalloc() -> Path | None:
    """libjemalloc: `$SLIM_PEFT_JEMALLOC` when set (it must exist), else the OS's usual places, else None."""
    if env := os.environ.get(JEMALLOC_ENV):
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{JEMALLOC_ENV}={env} is not a file; point it at libjemalloc.so.2 or unset it")
        return path
    if conda := os.environ.get("CONDA_PREFIX"):
        candidates: tuple[str, ...] = (str(Path(conda) / "lib" / "libjemalloc.so.2"), *STANDARD_PATHS)
    else:
        candidates = STANDARD_PATHS
    return next((Path(p) for p in candidates if Path(p).is_file()), None)


def jemalloc_env(library: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with `library` first in LD_PRELOAD and jemalloc's decay off."""
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = ":".join([str(library), *filter(None, env.get("LD_PRELOAD", "").split(":"))])
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def reexec_with_jemalloc(choice: str = "auto", argv: list[str] | None = None) -> str:
    """Make this process run under jemalloc: returns at once when it already does or `choice` is "system";
    otherwise replaces the process by `python argv...` (default: this command) with jemalloc preloaded, and
    does not return. With "auto" and no library found it returns "system" and prints how to get one; with
    "jemalloc" and none found it raises. Returns the allocator the process runs with."""
    if choice not in CHOICES:
        raise ConfigError(f"allocator {choice!r}: choose from {', '.join(CHOICES)}")
    current = loaded_allocator()
    if choice == "system" or current == "jemalloc" or not sys.platform.startswith("linux"):
        return current
    library = find_jemalloc()
    if library is None:
        hint = (f"install libjemalloc2 (apt-get install libjemalloc2) or set {JEMALLOC_ENV} to its "
                f"libjemalloc.so.2; training steps run 1.1-1.3x faster with it")
        if choice == "jemalloc":
            raise FileNotFoundError(f"--allocator jemalloc: no libjemalloc.so.2 found; {hint}")
        print(f"[slim-peft] running with the system malloc: {hint} (or pass --allocator system)", flush=True)
        return current
    if os.environ.get("LD_PRELOAD", "").startswith(str(library)):  # preloaded, yet not mapped: do not loop
        raise RuntimeError(f"{library} is in LD_PRELOAD but was not loaded; is it a jemalloc library?")
    args = sys.argv if argv is None else argv
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], jemalloc_env(library))
    raise AssertionError("unreachable")  # execve does not return
