"""``slim-peft fetch``: download, verify and convert the embedded model and data for offline use."""

from __future__ import annotations

import argparse

from slim_peft.assets import fetch_all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No arguments."""


def command(args: argparse.Namespace) -> int:
    for name, path in fetch_all().items():
        print(f"{name}: {path}")
    return 0
