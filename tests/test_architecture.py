"""The house rules of the source tree: imports flow one way (import-linter's layers contracts in
pyproject.toml), no module over 600 lines, no function over 80, and every method named only in the registry."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slim_peft"


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: install the test extra (pip install -e '.[test]')")
    done = subprocess.run([exe], cwd=SRC.parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_no_module_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these by concern: {long}"


def test_no_function_over_80_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_method_names_appear_only_in_their_folders_and_the_registry_line():
    """A library module outside `adapters/methods/` that compares against a method name ("slim", "mixlora",
    ...) is a second registry; names in docstrings and messages are fine, comparisons are not. The
    experiments (a study's plan and its claims are about named methods) and the MoE-PEFT bridge (a foreign
    format's names) are exempt."""
    from slim_peft.adapters import METHODS

    names = set(METHODS)
    offenders = []
    for path in _modules():
        parts = path.relative_to(SRC).parts
        if parts[0] in ("experiments", "integrations") or "methods" in parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for const in [node.left, *node.comparators]:
                    if isinstance(const, ast.Constant) and const.value in names:
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} compares with {const.value!r}")
                    if isinstance(const, ast.Tuple | ast.Set | ast.List) and any(
                            isinstance(e, ast.Constant) and e.value in names for e in const.elts):
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} lists method names")
    assert not offenders, offenders
