"""Imports point one way, down the layers, with no circles (docs/architecture.md, "Layers").

1. ``core``: errors, config, data layout, atomic writes, hashing, the Spark session factory;
2. libraries: ``querylog`` (data), ``data_quality``, ``trainers`` (ml);
3. stages: ``jobs``, which never import each other;
4. orchestration: ``pipelines`` (stage list, flow, tracking, registry, retrain, sweep, report,
   failures);
5. the CLI: ``pipelines.cli`` and ``pipelines.__main__``.

A module may import its own layer or lower ones. A stage script's ``if __name__ ==
"__main__":`` block is the CLI's entry (layer 5). An import inside a function is allowed only
for start-up speed, and says so in a comment beside it or above it. Run by ``make lint``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "querylog", "data_quality", "trainers", "jobs", "pipelines")
TOP = {"pipelines.cli", "pipelines.__main__"}


def layer(module: str) -> int:
    if module in TOP:
        return 5
    return {"core": 1, "querylog": 2, "data_quality": 2, "trainers": 2, "jobs": 3}.get(
        module.split(".")[0], 4
    )


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import name refers to (``pkg.mod.attr`` → ``pkg.mod``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imports(path: Path) -> list[tuple[str, int, bool, bool]]:
    """``(module, line, inside a function, under the __main__ guard)`` per project import."""
    found: list[tuple[str, int, bool, bool]] = []

    def visit(node: ast.AST, in_function: bool, in_main: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                names = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif child.module and child.level == 0:
                    names = [f"{child.module}.{a.name}" for a in child.names] or [child.module]
                for name in names:
                    target = _resolve(name)
                    if target:
                        found.append((target, child.lineno, in_function, in_main))
            visit(
                child,
                in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef),
                in_main or _is_main_guard(child),
            )

    visit(ast.parse(path.read_text()), False, False)
    return found


def _lazy_imports_without_reason(path: Path) -> list[int]:
    """Lines of imports inside functions with no comment in their block of imports."""
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    bad = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            i = node.lineno - 1
            block = [lines[j] for j in range(node.lineno - 1, node.end_lineno)]
            j = i - 1
            while j >= 0 and (
                lines[j].strip().startswith(("import ", "from ", "#")) or not lines[j].strip()
            ):
                block.append(lines[j])
                j -= 1
            k = node.end_lineno
            while k < len(lines) and lines[k].strip().startswith(("import ", "from ", "#")):
                block.append(lines[k])
                k += 1
            if not any("#" in line for line in block):
                bad.append(node.lineno)
    return bad


def test_imports_point_down_the_layers() -> None:
    upward = []
    for module, path in MODULES.items():
        for target, line, _, in_main in imports(path):
            src = 5 if in_main else layer(module)
            if layer(target) > src:
                upward.append(f"{path.relative_to(ROOT)}:{line} {module} → {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_stages_do_not_import_each_other() -> None:
    crossing = [
        f"{path.relative_to(ROOT)}:{line} {module} → {target}"
        for module, path in MODULES.items()
        if module.startswith("jobs.")
        for target, line, _, in_main in imports(path)
        if target.startswith("jobs.") and target != module and not in_main
    ]
    assert not crossing, "stages that import another stage:\n" + "\n".join(crossing)


def test_no_import_circles() -> None:
    graph = {
        m: {t for t, _, _, in_main in imports(p) if t != m and not in_main}
        for m, p in MODULES.items()
    }
    # packages import their __init__ implicitly; an __init__ importing nothing is no edge
    state: dict[str, int] = {}
    cycles: list[str] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" → ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                walk(nxt, [*stack, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_imports_inside_functions_say_why() -> None:
    silent = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in MODULES.values()
        for line in _lazy_imports_without_reason(path)
    ]
    assert not silent, (
        "imports inside functions are for start-up speed only, and say so in a comment:\n"
        + "\n".join(silent)
    )


def test_the_checker_sees_a_planted_upward_import(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from pipelines.flow import run_pipeline\n")
    assert imports(planted) == [("pipelines.flow", 2, True, False)]
    assert _lazy_imports_without_reason(planted) == [2]
    assert layer("core.config") < layer("trainers.trainer") < layer("jobs.train")
    assert layer("jobs.train") < layer("pipelines.flow") < layer("pipelines.cli")
