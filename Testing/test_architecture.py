"""The backend's shape, read from its source: the import graph, the product path's boundary, sizes.

The product path is everything ``latentharmonize.analyze_command`` (``analyze``, and ``pipeline.analyze_image``) imports: a CT in, a tissue map out. The research wing
(``training``, ``evaluation``, ``phantom``) and the cohort runner (``batch``) may import it, never the reverse.
docs/contributing.md states these rules; this file keeps them.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "LatentHarmonize" / "latentharmonize"
RESEARCH = ("latentharmonize.training", "latentharmonize.evaluation", "latentharmonize.phantom",
            "latentharmonize.batch")
MAX_PRODUCT_FUNCTION_LINES = 60
MAX_EVALUATION_FILE_LINES = 400


def module_name(path: Path) -> str:
    parts = ("latentharmonize",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The backend modules an import statement in module ``name`` loads (parent packages included)."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = name if _is_package(name) else name.rsplit(".", 1)[0]
        for _ in range(node.level - 1):
            base = base.rsplit(".", 1)[0]
        stem = (node.module or "") if node.level == 0 else ".".join(filter(None, [base, node.module]))
        # "from . import options" names a module; "from .grid import ModelGrid" a name in one
        targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in MODULES else stem for alias in node.names]
    # A module's own packages are loaded before it, so an edge to them is no dependency (and no cycle).
    parts = name.split(".")
    ancestors = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    loaded = set()
    for target in targets:
        if target.split(".")[0] != "latentharmonize":
            continue
        steps = target.split(".")
        loaded.update(".".join(steps[:i]) for i in range(1, len(steps) + 1) if ".".join(steps[:i]) in MODULES)
    return sorted(loaded - ancestors)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str) -> tuple[set, list]:
    """(modules imported when ``name`` loads, [(line, module)] imported inside functions or classes)."""
    tree = ast.parse(MODULES[name].read_text())
    top, nested = set(), []

    def visit(node, depth):
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, child):
                    (top.add(target) if depth == 0 else nested.append((child.lineno, target)))
            inner = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            visit(child, inner)

    visit(tree, 0)
    return top, nested


GRAPH = {name: imports(name)[0] for name in MODULES}


def closure(start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(GRAPH[name])
    return seen


PRODUCT_PATH = closure("latentharmonize.analyze_command")  # the file wrapper, and with it pipeline.analyze_image


def test_no_backend_module_imports_inside_a_function():
    hidden = {name: nested for name in MODULES if (nested := imports(name)[1])}
    assert not hidden, f"imports inside functions hide the graph; move them to the top: {hidden}"


def test_the_import_graph_has_no_cycle():
    state, cycles = {}, []

    def walk(name, stack):
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                walk(target, stack + [target])
        state[name] = "done"

    for name in MODULES:
        if name not in state:
            walk(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_the_product_path_never_imports_the_research_wing():
    assert {"latentharmonize.pipeline", "latentharmonize.patches", "latentharmonize.bundle",
            "latentharmonize.lungmask"} <= PRODUCT_PATH
    leaks = sorted(m for m in PRODUCT_PATH if m.startswith(RESEARCH))
    assert not leaks, f"analyze reaches research code: {leaks}"


def test_contributing_md_names_the_product_path():
    """The product path row of docs/contributing.md names exactly the modules ``analyze`` reaches."""
    text = (PACKAGE.parents[1] / "docs" / "contributing.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| **product path**")).split("|")[2]
    row = re.sub(r"\([^)]*\)", "", row)  # the functions named in parentheses
    named = {"latentharmonize." + name.removesuffix(".py") for name in re.findall(r"`([a-z_]+(?:\.py)?)`", row)}
    assert named == PRODUCT_PATH, (f"missing: {sorted(PRODUCT_PATH - named)}; "
                                   f"not on the path: {sorted(named - PRODUCT_PATH)}")


def test_the_backend_never_imports_slicer():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            roots = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(r.split(".")[0] in ("slicer", "qt", "ctk") for r in roots), f"{name} imports {roots}"


@pytest.mark.parametrize("name", sorted(PRODUCT_PATH))
def test_product_path_functions_are_short(name):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(MODULES[name].read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_PRODUCT_FUNCTION_LINES]
    assert not long, f"{name}: split into named steps: {long}"


def test_evaluation_files_are_short():
    long = {p.name: n for p in (PACKAGE / "evaluation").glob("*.py")
            if (n := len(p.read_text().splitlines())) >= MAX_EVALUATION_FILE_LINES}
    assert not long, f"evaluation files over {MAX_EVALUATION_FILE_LINES} lines: {long}"


def test_the_graph_reader_sees_relative_and_nested_imports():
    """The checks above are only as good as the parser: a known edge, a known nested import and the module
    names must come out as the source says."""
    assert "latentharmonize.patches" in GRAPH["latentharmonize.bundle"]
    assert "latentharmonize.options" in GRAPH["latentharmonize.analyze_command"]
    tree_with_nested = "def f():\n    from .grid import ModelGrid\n"
    node = ast.parse(tree_with_nested).body[0].body[0]
    assert _resolve("latentharmonize.pipeline", node) == ["latentharmonize.grid"]


# ----------------------------------------------------------------------------- docs/architecture.md
ARCHITECTURE = PACKAGE.parents[1] / "docs" / "architecture.md"
QUOTED_CALL = re.compile(r"`([A-Za-z_][\w.]*)\(([^`()]*)\)")


def _module_of(cell: str) -> list[str]:
    """Backend modules named in a table cell: `grid.py` -> latentharmonize.grid, `training/` -> the package."""
    names = re.findall(r"`([\w/]+?)(?:\.py|/)`", cell)
    return [f"latentharmonize.{n.replace('/', '.')}" for n in names if f"latentharmonize.{n.replace('/', '.')}" in MODULES]


def quoted_signatures() -> list[tuple]:
    """(modules, quoted name, quoted parameter names) for every call quoted in the units table and in the
    contracts code block of docs/architecture.md."""
    quoted, modules = [], []
    for line in ARCHITECTURE.read_text().splitlines():
        if line.startswith("| `"):
            cells = line.split(" | ", 1)
            modules = _module_of(cells[0])
            text = cells[1] if len(cells) > 1 else ""
        elif line.startswith("# ") and line.rstrip().endswith((".py", "/")):
            modules, text = _module_of(f"`{line[2:].strip()}`"), ""
        elif modules and re.match(r"^[A-Za-z_][\w.]*\(", line):
            text = f"`{line.split(' -> ')[0].split('  #')[0].strip()}`"
        else:
            continue
        classes = tuple(re.findall(r"`([A-Z]\w+)`", text)) + tuple(re.findall(r"`([A-Z]\w+)\(", text))
        for name, params in QUOTED_CALL.findall(text):
            names = [p.split("=")[0].split(":")[0].strip().lstrip("*") for p in params.split(",") if p.strip()]
            quoted.append((tuple(modules), classes, name, [n for n in names if n and n != "/"]))
    return quoted


def _lookup(modules, classes, dotted: str):
    """The object a quoted name means: in the row's modules, as a method of a class the row names, or as a dotted
    path from the package root."""
    for module in modules:
        for prefix in ("",) + tuple(f"{c}." for c in classes):
            obj = importlib.import_module(module)
            try:
                for part in (prefix + dotted).split("."):
                    obj = getattr(obj, part)
                return obj
            except AttributeError:
                continue
    try:
        return importlib.import_module(f"latentharmonize.{dotted.rsplit('.', 1)[0]}").__dict__[dotted.rsplit(".", 1)[1]]
    except (ImportError, KeyError, IndexError):
        return None


def test_architecture_md_quotes_real_signatures():
    assert len(quoted_signatures()) > 20
    wrong = []
    for modules, classes, name, params in quoted_signatures():
        obj = _lookup(modules, classes, name)
        if obj is None:
            wrong.append(f"{name}: not found in {list(modules)}")
            continue
        real = [p for p in inspect.signature(obj).parameters.values() if p.name not in ("self", "cls")]
        if "..." in params:  # an abbreviated quote: the names it shows exist, in order
            named = [n for n in params if n != "..."]
            order = [p.name for p in real if p.name in named]
            if order != named:
                wrong.append(f"{name}({', '.join(params)}) but the code says {name}({', '.join(p.name for p in real)})")
            continue
        shown = [p.name for p in real[:len(params)]]
        left_out = [p.name for p in real[len(params):] if p.default is inspect.Parameter.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if params != shown or left_out:
            wrong.append(f"{name}({', '.join(params)}) but the code says {name}({', '.join(p.name for p in real)})")
    assert not wrong, "docs/architecture.md quotes signatures the code does not have:\n" + "\n".join(wrong)
