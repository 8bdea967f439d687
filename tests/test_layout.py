"""The package's shape holds: imports only go down the layer order of DESIGN.md, and never in a circle.

Every ``import`` is counted, also those inside functions and under ``TYPE_CHECKING``: a lazy import
that goes upward is still a dependency upward.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "classlab"

# Higher imports lower, never the reverse. Verbs come first, in the order they may use each other
# (sweep runs train; predict --backend onnx exports); then the layers; at the ground config/run/errors.
RANKS = {
    "classlab": 100,
    "classlab.__main__": 100,
    "classlab.cli": 90,
    "classlab.sweep": 80,
    "classlab.train": 70,
    "classlab.report": 65,
    "classlab.compare": 60,
    "classlab.evaluate": 50,
    "classlab.predict": 40,
    "classlab.export": 30,
    "classlab.engine": 20,
    "classlab.models": 15,
    "classlab.data": 10,
    "classlab.config": 3,
    "classlab.run": 2,
    "classlab.errors": 1,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    while module not in RANKS:
        module = module.rpartition(".")[0]
    return RANKS[module]


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path], package: str | None = None) -> set[str]:
    """The classlab modules one file imports, anywhere in it (``package``: the file's package, for relative imports)."""
    if package is None:
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("classlab"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("classlab"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        assert rank(name) > 0, name


def test_imports_only_go_down() -> None:
    upward = [
        f"{src} imports {dst}"
        for src, targets in graph().items()
        for dst in targets
        if rank(dst) > rank(src) and not dst.startswith(src + ".")  # a package may import its own modules
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    edges = graph()
    # A package's __init__ importing its own submodules is how registration works, and Python runs a
    # parent package before its children anyway: those edges are not dependencies between ideas.
    edges = {src: {d for d in dsts if not d.startswith(src + ".")} for src, dsts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk above finds a lazy import inside a function (a checker that sees nothing would pass)."""
    known = {"classlab.train": tmp_path / "train.py", "classlab.data.x": SRC / "data" / "x.py"}
    code = tmp_path / "x.py"
    code.write_text("def f():\n    from classlab.train import train\n    return train\n", encoding="utf-8")
    assert imports_of(code, known, package="classlab.data") == {"classlab.train"}
    assert rank("classlab.train") > rank("classlab.data.x")


def test_no_long_functions() -> None:
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
