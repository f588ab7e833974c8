"""The code's shape, checked against docs/architecture.md: no library file over 400 lines; each layer of the drawing
imports only the layers drawn under it; library code never imports benchmarks/ or tests/; and the files of one
package import each other without a circle. Every import counts, lazy and TYPE_CHECKING ones included.

The checks read the sources as a {path: text} map, so the tests below can plant an import and watch it caught.
"""
from __future__ import annotations

import ast
import re

from conftest import ROOT

ARCHITECTURE = ROOT / "docs" / "architecture.md"
MAX_LINES = 400
OUTSIDE_LIBRARY = ("benchmarks", "tests")


def drawn_layers(text: str | None = None) -> list[list[str]]:
    """The drawing's rows, top first: each a list of packages ('server') and modules ('errors', 'generate')."""
    text = ARCHITECTURE.read_text(encoding="utf-8") if text is None else text
    drawing = re.search(r"```\n(.*?)```", text, re.S).group(1)
    layers = []
    for line in drawing.splitlines():
        names = re.findall(r"^(?:\S+(?:/|\.py)(?:\s+|$))+", line)
        if names:
            layers.append([n.rstrip("/").removesuffix(".py") for n in names[0].split()])
    return layers


def layer_of(layers: list[list[str]]) -> dict[str, int]:
    return {name: depth for depth, row in enumerate(layers) for name in row}


def library_sources(layers: list[list[str]]) -> dict[str, str]:
    """{path relative to the root: source} of every file in the drawing: the packages' files and the modules."""
    sources = {}
    for name in (n for row in layers for n in row):
        paths = sorted((ROOT / name).glob("*.py")) if (ROOT / name).is_dir() else [ROOT / f"{name}.py"]
        for path in paths:
            sources[str(path.relative_to(ROOT))] = path.read_text(encoding="utf-8")
    return sources


def imports(source: str, package: str | None, modules: set[str]) -> set[str]:
    """Modules a file imports, anywhere in it: `from x import y` is x.y when that is one of `modules`, else x;
    relative imports are resolved within `package`."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(p for p in (package, module) if p)
            found.update(f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names)
    return found


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def layout_problems(sources: dict[str, str], layers: list[list[str]]) -> list[str]:
    """Every import that goes against the drawing, as one line each."""
    depth = layer_of(layers)
    modules = {module_name(path) for path in sources}
    problems, edges = [], {}
    for path, source in sources.items():
        top = module_name(path).split(".")[0]
        package = top if "/" in path else None
        for name in sorted(imports(source, package, modules)):
            target = name.split(".")[0]
            if target in OUTSIDE_LIBRARY:
                problems.append(f"{path} imports {name}: library code never imports {target}/")
            elif target in depth and target != top and depth[target] <= depth[top]:
                problems.append(f"{path} imports {name}, but the drawing puts {target} above {top} or beside it")
            elif target == top and package and name in modules and name != module_name(path):
                edges.setdefault(module_name(path), set()).add(name)
    problems += [f"files import each other in a circle: {' -> '.join(c)}" for c in circles(edges)]
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each set of nodes that import each other, or []."""
    found, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def problems_with(path: str, line: str) -> list[str]:
    """The problems of the library with `line` added at the end of `path`."""
    layers = drawn_layers()
    sources = library_sources(layers)
    sources[path] += f"\n{line}\n"
    return layout_problems(sources, layers)


def test_the_drawing_names_every_package_once():
    layers = drawn_layers()
    names = [n for row in layers for n in row]
    assert len(names) == len(set(names))
    assert layers[0] == ["generate", "serve", "evaluate"] and layers[-1] == ["errors"]
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - set(OUTSIDE_LIBRARY)
    assert packages <= set(names), packages - set(names)


def test_the_code_follows_the_drawing():
    layers = drawn_layers()
    assert layout_problems(library_sources(layers), layers) == []


def test_an_upward_import_is_caught_even_without_a_circle():
    assert problems_with("scoring/rules.py", "import server.protocol") == [
        "scoring/rules.py imports server.protocol, but the drawing puts server above scoring or beside it"]
    assert problems_with("configs/schema.py", "def f():\n    from dataset import records") == [
        "configs/schema.py imports dataset.records, but the drawing puts dataset above configs or beside it"]


def test_library_code_never_imports_benchmarks_or_tests():
    assert problems_with("models/build.py", "from benchmarks import timing") == [
        "models/build.py imports benchmarks: library code never imports benchmarks/"]
    assert problems_with("generate.py", "import tests.conftest") == [
        "generate.py imports tests.conftest: library code never imports tests/"]


def test_a_circle_between_files_of_one_package_is_caught():
    assert problems_with("decoding/workspace.py", "from decoding.search import NEG") == [
        "files import each other in a circle: decoding.search -> decoding.workspace -> decoding.search"]
    typing_only = problems_with("decoding/workspace.py", "if TYPE_CHECKING:\n    from decoding.fast import Fast")
    assert typing_only == ["files import each other in a circle: decoding.fast -> decoding.graphs -> "
                           "decoding.search -> decoding.workspace -> decoding.fast"]


def test_no_library_file_is_over_400_lines():
    sources = library_sources(drawn_layers())
    long = {path: n for path, text in sources.items() if (n := len(text.splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_drawing_is_read_from_the_document():
    text = "intro\n```\na.py   b.py      thin\npkg/       words\nerrors.py  words\n```\n"
    assert drawn_layers(text) == [["a", "b"], ["pkg"], ["errors"]]
