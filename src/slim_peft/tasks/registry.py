"""The task registry: built-in tasks plus user tasks registered at run time."""

from __future__ import annotations

from slim_peft.errors import ConfigError, UnknownTaskError
from slim_peft.tasks.builtin import builtin_tasks
from slim_peft.tasks.types import Task

_REGISTRY: dict[str, Task] = {t.name: t for t in builtin_tasks()}
_BUILTIN = frozenset(_REGISTRY)

# The general-capability suite the forgetting report uses by default (cloze probes above chance).
GENERAL_SUITE = (
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "sciq",
    "winogrande",
    "mmlu",
    "basic_arithmetic",
)


def register_task(task: Task, overwrite: bool = False) -> Task:
    """Add a task to the registry; a built-in name is never replaced, a user task only with ``overwrite``."""
    if task.name in _BUILTIN:
        raise ConfigError(f"task name {task.name!r} is a built-in task; choose another name")
    if task.name in _REGISTRY and not overwrite:
        raise ConfigError(f"task {task.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[task.name] = task
    return task


def find_task(name: str) -> Task | None:
    """The registered task called ``name``, or None."""
    return _REGISTRY.get(name)


def get_task(name: str) -> Task:
    """The registered task called ``name``; a clear error listing the known names otherwise."""
    task = _REGISTRY.get(name)
    if task is None:
        known = ", ".join(n for n in list_tasks(include_subjects=False))
        raise UnknownTaskError(
            f"unknown task {name!r}; registered tasks: {known} (and mmlu_<subject> for the "
            f"57 MMLU subjects; add your own with register_jsonl_task)"
        )
    return task


def list_tasks(include_subjects: bool = True) -> list[str]:
    """Names of the registered tasks (MMLU's 57 per-subject tasks only with ``include_subjects``)."""
    names = list(_REGISTRY)
    if not include_subjects:
        names = [n for n in names if not (n.startswith("mmlu_") and n in _BUILTIN)]
    return names
