"""The code stays ruff clean (lint and format), checked with the ruff the test extra installs."""

import ast
import subprocess
import sys

from .support.harness import ROOT

# Python scripts without a .py suffix, which ruff does not find by itself.
SCRIPTS = [
    str(path)
    for path in sorted((ROOT / "scripts").glob("*"))
    if path.is_file() and path.read_text(errors="replace").startswith("#!/usr/bin/env python")
]


def test_ruff_check_and_format() -> None:
    for args in (["check", ".", *SCRIPTS], ["format", "--check", ".", *SCRIPTS]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_no_test_module_imports_another() -> None:
    """What tests share lives in tests/support/ (helpers) and tests/conftest.py (fixtures): a
    test module holds tests, and nothing depends on it."""
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(alias.name for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            modules = [name.rsplit(".", 1)[-1] for name in names]
            assert not any(m.startswith("test_") for m in modules), (
                f"{path.relative_to(ROOT)}, line {node.lineno}: imports a test module"
            )
