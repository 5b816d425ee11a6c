"""The package tree's rules: no import circles, and who may import whom.

The graph is built from the source with ``ast`` (every import a module runs, at the top or
inside a function; imports under ``if TYPE_CHECKING:`` are for annotations and don't count).
``from a.b import c`` is an edge to the module ``a.b.c`` when there is one, else to ``a.b``, so
a package that re-exports its modules does not count as importing its own callers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "klined"

#: what the root package may hold besides its sub-packages: what every layer uses
ROOT_MODULES = {"__init__", "cli", "config", "errors", "logs", "model", "status"}
#: network, database and event-loop libraries a pure protocol adapter must not touch
IO_LIBRARIES = {
    "aioboto3", "aiobotocore", "aiohttp", "anyio", "asyncio", "asyncpg", "boto3", "httpx",
    "socket", "websockets",
}  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str) -> list[tuple[str, list[str]]]:
    """(module, names) for every runtime import: ``import m`` gives (m, [])."""
    found: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for stmt in child.orelse:
                    visit_one(stmt)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
        else:
            visit(node)

    visit(tree)
    return found


@cache
def graph() -> dict[str, frozenset[str]]:
    """klined module -> the klined modules it imports."""
    mods = modules()
    edges: dict[str, frozenset[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for module, names in _imports(ast.parse(path.read_text()), package):
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in mods]
            if submodules:
                targets.update(submodules)
                if len(submodules) < len(names) and module in mods:
                    targets.add(module)
            elif module in mods:
                targets.add(module)
        edges[name] = frozenset(targets - {name})
    return edges


@cache
def third_party(name: str) -> frozenset[str]:
    """Top-level names of the non-klined libraries a module imports at run time."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tops = {m.split(".")[0] for m, _ in _imports(ast.parse(path.read_text()), package)}
    return frozenset(tops - {"klined", "__future__"})


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def _in(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking() -> None:
    edges = graph()
    assert "klined.daemon.process" in edges["klined.commands.run"]
    # a function-level import counts: the demo imports the TUI only when it shows it
    assert "klined.tui.app" in edges["klined.demo.run"]
    # ``TYPE_CHECKING`` imports don't: the simulator's protocols name the server in annotations
    assert "klined.sim.server" not in edges["klined.sim.binance"]


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_a_cycle_is_found() -> None:
    edges = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}
    assert cycles(edges) == [["a", "b", "c"]]


#: the public API the package exposes at its top (each imported lazily, where it is called)
PUBLIC_API = {"klined.datasets.read"}


def test_root_holds_only_what_every_layer_uses() -> None:
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root == ROOT_MODULES
    for name in ROOT_MODULES - {"cli"}:
        inner = {m for m in graph()[f"klined.{name}" if name != "__init__" else "klined"]}
        if name == "__init__":
            inner -= PUBLIC_API
        assert all(m.count(".") == 1 for m in inner), f"klined.{name} imports a layer: {inner}"


def test_only_the_cli_imports_commands() -> None:
    offenders = {
        (m, t)
        for m, targets in graph().items()
        for t in targets
        if _in(t, "klined.commands") and not _in(m, "klined.commands", "klined.cli")
    }
    assert offenders == set()


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        # pure protocol adapters: parse and build messages, never do I/O or touch the warehouse
        ("klined.exchanges", ("klined.streams", "klined.rest", "klined.lake", "klined.warehouse",
                              "klined.jobs", "klined.live", "klined.daemon", "klined.sim",
                              "klined.tui")),
        # the simulator follows the exchanges, never klined's clients or the daemon
        ("klined.sim", ("klined.exchanges", "klined.archives", "klined.streams", "klined.rest",
                        "klined.lake", "klined.warehouse", "klined.jobs", "klined.live",
                        "klined.daemon", "klined.tui")),
        # the exchanges' history files: formats, local reading and fetching, no warehouse
        ("klined.archives", ("klined.streams", "klined.lake", "klined.warehouse", "klined.jobs",
                             "klined.live", "klined.daemon", "klined.datasets", "klined.sim",
                             "klined.tui")),
        ("klined.streams", ("klined.warehouse", "klined.jobs", "klined.live", "klined.daemon",
                            "klined.tui")),
        ("klined.lake", ("klined.streams", "klined.warehouse", "klined.jobs", "klined.live",
                         "klined.daemon", "klined.datasets", "klined.tui")),
        ("klined.warehouse", ("klined.streams", "klined.jobs", "klined.live", "klined.daemon",
                              "klined.datasets", "klined.tui")),
        # candles out: reads the warehouse, writes files (S3 through the lake's client)
        ("klined.datasets", ("klined.exchanges", "klined.streams", "klined.rest", "klined.jobs",
                             "klined.live", "klined.daemon", "klined.sim", "klined.tui")),
        ("klined.jobs", ("klined.streams", "klined.live", "klined.daemon", "klined.tui")),
        # the live path: silver's own statement (jobs) and the warehouse; the lake and the
        # streams reach it through the daemon, as callables (only the backoff is shared)
        ("klined.live", ("klined.exchanges", "klined.streams.connection", "klined.streams.session",
                         "klined.streams.supervisor", "klined.streams.finality", "klined.rest",
                         "klined.lake", "klined.daemon", "klined.checks", "klined.sim",
                         "klined.tui", "klined.demo")),
        ("klined.daemon", ("klined.tui", "klined.sim", "klined.demo")),
    ],
)  # fmt: skip
def test_layering(layer: str, forbidden: tuple[str, ...]) -> None:
    offenders = {
        (m, t)
        for m, targets in graph().items()
        if _in(m, layer)
        for t in targets
        if _in(t, *forbidden)
    }
    assert offenders == set()


def test_exchange_adapters_do_no_io() -> None:
    offenders = {
        (m, lib)
        for m in modules()
        if _in(m, "klined.exchanges")
        for lib in third_party(m) & IO_LIBRARIES
    }
    assert offenders == set()


def test_archive_formats_are_pure() -> None:
    """Naming, planning and parsing the history files touch neither files nor the network:
    only ``archives.files`` reads (local files) and ``archives.download`` fetches."""
    pure = ("klined.archives.binance", "klined.archives.kraken", "klined.archives.candles")
    offenders = {(m, lib) for m in pure for lib in third_party(m) & (IO_LIBRARIES | {"zipfile"})}
    assert offenders == set()
    for m in pure:
        assert not any(_in(t, "klined.archives.files", "klined.archives.download")
                       for t in graph()[m]), m  # fmt: skip


def test_headless_core_never_imports_textual_in_source() -> None:
    gui = ("klined.tui", "klined.commands.tui", "klined.demo")
    offenders = {
        m
        for m in modules()
        if not _in(m, *gui) and ({"textual", "rich"} & third_party(m) or
                                 any(_in(t, "klined.tui") for t in graph()[m]))
    }  # fmt: skip
    assert offenders == set()


def test_headless_core_never_loads_textual() -> None:
    """Importing every headless module (and the CLI's help) leaves Textual unloaded.

    (Rich may load: httpx imports it for its own command line when it is installed.)
    """
    core = sorted(
        m
        for m in modules()
        if not _in(m, "klined.tui", "klined.commands.tui", "klined.demo", "klined.spark")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        "from klined.cli import cli\n"
        "cli.main(['--help'], standalone_mode=False)\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'textual'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_nothing_imports_the_spark_job_and_it_imports_only_the_model() -> None:
    """``klined.spark`` is an optional extra (PySpark): the core must run without it."""
    edges = graph()
    importers = {m for m, targets in edges.items() for t in targets if _in(t, "klined.spark")}
    assert importers <= {m for m in edges if _in(m, "klined.spark")}
    used = {t for m, targets in edges.items() if _in(m, "klined.spark") for t in targets}
    assert {t for t in used if not _in(t, "klined.spark")} <= {"klined.model"}
