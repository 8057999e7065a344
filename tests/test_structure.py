"""The package's shape, checked: no module imports another's private names, no import cycle
(counting imports under ``TYPE_CHECKING`` and inside functions), no ``asyncio.wait_for``, and no
file grows past what one sitting can read except the few named below with the reason they
stay whole."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "dwcp"
MAX_LINES = 500
# module -> why it is longer than MAX_LINES (add one only with its reason)
LONG_FILES: dict[str, str] = {}


def _modules() -> dict[str, tuple[Path, bool]]:
    mods: dict[str, tuple[Path, bool]] = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        mods[".".join(parts)] = (path, is_pkg)
    return mods


MODULES = _modules()


def _owner(name: str) -> str:
    while name not in MODULES:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> Iterator[tuple[str, str | None]]:
    """(imported module, imported name or None) for every dwcp import in ``module``."""
    path, is_pkg = MODULES[module]
    package = module if is_pkg else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dwcp":
                    yield _owner(alias.name), None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            if full.split(".")[0] != "dwcp":
                continue
            for alias in node.names:
                sub = f"{full}.{alias.name}"
                if sub in MODULES:
                    yield sub, None
                else:
                    yield _owner(full), alias.name


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_private_names() -> None:
    bad = [
        f"{mod} imports {name} from {target}"
        for mod in MODULES
        for target, name in _imports(mod)
        if name is not None and _is_private(name) and target != mod
    ]
    assert not bad, bad


def test_no_private_attributes_of_imported_modules() -> None:
    bad = []
    for mod, (path, _) in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update(
                    a.asname or a.name.split(".")[0]
                    for a in node.names
                    if a.name.startswith("dwcp")
                )
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dwcp"):
                aliases.update(
                    a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _is_private(node.attr)
            ):
                bad.append(f"{mod}: {node.value.id}.{node.attr}")
    assert not bad, bad


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _ in _imports(m) if t != m} for m in MODULES}
    cycles: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_files_stay_readable() -> None:
    long = {
        m: n
        for m, (p, _) in MODULES.items()
        if (n := len(p.read_text().splitlines())) > MAX_LINES and m not in LONG_FILES
    }
    assert not long, f"split these or name them in LONG_FILES with the reason: {long}"


def test_no_asyncio_wait_for() -> None:
    """Python 3.11's ``wait_for`` returns the result and drops a cancel that lands as the
    awaited thing completes (gh-86296): a cancelled pull ran on to the end. ``async with
    asyncio.timeout(...)`` keeps the cancel."""
    bad = []
    for m, (p, _) in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "wait_for":
                bad.append(f"{m}:{node.lineno}")
    assert not bad, bad
