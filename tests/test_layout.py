"""The folder tree is the architecture diagram: each room imports only the rooms below it, no two files import each
other (directly or around a loop), and no function is too long to read.

Every import in the package counts, including the ones inside functions and under TYPE_CHECKING: a lazy import
that goes upward, or that closes a loop, is still a cycle in the design, only one that fails later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llm_retrofit"

# Bottom to top. A module may import its own room and any room listed before it.
ROOMS = [
    {"errors", "_version", "architectures"},
    {"io"},
    {"plan"},  # the tensor plan and its executors; the patchers they run are a Protocol there, not imported
    {"spec"},  # the Patcher base class and the spec language: a patcher returns a plan
    {"modeling"},
    {"evaluation"},
    {"patchers"},
    {"training"},
    {"publishing"},
    {"recipes"},
    {"convert", "export", "api", "cli", "__init__", "__main__"},
]
RANK = {room: rank for rank, rooms in enumerate(ROOMS) for room in rooms}


def room_of(module: str) -> str:
    """`llm_retrofit.io.checkpoint` -> `io`; the package root itself -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    """`llm_retrofit/io/checkpoint.py` -> `llm_retrofit.io.checkpoint`; a package's `__init__.py` -> the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(path: Path) -> Iterator[tuple[str, tuple[str, ...]]]:
    """(absolute module, names imported from it) for every import statement in `path`; no names for `import x`."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = list(parts[:-1])  # a module's package; for an __init__.py, the package it initialises
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield target, tuple(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()


def imports_of(path: Path) -> set[str]:
    """The llm_retrofit modules `path` imports, as absolute names."""
    found = set()
    for target, names in import_statements(path):
        if target == "llm_retrofit" and names:  # `from .. import x` names submodules or root attributes
            found |= {f"llm_retrofit.{name}" for name in names}
        elif target.startswith("llm_retrofit"):
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules (files) it imports. `from .io import checkpoint` is an edge to the file
    io/checkpoint.py, `from .io.commit import x` one to io/commit.py."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        graph[module] = set()
        for target, names in import_statements(path):
            if target.split(".")[0] != "llm_retrofit":
                continue
            submodules = {f"{target}.{name}" for name in names} & files.keys()
            graph[module] |= submodules or {target}
        graph[module].discard(module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of modules that import one another (strongly connected components, Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for neighbour in sorted(graph.get(node, ())):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            group = {stack.pop()}
            while node not in group:
                group.add(stack.pop())
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest cycle from the group's first module back to itself, through the group only (breadth first)."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for neighbour in sorted(graph[node] & group):
                if neighbour == start:
                    return paths[node] + [start]
                if neighbour not in paths:
                    paths[neighbour] = paths[node] + [neighbour]
                    following.append(neighbour)
        frontier = following
    raise AssertionError(f"{group} is not strongly connected")


def test_every_module_sits_in_a_known_room() -> None:
    rooms = {room_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert rooms <= set(RANK), f"modules outside the rooms of this test: {rooms - set(RANK)}"


def test_imports_only_go_downward() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for target in imports_of(path):
            if RANK[room_of(target)] > RANK[room_of(module)]:
                upward.append(f"{module} imports {target}")
    assert not upward, "imports that go up a room:\n" + "\n".join(upward)


def test_nothing_below_the_root_imports_the_package_root() -> None:
    """`from .. import __version__` from below would import the whole package (and every room) first."""
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__main__.py" and "llm_retrofit" in imports_of(path)
    ]
    assert not offenders, offenders


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert sorted(cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_reads_every_kind_of_import() -> None:
    graph = import_graph()
    assert "llm_retrofit.errors" in graph["llm_retrofit.io.commit"]  # from ..errors import ...
    assert "llm_retrofit.modeling.remote_code" in graph["llm_retrofit.training.finetune"]  # inside the function
    assert "llm_retrofit.recipes.runner" in graph["llm_retrofit.recipes"]  # a package's __init__
    assert "transformers" not in {target.split(".")[0] for targets in graph.values() for target in targets}


def test_no_two_modules_import_each_other() -> None:
    """Not even around a loop through other files of one room: each loop is shown, module by module."""
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)



LONGEST_FUNCTION = 100
"""Lines from `def` to the last line of the body (ast's end_lineno - lineno); the standard is ~60."""


def test_no_function_is_too_long_to_read() -> None:
    lengths = sorted(
        ((node.end_lineno or node.lineno) - node.lineno, f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    )
    long = [f"{where}: {length} lines" for length, where in lengths if length >= LONGEST_FUNCTION]
    assert not long, f"functions of {LONGEST_FUNCTION} lines or more:\n" + "\n".join(long)
