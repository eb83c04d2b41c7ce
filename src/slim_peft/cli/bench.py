"""``slim-peft bench NAME [ARGS]``: run a benchmark script of the source checkout."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def add_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")


BENCHMARKS = {"speed": "speed.py", "forgetting": "forgetting.py", "continual": "continual.py",
              "generative_probe": "generative_probe.py"}


def command(args: argparse.Namespace) -> int:
    """``slim-peft bench NAME [ARGS]``: run benchmarks/<name>.py of the source checkout."""
    root = Path(os.environ.get("SLIM_PEFT_BENCHMARKS", Path(__file__).resolve().parents[3] / "benchmarks"))
    script = root / BENCHMARKS[args.name]
    if not script.is_file():
        print(f"slim-peft bench: {script} not found. The benchmarks ship with the source repository, not with "
              f"the installed package: run this from a git checkout (pip install -e .), or set "
              f"SLIM_PEFT_BENCHMARKS to its benchmarks/ folder.", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.args])
