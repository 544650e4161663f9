"""The package's layers, read from its source (ast): no import cycle, and no import running
back up the layers. docs/how-it-works.md's layout table names the same layers.

- shared: what both processes use (the option table, the channel, the readiness protocol,
  sockets, logs, the counts, the identity, the drain, the PROXY header, publish/subscribe's
  core, the wire to the hub, the hub, which the master forks and a lone worker runs, its
  client of Redis, and the admin API, which the hub serves);
- the worker's side: serving connections;
- the master's side: its records, the fleet's decisions, the process layer, upgrades, the loop, the
  --metrics port, the pidfile and status socket, the workers' memory from /proc;
- on top: the command line and the public API, which may import anything.

A worker imports nothing of the master's (it runs alone under supervisord too); the master
imports the worker module only inside a function: to preload it before forking (the pages
are then shared), and in a forked child. The fleet's decisions import only shared modules (and
their records) and no system-call module: time and processes come from the shell
(wsfleet/master.py); so does publish/subscribe's core (wsfleet/topics.py), whose I/O is the
relay's and the broker's.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from .support.harness import ROOT

PACKAGE = ROOT / "wsfleet"

SHARED = {
    "config",
    "channel",
    "notify",
    "sockets",
    "logs",
    "counts",
    "privileges",
    "drain",
    "proxy",
    "topics",
    "relay",
    "hub",
    "broker",
    "admin",
}
WORKER = {"worker", "connection", "pubsub"}
MASTER = {
    "records",
    "fleet",
    "processes",
    "upgrade",
    "master",
    "metrics",
    "web",
    "control",
    "steering",
    "memory",
}
# The command line, the public API and what is built on them (the default app, supervisord's
# rolling restart, the `wsfleet bench` load client).
TOP = {"__init__", "__main__", "cli", "arbiter", "echo", "chat", "rolling", "bench"}
LAYERS = {"shared": SHARED, "worker": WORKER, "master": MASTER, "top": TOP}
# Which layers each may import from.
ALLOWED = {
    "shared": {"shared"},
    "worker": {"shared", "worker"},
    "master": {"shared", "master"},
    "top": {"shared", "worker", "master", "top"},
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool


def layer(module: str) -> str:
    for name, members in LAYERS.items():
        if module in members:
            return name
    raise AssertionError(
        f"wsfleet/{module}.py is in no layer: add it to one in tests/test_layers.py (and to "
        "the layout table of docs/how-it-works.md)"
    )


def modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def imports(module: str) -> Iterator[Import]:
    """The package's modules that module imports, at any depth (lazy ones too)."""
    known = set(modules())
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())

    def visit(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.ImportFrom):
                if child.level == 1 and child.module is None:  # from . import a, b
                    names = [alias.name for alias in child.names]
                elif child.level == 1 and child.module is not None:  # from .a import b
                    names = [child.module.split(".")[0]]
                elif child.level == 0 and child.module == "wsfleet":  # from wsfleet import a
                    names = [alias.name for alias in child.names]
                elif child.level == 0 and (child.module or "").startswith("wsfleet."):
                    names = [(child.module or "").split(".")[1]]
            elif isinstance(child, ast.Import):
                names = [
                    alias.name.split(".")[1]
                    for alias in child.names
                    if alias.name.startswith("wsfleet.")
                ]
            for name in names:
                if name in known:  # (not a name of the package's own: __version__)
                    yield Import(module, name, child.lineno, in_function)
            yield from visit(child, nested)

    yield from visit(tree, False)


def graph() -> dict[str, set[str]]:
    return {m: {i.imported for i in imports(m)} for m in modules()}


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer(module)


def test_the_layout_table_has_a_row_for_every_module() -> None:
    rows = [
        line
        for line in (ROOT / "docs" / "how-it-works.md").read_text().splitlines()
        if line.startswith("| `wsfleet/")
    ]
    for module in modules():
        assert any(f"`wsfleet/{module}.py`" in row for row in rows), (
            f"docs/how-it-works.md's layout table has no row for wsfleet/{module}.py"
        )


def test_no_import_cycle() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for imported in sorted(edges[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in modules():
        visit(module, [])


def test_no_import_runs_back_up_the_layers() -> None:
    wrong = []
    for module in modules():
        for found in imports(module):
            have, want = layer(module), layer(found.imported)
            lazy_worker = have == "master" and found.imported == "worker" and found.in_function
            if want not in ALLOWED[have] and not lazy_worker:
                wrong.append(
                    f"wsfleet/{module}.py:{found.line} ({have}) imports {found.imported} ({want})"
                )
    assert not wrong, "\n".join(wrong)


def test_the_decisions_import_no_system_calls() -> None:
    """The master's records and decisions, and publish/subscribe's core: no clock, socket or
    process."""
    for module in ("records", "fleet", "topics"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        stdlib = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                stdlib |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                stdlib.add(node.module.split(".")[0])
        forbidden = {"os", "time", "socket", "selectors", "subprocess", "select", "fcntl"}
        forbidden |= {"asyncio", "threading", "signal"} if module == "topics" else set()
        assert not stdlib & forbidden, f"wsfleet/{module}.py imports {sorted(stdlib & forbidden)}"
        records = {"records"} if module == "fleet" else set()  # (the decisions' own records)
        assert {i.imported for i in imports(module)} <= SHARED | records


def test_the_checks_see_a_cycle_and_a_wrong_way_import(tmp_path, monkeypatch) -> None:
    """The checks can fail: a package where shared imports the worker, which imports it."""
    (tmp_path / "config.py").write_text("from . import worker\n")
    (tmp_path / "worker.py").write_text("def f():\n    from .config import X\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    try:
        test_no_import_cycle()
    except AssertionError as exc:
        assert "config -> worker -> config" in str(exc)
    else:
        raise AssertionError("the cycle was not seen")
    try:
        test_no_import_runs_back_up_the_layers()
    except AssertionError as exc:
        assert "wsfleet/config.py:1 (shared) imports worker (worker)" in str(exc)
    else:
        raise AssertionError("the wrong-way import was not seen")
