"""The code stays ruff clean (lint and format), checked with the ruff the test extra installs."""

import subprocess
import sys

from .helpers import ROOT


def test_ruff_check_and_format() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr
