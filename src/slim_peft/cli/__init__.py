"""The command line: thin modules that parse flags and call the library (see `main.py`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
