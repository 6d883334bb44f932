"""The contract every bad input is held to, for the corpus in this folder.

`refuse(args, expect=...)` runs `retrofit ARGS` in this process and asserts one clear error: a non-zero exit, no
traceback (click printed our message and exited), the message naming the problem (`expect`), every `untouched`
directory byte-identical with the same modes, and no output or hidden staging directory left behind.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from click.testing import CliRunner

from llm_retrofit.cli import main


def tree_state(path: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every entry under `path` (hidden ones included) with its mode and its bytes (a link: its target)."""
    state: dict[str, tuple[int, bytes | str | None]] = {}
    for entry in [path, *sorted(path.rglob("*"))]:
        info = entry.lstat()
        if stat.S_ISLNK(info.st_mode):
            content: bytes | str | None = os.readlink(entry)
        elif stat.S_ISREG(info.st_mode):
            content = entry.read_bytes()
        else:
            content = None
        state[str(entry.relative_to(path))] = (stat.S_IMODE(info.st_mode) | stat.S_IFMT(info.st_mode), content)
    return state


def leftovers(directory: Path) -> list[str]:
    """Hidden staging or backup directories of ours in `directory`."""
    return sorted(p.name for p in directory.glob(".*.retrofit-*")) if directory.is_dir() else []


def refuse(
    args: Sequence[str],
    *,
    expect: str,
    untouched: Sequence[Path] = (),
    absent: Sequence[Path] = (),
    input: str | None = None,
) -> str:
    """Run `retrofit ARGS` and check it fails as a user deserves; returns the message for further checks."""
    before = {path: tree_state(path) for path in untouched}
    result = CliRunner().invoke(main, [str(a) for a in args], input=input)
    output = result.output
    assert result.exit_code != 0, f"`retrofit {' '.join(map(str, args))}` succeeded:\n{output}"
    assert isinstance(result.exception, SystemExit), f"a raw exception escaped: {result.exception!r}\n{output}"
    assert "Traceback" not in output, output
    assert expect.lower() in output.lower(), f"expected {expect!r} in the message:\n{output}"
    for path in untouched:
        assert tree_state(path) == before[path], f"{path} changed"
        assert not leftovers(path.parent), f"left behind beside {path}: {leftovers(path.parent)}"
    for path in absent:
        assert not path.exists(), f"{path} was left behind"
        assert not leftovers(path.parent), f"left behind beside {path}: {leftovers(path.parent)}"
    return output
