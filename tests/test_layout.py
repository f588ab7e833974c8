"""The code's shape, checked: no library file over 400 lines, and imports between packages point one way."""
import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("configs", "dataset", "models", "decoding", "lynx", "server", "scoring")
MAX_LINES = 400


def library_files():
    for package in PACKAGES:
        yield from sorted((ROOT / package).glob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages a module imports (at any depth of the file: lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in PACKAGES)
    return found


def package_graph() -> dict[str, set[str]]:
    graph = {package: set() for package in PACKAGES}
    for path in library_files():
        package = path.parent.name
        graph[package] |= imported_packages(path) - {package}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of packages that import each other in a circle, or None."""
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, trail + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in graph:
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_no_library_file_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in library_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_import_cycle_between_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, f"packages import each other in a circle: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
