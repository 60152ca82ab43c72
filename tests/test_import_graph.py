"""The floor plan (docs/design.md): imports point down the data path, with no circles, and an import inside a
function says why it waits. Read from the source's syntax trees alone: nothing here is imported."""

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fairseq_moe_prune"


def package_modules() -> Dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, for its ``__init__.py``)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.AST) -> Iterator[Tuple[ast.stmt, bool]]:
    """Each import statement run when its module or function runs, and whether it sits inside a function;
    those under ``if TYPE_CHECKING:`` (annotations only, never run) are left out."""
    def walk(node: ast.AST, in_function: bool) -> Iterator[Tuple[ast.stmt, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child):
                for other in child.orelse:
                    yield from walk(other, in_function)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            else:
                yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                          ast.Lambda)))
    yield from walk(tree, False)


def targets(node: ast.stmt, module: str, is_package: bool, modules: Dict[str, Path]) -> Set[str]:
    """The package's modules an import statement runs: ``from P import n`` runs P.n where that is a module,
    else P itself (n is a name P defines)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            here = module.split(".") if is_package else module.split(".")[:-1]
            here = here[:len(here) - node.level + 1]
            base = ".".join(here + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    return {name for name in names if name in modules and name != module}


def import_graph() -> Dict[str, Set[str]]:
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[module] = set()
        for node, _ in imports(tree):
            graph[module] |= targets(node, module, path.name == "__init__.py", modules)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle through each strongly connected component of more than one module (or a module importing itself)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(module: str, path: List[str]) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def uncommented_imports(path: Path, root: Path = ROOT) -> List[str]:
    """In-function imports with no comment on their lines, on the lines of the imports just above them (one
    comment serves a block), or on the line above that block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tree = ast.parse("\n".join(lines), str(path))
    bad = []
    for node, in_function in imports(tree):
        if not in_function:
            continue
        if any("#" in line for line in lines[node.lineno - 1:node.end_lineno]):
            continue
        above = node.lineno - 2
        while above >= 0 and (lines[above].strip() == "" or lines[above].lstrip().startswith(("import ", "from "))):
            if "#" in lines[above]:
                break
            above -= 1
        if above >= 0 and "#" in lines[above] and (lines[above].lstrip().startswith(("#", "import ", "from "))):
            continue
        bad.append(f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return bad


def test_no_import_cycles_among_the_package_modules():
    graph = import_graph()
    assert len(graph) > 30 and "fairseq_moe_prune.layout" in graph["fairseq_moe_prune.stats"]  # the walk sees imports
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_key_layout_and_gating_sit_below_models_and_checkpoints():
    """layout.py imports only errors; the model's and the checkpoints' readers of it never import upwards."""
    graph = import_graph()
    assert graph["fairseq_moe_prune.layout"] == {"fairseq_moe_prune.errors"}
    for module in ("fairseq_moe_prune.checkpoints.extract", "fairseq_moe_prune.moe.gate",
                   "fairseq_moe_prune.moe.placement", "fairseq_moe_prune.stats"):
        assert not {target for target in graph[module] if target.startswith("fairseq_moe_prune.models.")
                    and target != "fairseq_moe_prune.models.task_routing"}, module


def test_every_import_inside_a_function_says_why():
    """An import waits only for an optional extra, start-up speed or the registration order, with a reason beside it."""
    paths = sorted((ROOT / PACKAGE).rglob("*.py")) + sorted((ROOT / "examples").rglob("*.py")) + sorted(
        (ROOT / "scripts").rglob("*.py"))
    bad = [line for path in paths for line in uncommented_imports(path)]
    assert bad == [], "in-function imports without a one-line reason:\n" + "\n".join(bad)


def test_the_comment_check_sees_a_bare_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('def f():\n    """Doc."""\n    import json\n\n\ndef g():\n    # start-up speed\n'
                      '    import json\n    from os import path\n\n    import re\n\n\ndef h():\n'
                      '    import json  # optional extra\n', encoding="utf-8")
    assert uncommented_imports(source, tmp_path) == ["m.py:3: import json"]
