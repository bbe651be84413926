"""The layers of ``docs/architecture.md``: imports inside the package point down only.

Every ``import`` of a ``codeq_cli`` module, at module level or inside a
function, is read from the source with :mod:`ast`; a module may import from its
own package and from packages of a lower layer, never from a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "codeq_cli"

# Bottom to top, as drawn in docs/architecture.md. The foundation modules
# (errors, _io, _version) sit below every package.
LAYERS = ["<foundation>", "core", "models", "data", "formats", "train", "commands", "cli"]
RANK = {name: i for i, name in enumerate(LAYERS)}
RANK["testing"] = RANK["core"]  # the oracle imports nothing of codeq but the foundation
RANK["__main__"] = len(LAYERS)  # `python -m codeq_cli` runs the CLI
FOUNDATION = {"errors", "_io", "_version"}


def _unit(module: str) -> str:
    """``codeq_cli.core.bops`` → ``core``; foundation modules and the package root → ``<foundation>``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in FOUNDATION:
        return "<foundation>"
    return parts[1]


def _module_name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, pkg: Path = PKG) -> list[tuple[int, str]]:
    """``(line, module)`` for every codeq_cli import in the file (relative ones resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = _module_name(path, pkg).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "codeq_cli"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "codeq_cli":
                continue
            # `from codeq_cli.core import bops` imports the module codeq_cli.core.bops
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                is_module = (pkg.parent / Path(*candidate.split("."))).with_suffix(".py").exists()
                found.append((node.lineno, candidate if is_module else target))
    return found


def _sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p != PKG / "__init__.py")  # the root's lazy table names all


def test_every_module_belongs_to_a_layer():
    units = {_unit(_module_name(p)) for p in _sources()}
    assert units <= set(RANK), f"packages missing from the layer list: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down(path):
    source = _unit(_module_name(path))
    upward = [
        f"line {line}: {target} ({_unit(target)}) is above {source}"
        for line, target in _imports(path)
        if RANK[_unit(target)] > RANK[source]
    ]
    assert not upward, "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself: upward imports in a core module, absolute and relative, are reported."""
    pkg = tmp_path / "codeq_cli"
    for rel in ("core/probe.py", "cli/app.py", "formats/checkpoint.py"):
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text("", encoding="utf-8")
    probe = pkg / "core" / "probe.py"
    probe.write_text("def _bad():\n    from codeq_cli.cli import app\n\nfrom ..formats.checkpoint import save\n", encoding="utf-8")
    targets = [t for _, t in _imports(probe, pkg)]
    assert sorted(targets) == ["codeq_cli.cli.app", "codeq_cli.formats.checkpoint"]
    assert all(RANK[_unit(t)] > RANK["core"] for t in targets)


def test_foundation_imports_no_package():
    for name in FOUNDATION:
        path = PKG / f"{name}.py"
        assert all(_unit(t) == "<foundation>" for _, t in _imports(path)), name


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of module imports (one per strongly connected component of two or more, or a self-import)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _typing_only_lines(path: Path) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks: imports for annotations, never run."""
    lines = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _module_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Module → the package modules it imports when it runs (annotation-only imports left out)."""
    modules = {_module_name(p, pkg): p for p in pkg.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        typing_only = _typing_only_lines(path)
        graph[name] = {t for line, t in _imports(path, pkg) if t in modules and t != name and line not in typing_only}
    return graph


def test_no_two_modules_import_each_other():
    """Within a package too, imports form no cycle (issue 21: core/act_quant and core/insert did), lazy ones included."""
    graph = _module_graph()
    graph.pop("codeq_cli", None)  # the root's lazy table names every public module
    assert _cycles(graph) == []


def test_the_cycle_check_catches_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
