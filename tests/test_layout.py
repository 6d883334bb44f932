"""The folder tree is the architecture diagram: each room imports only the rooms below it.

Every import in the package counts, including the ones inside functions and under TYPE_CHECKING: a lazy import
that goes upward is still a cycle in the design, only one that fails later.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llm_retrofit"

# Bottom to top. A module may import its own room and any room listed before it.
ROOMS = [
    {"errors", "_version", "architectures"},
    {"io"},
    {"plan", "spec"},  # the plan, and the Patcher protocol that returns plans (spec types plan; plan names Patcher)
    {"modeling"},
    {"evaluation"},
    {"patchers"},
    {"training"},
    {"publishing"},
    {"recipes"},
    {"convert", "api", "cli", "__init__", "__main__"},
]
RANK = {room: rank for rank, rooms in enumerate(ROOMS) for room in rooms}


def room_of(module: str) -> str:
    """`llm_retrofit.io.checkpoint` -> `io`; the package root itself -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """The llm_retrofit modules `path` imports, as absolute names."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target == "llm_retrofit":  # `from .. import x` names submodules or root attributes
                found |= {f"llm_retrofit.{alias.name}" for alias in node.names}
            elif target.startswith("llm_retrofit"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("llm_retrofit")}
    return found


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
