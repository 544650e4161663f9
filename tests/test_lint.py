"""The code stays ruff clean (lint and format), checked with the ruff the test extra installs."""

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
