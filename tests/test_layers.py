"""The shape of the package, read from its source with ``ast`` (see docs/architecture.md).

Layers, each importing only those below it::

    cli/                  parse and print only
    bench/                compose worlds x methods into pre-registered checks
    report/               the scoreboard file and the HTML page (bench writes through it)
    tasks/ (worlds)       data, model recipe, ground truth, causal model; the one Task registry
    causal/ circuits/ probe/ steer/ sae/ spd/    methods: siblings, none imports another
    zoo/                  architectures only
    core/                 sites, interventions, run/cache, structure, store, checkpoint, ...

Every import counts, at module top or inside a function. Also: no import cycle between
files, no file over 600 lines, no function over 80 lines.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "src" / "mechscope"

LAYER = {"core": 0, "zoo": 1, "causal": 2, "circuits": 2, "probe": 2, "steer": 2, "sae": 2, "spd": 2,
         "tasks": 3, "report": 4, "bench": 5, "cli": 6}
METHODS = {name for name, level in LAYER.items() if level == 2}
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80

# Imports that break the layering today, each removed by work still in progress (issue 16).
# An entry is (importing module, imported module); remove it when the work lands.
ALLOWED_LAYER_VIOLATIONS: dict[tuple[str, str], str] = {}

# Import cycles between files that remain, each named by its sorted members, with the work that removes it.
ALLOWED_CYCLES: dict[tuple[str, ...], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=1)
def _sources() -> dict[str, tuple[Path, ast.Module, bool]]:
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"), str(p)), p.name == "__init__.py")
            for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Import nodes under ``if TYPE_CHECKING:`` (annotations only: never run)."""
    return {n for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body for n in ast.walk(stmt)}


def _imports(module: str, type_checking: bool = True) -> set[str]:
    """The mechscope modules ``module`` imports (a name that is a submodule counts as that module);
    ``type_checking=False`` leaves out those imported for annotations only."""
    modules = _sources()
    _, tree, is_package = modules[module]
    skip = set() if type_checking else _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(target)
    return {m for m in found if m in modules and m != module}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER else None


def _violation(importer: str, imported: str) -> str | None:
    a, b = _package(importer), _package(imported)
    if a is None or b is None or a == b:
        return None
    if LAYER[b] > LAYER[a]:
        return f"{importer} (layer {a}) imports {imported} (layer {b}, above it)"
    if a in METHODS and b in METHODS:
        return f"{importer} imports {imported}: methods are siblings and never import one another"
    return None


def test_layers_import_only_downward():
    found = {}
    for module in _sources():
        for imported in _imports(module):
            why = _violation(module, imported)
            if why:
                found[(module, imported)] = why
    new = {k: v for k, v in found.items() if k not in ALLOWED_LAYER_VIOLATIONS}
    assert not new, "imports against the layering:\n" + "\n".join(sorted(new.values()))
    stale = sorted(set(ALLOWED_LAYER_VIOLATIONS) - set(found))
    assert not stale, f"allow-list entries no longer needed (remove them): {stale}"


def _cycles() -> list[tuple[str, ...]]:
    """Strongly connected components with more than one file (Tarjan's algorithm, iterative)."""
    graph = {m: sorted(_imports(m, type_checking=False)) for m in _sources()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[tuple[str, ...]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            if i < len(graph[node]):
                work.append((node, i + 1))
                nxt = graph[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(tuple(sorted(comp)))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return out


def test_no_import_cycle_between_files():
    cycles = _cycles()
    new = [c for c in cycles if c not in ALLOWED_CYCLES]
    assert not new, "import cycles between files:\n" + "\n".join(" <-> ".join(c) for c in new)
    stale = sorted(set(ALLOWED_CYCLES) - set(cycles))
    assert not stale, f"allow-listed cycles no longer present (remove them): {stale}"


def test_no_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p, _, _ in _sources().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by concept): {long}"


def test_no_function_over_80_lines():
    long = {}
    for module, (path, tree, _) in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{module}.{node.name} (line {node.lineno})"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


# Packages whose internal imports all sit at module top (cli/ may import inside functions,
# to keep `mechscope --help` free of torch).
TOP_LEVEL_IMPORTS = {"core", "zoo", "tasks", "report", "bench", "causal", "circuits", "spd", "sae", "steer", "probe"}


def test_imports_at_module_top():
    inside = []
    for module, (_, tree, is_package) in _sources().items():
        if _package(module) not in TOP_LEVEL_IMPORTS:
            continue
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [_resolve(module, is_package, node)] if isinstance(node, ast.ImportFrom) else [])
                inside += [f"{module}.{fn.name} (line {node.lineno}): {n}" for n in names if n.startswith("mechscope")]
    assert not inside, "mechscope imports inside functions (move them to the module top):\n" + "\n".join(inside)


@pytest.mark.parametrize("importer, imported, bad", [
    ("mechscope.sae.train", "mechscope.tasks.tms", True),         # a method importing a world
    ("mechscope.zoo", "mechscope.tasks.othello", True),           # the zoo importing a world
    ("mechscope.report.html", "mechscope.bench.scoreboard", True),
    ("mechscope.steer.apply", "mechscope.probe.linear", True),    # sideways between methods
    ("mechscope.tasks.othello", "mechscope.probe.linear", False),  # a world using a method
    ("mechscope.bench.toy_checks", "mechscope.tasks.grokking", False),
    ("mechscope.sae.train", "mechscope.sae.arch", False),
])
def test_the_rule_itself(importer, imported, bad):
    assert (_violation(importer, imported) is not None) == bad


def test_the_cycle_finder_finds_a_planted_cycle(monkeypatch):
    graph = {"mechscope.a": {"mechscope.b"}, "mechscope.b": {"mechscope.c"}, "mechscope.c": {"mechscope.a"},
             "mechscope.d": {"mechscope.a"}}
    monkeypatch.setitem(globals(), "_sources", lambda: dict.fromkeys(graph))
    monkeypatch.setitem(globals(), "_imports", lambda m, type_checking=True: graph[m])
    assert _cycles() == [("mechscope.a", "mechscope.b", "mechscope.c")]
