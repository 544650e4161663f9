"""The documentation stays true to the code and stands on its own.

- docs/options.md is what scripts/gen-docs writes from the option table now;
- the README's test command is the one .ci/run runs, and the README stays a front page;
- every relative link of every Markdown file leads to a file of the repository, and no file
  cites a document that is not in it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from pathlib import Path
from types import ModuleType

from .support.harness import ROOT

# Not the project's own files: what a working tree may hold besides them (.gitignore).
SKIPPED = {".git", ".venv", "venv", "build", "dist", "__pycache__", "data", "samples"}
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Documents that were never part of the repository, which its files once cited.
OUTSIDE = re.compile(r"(?-i:\bSPEC\b)|SPEC\.md|FIELD-NOTES|\.\./shared\b|field notes", re.I)


def gen_docs() -> ModuleType:
    """scripts/gen-docs, imported (it has no .py suffix)."""
    path = ROOT / "scripts" / "gen-docs"
    loader = importlib.machinery.SourceFileLoader("gen_docs", str(path))
    spec = importlib.util.spec_from_loader("gen_docs", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def project_files(*suffixes: str) -> list[Path]:
    found = []
    for path in sorted(ROOT.rglob("*")):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIPPED or p.endswith((".egg-info", "_cache")) for p in parts):
            continue
        if path.is_file() and (not suffixes or path.suffix in suffixes):
            found.append(path)
    return found


def test_options_page_is_generated_from_the_option_table() -> None:
    problem = gen_docs().stale()
    assert problem is None, problem


def test_options_page_lists_every_option_of_every_command() -> None:
    """What the generator walks is what the parsers hold: nothing it skips goes unseen."""
    module = gen_docs()
    page = (ROOT / "docs" / "options.md").read_text()
    parsers, _ = module.commands()
    for name, parser in parsers.items():
        assert f"`wsfleet {name}" in page, name
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page, f"wsfleet {name} {flag} is not in docs/options.md"


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    contributing = readme.partition("\n## Contributing\n")[2]
    assert f"\n{ci}\n" in contributing, (
        f"the README's Contributing section must show .ci/run's command exactly: {ci}"
    )


def test_readme_is_a_front_page() -> None:
    """What a newcomer reads first, in the order they need it; the manual is in docs/."""
    readme = (ROOT / "README.md").read_text()
    headings = re.findall(r"^## (.+)$", readme, re.M)
    assert headings == [
        "Requirements",
        "Install and run",
        "Connect a client",
        "Write your own handler",
        "Share messages across workers",
        "Operate it",
        "Where to go next",
        "Contributing",
    ]
    lines = len(readme.splitlines())
    assert lines <= 175, f"README.md has {lines} lines: move the details to docs/"


def test_the_readme_chat_handler_is_the_example_s() -> None:
    """The handler the README shows is wsfleet/chat.py's, line for line (which the tests run,
    tests/test_pubsub_browser.py with a browser)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Share messages across workers")[1].split("\n## ")[0]
    (shown,) = re.findall(r"```python\n(.*?)```", section, re.S)
    example = (ROOT / "wsfleet" / "chat.py").read_text()
    (body,) = re.findall(r"^async def chat\(.*?\n((?:    .*\n|\n)+)", example, re.M)
    code = [
        line.split("  # ")[0]  # (the example's comments and type checker's notes)
        for line in body.splitlines()
        if line and not line.strip().startswith("#")
    ]
    assert shown.splitlines()[0].startswith("async def chat(websocket")
    assert shown.splitlines()[1:] == code


def anchors(path: Path) -> set[str]:
    """The anchors a Markdown file's headings get, as GitHub makes them: lower case, spaces
    to hyphens, other punctuation dropped."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_lead_to_files_of_the_repository() -> None:
    """And to a heading of that file, where they name one."""
    broken = []
    for path in project_files(".md"):
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "links to nothing in the repository:\n" + "\n".join(broken)


def test_no_file_cites_a_document_outside_the_repository() -> None:
    cited = []
    for path in project_files():
        if path == Path(__file__):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # an image
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                cited.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not cited, "say the rule itself, or point to docs/:\n" + "\n".join(cited)
