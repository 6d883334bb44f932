"""The docs stay true to the code: a page per patcher, parameter tables that match the dataclass fields (names,
types, defaults), relative links that lead to files, and commands the command line accepts.

A patcher page (`docs/patchers/NAME.md`) has a `## Parameters` section holding one Markdown table:

    | parameter | type | default | meaning |
    | --- | --- | --- | --- |
    | `factor` | `float or none` | `none` | ... |

The default is written as it would be typed in a spec (`none`, `false`, `32`), and parsed here with the spec
language's own reader (`read_field`), so `32` and `32.0` are the same default; a field without one is `required`. A patcher
with no parameters says so in that section instead of a table. The last tests feed the checkers broken pages and
links, so each check is shown to fail when it should.

A command of a page is a line of a ```bash block that starts with `retrofit` (or runs `-m llm_retrofit` under
`accelerate launch`). It is accepted when the command line gets as far as the work itself: a finetune up to the
training (its settings, LoRA and distill specs validated), a patch up to loading the model (every spec parsed), a
conversion up to converting; any other command when its options parse.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
import typing
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import click
import pytest
import torch
from click.testing import CliRunner

from llm_retrofit.cli import main
from llm_retrofit.errors import PatchSpecError
from llm_retrofit.patchers import registry
from llm_retrofit.spec import Patcher, read_field

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PATCHER_PAGES = DOCS / "patchers"
REQUIRED = "required"


# -- the checkers ------------------------------------------------------------------------------------------------


def missing_pages(names: typing.Iterable[str], directory: Path) -> list[str]:
    """The registered patchers without a page in `directory`."""
    return sorted(name for name in names if not (directory / f"{name}.md").is_file())


def type_text(annotation: Any) -> str:
    """How a page writes a field's type: `int`, `float or none`, `random | uniform | hidden`, `dtype`, `path`."""
    if typing.get_origin(annotation) is Literal:
        return " | ".join(map(str, typing.get_args(annotation)))
    if typing.get_origin(annotation) in (typing.Union, type(int | None)):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(type_text(a) for a in options)
        return f"{text} or none" if len(options) < len(typing.get_args(annotation)) else text
    if annotation is torch.dtype:
        return "dtype"
    if annotation is Path:
        return "path"
    return annotation.__name__


def parameter_rows(text: str) -> list[list[str]] | None:
    """The cells of the table under `## Parameters` (header and separator dropped), or None without such a section."""
    section = re.search(r"^## Parameters[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if section is None:
        return None
    rows = []
    for line in section.group(1).splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip("|"))]
        if cells[0].lower() == "parameter" or set(cells[0]) <= set("-: "):
            continue
        rows.append(cells)
    return rows


def unquote(cell: str) -> str | None:
    """The text of a cell that is one `code` span, or None."""
    match = re.fullmatch(r"`([^`]*)`", cell.strip())
    return match.group(1) if match else None


def page_problems(cls: type[Patcher], text: str) -> list[str]:
    """Where a patcher page's parameter table disagrees with the patcher's fields."""
    rows = parameter_rows(text)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    if rows is None:
        return ["no '## Parameters' section"]
    problems = []
    documented = {}
    for cells in rows:
        name = unquote(cells[0])
        if name is None or len(cells) < 4:
            problems.append(f"row {' | '.join(cells)!r}: expected | `name` | `type` | default | meaning |")
            continue
        if name in documented:
            problems.append(f"{name} is documented twice")
        documented[name] = cells
        if name not in fields:
            problems.append(f"{name} is not a parameter of {cls.name} (it has {', '.join(fields) or 'none'})")
            continue
        field, hint = fields[name], hints[name]
        if unquote(cells[1]) != type_text(hint):
            problems.append(f"{name}: type {cells[1]!r}, the code says `{type_text(hint)}`")
        problems += default_problems(cls, name, field, hint, cells[2])
    problems += [f"{name} is a parameter of {cls.name} but the page does not list it"
                 for name in fields if name not in documented]
    return problems


def default_problems(cls: type[Patcher], name: str, field: dataclasses.Field[Any], hint: Any, cell: str) -> list[str]:
    has_default = field.default is not dataclasses.MISSING
    if cell.strip() == REQUIRED:
        return [] if not has_default else [f"{name}: documented as required, the code's default is {field.default!r}"]
    raw = unquote(cell)
    if raw is None:
        return [f"{name}: default {cell!r} is neither `VALUE` nor {REQUIRED}"]
    if not has_default:
        return [f"{name}: documented default {raw!r}, but the code requires it"]
    try:
        value = read_field(cls, name, raw)
    except PatchSpecError as e:
        return [f"{name}: documented default {raw!r} does not parse: {e}"]
    if value != field.default or type(value) is not type(field.default):
        return [f"{name}: documented default {raw!r}, the code's is {field.default!r}"]
    return []


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def broken_links(path: Path) -> list[str]:
    """The relative links of a Markdown file (outside fenced code) that lead to no file or directory."""
    broken, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor on the same page
            file = target.split("#", 1)[0]
            if not (path.parent / file).exists():
                broken.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}: {target}")
    return broken


ENVIRONMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")


def page_commands(path: Path) -> list[list[str]]:
    """The llm-retrofit commands in the ```bash blocks of a page, as the arguments after `retrofit`: comments and
    leading environment assignments dropped, `accelerate launch ... -m llm_retrofit ARGS` read as `retrofit ARGS`."""
    commands, in_bash = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_bash = not in_bash and line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        words = shlex.split(line, comments=True)
        while words and ENVIRONMENT.fullmatch(words[0]):
            words.pop(0)
        if words[:1] == ["retrofit"]:
            commands.append(words[1:])
        elif words[:2] == ["accelerate", "launch"] and "llm_retrofit" in words:
            commands.append(words[words.index("llm_retrofit") + 1:])
    return commands


class Accepted(Exception):
    """Raised instead of the work itself: the command line accepted everything before it."""


# Where each command starts its work: (module, function) replaced by one that raises Accepted.
WORK = {"finetune": ("llm_retrofit.training.finetune", "finetune"), "patch": ("llm_retrofit.io.checkpoint", "load_checkpoint"),
        "convert": ("llm_retrofit.convert", "convert")}


def command_problem(arguments: list[str]) -> str | None:
    """Why `retrofit ARGUMENTS` is refused before any work, or None when the command line accepts it."""
    if arguments and arguments[0] in WORK:
        module, function = WORK[arguments[0]]
        with mock.patch.object(importlib.import_module(module), function, side_effect=Accepted):
            result = CliRunner().invoke(main, arguments)
        return None if isinstance(result.exception, Accepted) else (result.output + repr(result.exception)).strip()
    context = click.Context(main, info_name="retrofit")
    command = main.get_command(context, arguments[0]) if arguments else None
    if command is None:
        return f"No such command: {' '.join(arguments[:1])!r}"
    try:
        command.make_context(arguments[0], list(arguments[1:]), parent=context)
    except click.ClickException as e:
        return e.format_message()
    return None


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


# -- the docs ----------------------------------------------------------------------------------------------------


def test_every_registered_patcher_has_a_page() -> None:
    assert missing_pages(registry(), PATCHER_PAGES) == []


@pytest.mark.parametrize("name", sorted(registry()))
def test_a_patcher_page_lists_exactly_its_parameters_with_their_types_and_defaults(name: str) -> None:
    page = PATCHER_PAGES / f"{name}.md"
    if not page.is_file():
        pytest.fail(f"{page.relative_to(ROOT)} is missing")
    assert page_problems(registry()[name], page.read_text()) == []


def test_every_patcher_page_is_of_a_registered_patcher() -> None:
    pages = {p.stem for p in PATCHER_PAGES.glob("*.md")}
    assert pages - set(registry()) == set(), "a page for a patcher that no longer exists"


def test_the_index_names_every_page() -> None:
    index = (DOCS / "index.md").read_text()
    for page in sorted(DOCS.rglob("*.md")):
        if page.name != "index.md":
            assert f"({page.relative_to(DOCS).as_posix()})" in index, f"docs/index.md does not link {page.name}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(path: Path) -> None:
    assert broken_links(path) == []


def test_the_readme_links_the_pages() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in ("docs/index.md", "docs/index.md#patchers", "docs/recipes.md", "docs/evaluation.md", "docs/publishing.md",
                 "docs/troubleshooting.md", "docs/finetuning.md", "docs/ARCHITECTURE.md", "docs/checkpoints.md"):
        assert f"]({page}" in readme, f"README.md does not link {page}"


FINETUNING = DOCS / "finetuning.md"


def test_the_finetuning_page_shows_every_kind_of_finetune() -> None:
    commands = [" ".join(c) for c in page_commands(FINETUNING)]
    for option in ("--train new_layers", "--lora lora:", "use_dora=true", "merge=false", "--s2-attn", "--distill teacher=",
                   "cache=true", "--data bundled:python-chat", "--lr-group"):
        assert any(option in c for c in commands), f"docs/finetuning.md has no command with {option}"


@pytest.mark.parametrize("arguments", page_commands(FINETUNING), ids=" ".join)
def test_the_command_line_accepts_every_command_of_the_finetuning_page(arguments: list[str]) -> None:
    assert command_problem(arguments) is None


# -- the checkers fail when they should ----------------------------------------------------------------------------


def test_a_patcher_without_a_page_is_reported(tmp_path: Path) -> None:
    (tmp_path / "yarn.md").write_text((PATCHER_PAGES / "yarn.md").read_text())
    assert missing_pages(["yarn", "ntk"], tmp_path) == ["ntk"]


def test_a_parameter_the_patcher_lacks_is_reported() -> None:
    page = (PATCHER_PAGES / "yarn.md").read_text().replace("`beta_fast`", "`beta_fastest`")
    problems = page_problems(registry()["yarn"], page)
    assert any("beta_fastest is not a parameter of yarn" in p for p in problems), problems
    assert any("beta_fast is a parameter of yarn but the page does not list it" in p for p in problems), problems


def test_a_wrong_default_is_reported() -> None:
    yarn = registry()["yarn"]
    page = (PATCHER_PAGES / "yarn.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| `beta_fast`"))
    assert any("documented default '16'" in p for p in page_problems(yarn, page.replace(row, row.replace("`32`", "`16`"))))
    required = (PATCHER_PAGES / "dus.md").read_text()
    row = next(line for line in required.splitlines() if line.startswith("| `m`"))
    assert page_problems(registry()["dus"], required.replace(row, row.replace(REQUIRED, "`8`")))


def test_a_wrong_type_is_reported() -> None:
    page = (PATCHER_PAGES / "moe.md").read_text().replace("| `int` | `8` |", "| `float` | `8` |")
    assert any("num_experts: type" in p for p in page_problems(registry()["moe"], page))


def test_a_page_without_a_parameter_table_is_reported() -> None:
    assert page_problems(registry()["dtype"], "# dtype\n\nNo table here.\n") == ["no '## Parameters' section"]


def test_a_broken_relative_link_is_reported(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [anchor](there.md#x) [web](https://example.com) [gone](nowhere.md#y)\n"
                    "```\n[in code](also-nowhere.md)\n```\n")
    assert [link.rsplit(": ", 1)[1] for link in broken_links(page)] == ["nowhere.md#y"]


def test_page_commands_reads_bash_blocks_only(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("retrofit inspect outside\n```bash\nretrofit inspect a   # a comment\n"
                    "X=1 accelerate launch --num_processes 2 -m llm_retrofit finetune m -o 'out dir'\npython -c 1\n```\n"
                    "```text\nretrofit inspect in-text\n```\n```bash\nretrofit inspect b\n```\n")
    assert page_commands(page) == [["inspect", "a"], ["finetune", "m", "-o", "out dir"], ["inspect", "b"]]


@pytest.mark.parametrize(("arguments", "message"), [
    (["finetune", "m", "--steps", "1", "--no-such-option", "-o", "out"], "No such option"),
    (["finetune", "m", "--lora", "lora:rank=8", "--steps", "1", "-o", "out"], "rank"),
    (["finetune", "m", "--distill", "teacher=base,alpha=2", "--steps", "1", "-o", "out"], "alpha"),
    (["finetune", "m", "-o", "out"], "steps"),
    (["patch", "m", "--patch", "yarn:factr=2", "-o", "out"], "factr"),
    (["inspect", "m", "--no-such-option"], "No such option"),
    (["no-such-command"], "No such command"),
])
def test_a_command_the_command_line_refuses_is_reported(arguments: list[str], message: str) -> None:
    problem = command_problem(arguments)
    assert problem is not None and message in problem, problem
