"""The package type-checks, strict, with the mypy the test extra installs and the
configuration in pyproject.toml ([tool.mypy]); every ``type: ignore`` left says why."""

import re
import subprocess
import sys
import tomllib

from .support.harness import ROOT

# An ignore with its error codes, then a comment that gives the reason.
IGNORE = re.compile(r"#\s*type:\s*ignore(?P<codes>\[[^\]]*\])?(?P<rest>.*)$")


def test_mypy_strict_on_the_package() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def unchecked_modules() -> set[str]:
    """Modules whose errors mypy is told to ignore (an override's ignore_errors): their
    ignores are not held to the rule either until the override goes."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    return {
        module
        for override in config.get("overrides", [])
        if override.get("ignore_errors")
        for module in override["module"]
    }


def test_each_ignore_names_its_code_and_says_why() -> None:
    unchecked = unchecked_modules()
    bare = []
    for path in sorted((ROOT / "wsfleet").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module in unchecked:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found = IGNORE.search(line)
            if found and not (found["codes"] and re.match(r"\s+#\s*\w", found["rest"])):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "a type: ignore needs [its-code]  # and the reason:\n" + "\n".join(bare)
