"""The recipe format: YAML read with line numbers, checked against what each step kind accepts.

    name: llama-pro
    description: One line saying what the recipe does.
    inputs:                       # defaults, referenced as ${inputs.NAME}, changed with --set inputs.NAME=...
      data: bundled:python-docs
    steps:                        # run in order; each has one kind key: patch, finetune, eval, card, push
      - patch: expand             # any registered patcher ...
        with: {every: 4}          # ... and its parameters
      - finetune: {train: [new_layers], steps: 50, data: ["${inputs.data}"]}
      - eval: {data: ["${inputs.data}"], lengths: [512, 1024], compare_base: true}
      - card: {}

A step may carry `id:` (default: the patcher name, or the kind; a repeated one gets `-2`, `-3`), which `--set ID.KEY=V`
and `${steps.ID.KEY}` use. Values are YAML values or `${expression}`s, resolved when the step runs (see `runner`).
Unknown keys are refused with the line and the valid keys, which is what makes a misspelled `stpes:` an error
rather than a silently ignored default.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RetrofitError

TOP_LEVEL = {"name": True, "description": False, "inputs": False, "steps": True}
KINDS = ("patch", "finetune", "eval", "card", "push")
EVAL_KEYS = ("data", "lengths", "max_docs", "protocol", "stride", "passkey", "passkey_lengths", "passkey_depths",
             "passkey_trials", "batch_size", "compare_base", "plot", "dtype")
CARD_KEYS = ("base_model", "repo_id")
PUSH_KEYS = ("repo_id", "private", "revision", "create_pr", "commit_message")


class RecipeError(RetrofitError):
    """A recipe cannot be read or run: bad YAML, an unknown key or step, a bad override, an unresolvable value."""


@dataclass
class Step:
    kind: str
    id: str
    params: dict[str, Any]
    patcher: str | None = None
    line: int = 0

    def describe(self) -> str:
        return f"{self.kind} {self.patcher}" if self.patcher else self.kind


@dataclass
class Recipe:
    name: str
    description: str
    inputs: dict[str, Any]
    steps: list[Step]
    source: str = "<recipe>"
    text: str = ""
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict, repr=False)

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise RecipeError(
            f"{self.source}: no step {step_id!r}; the steps are {', '.join(s.id for s in self.steps)} (and `inputs`)."
        )


def builtin_directory() -> Path:
    return Path(__file__).parent


def builtin_names() -> list[str]:
    return sorted(path.stem for path in builtin_directory().glob("*.yaml"))


def recipe_text(name_or_path: str | Path) -> tuple[str, str]:
    """(source label, YAML text) of a built-in recipe name or a recipe file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; the built-in recipes are {', '.join(builtin_names())}.")
        return str(path), path.read_text(encoding="utf-8")
    builtin = builtin_directory() / f"{name_or_path}.yaml"
    if not builtin.is_file():
        raise RecipeError(
            f"no recipe {str(name_or_path)!r}; the built-in recipes are {', '.join(builtin_names())}, or pass a "
            "YAML file (`retrofit recipes show NAME > my.yaml` gives one to edit)."
        )
    return f"{name_or_path}.yaml", builtin.read_text(encoding="utf-8")


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    if isinstance(name_or_path, Recipe):
        return name_or_path
    source, text = recipe_text(name_or_path)
    return parse_recipe(text, source)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """YAML text -> a checked Recipe; every error names `source:LINE`."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        raise RecipeError(f"{source}:{line}: not valid YAML: {getattr(e, 'problem', e)}.") from None
    lines: dict[tuple[Any, ...], int] = {}
    data = _to_python(node, (), lines) if node is not None else None

    def fail(path: tuple[Any, ...], message: str) -> RecipeError:
        return RecipeError(f"{source}:{lines.get(path, 1)}: {message}")

    if not isinstance(data, dict):
        raise fail((), "a recipe is a mapping with name, description, inputs and steps.")
    for key in data:
        if key not in TOP_LEVEL:
            raise fail((key,), f"unknown key {key!r}; a recipe has {', '.join(TOP_LEVEL)}.")
    for key, required in TOP_LEVEL.items():
        if required and key not in data:
            raise fail((), f"the recipe has no {key!r}.")
    inputs = data.get("inputs") or {}
    if not isinstance(inputs, dict):
        raise fail(("inputs",), "inputs must be a mapping of NAME: default value.")
    if not isinstance(data["steps"], list) or not data["steps"]:
        raise fail(("steps",), "steps must be a non-empty list, e.g. `- patch: expand`.")
    steps: list[Step] = []
    for index, raw in enumerate(data["steps"]):
        steps.append(_step(raw, ("steps", index), lines, fail))
    _number_ids(steps, lines, fail)
    return Recipe(str(data["name"]), str(data.get("description") or ""), dict(inputs), steps, source, text, lines)


def _to_python(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> Any:
    """A composed YAML node -> plain Python values, recording the line of every path in `lines`."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), lines) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def _step(raw: Any, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int], fail: Any) -> Step:
    if not isinstance(raw, dict):
        raise fail(path, f"a step is a mapping with one of {', '.join(KINDS)}, e.g. `- finetune: {{steps: 100}}`.")
    kinds = [k for k in raw if k in KINDS]
    if len(kinds) != 1:
        unknown = [k for k in raw if k not in KINDS and k not in ("id", "with")]
        hint = f"unknown key {unknown[0]!r}; " if unknown else ""
        raise fail(path, f"{hint}a step has exactly one of {', '.join(KINDS)} (plus `id`, and `with` for a patch).")
    kind = kinds[0]
    allowed = {kind, "id"} | ({"with"} if kind == "patch" else set())
    for key in raw:
        if key not in allowed:
            raise fail(path + (key,), f"unknown key {key!r} in a {kind} step; it takes {', '.join(sorted(allowed))}.")
    if kind == "patch":
        from ..patchers import get_patcher

        name = raw["patch"]
        try:
            cls = get_patcher(str(name))
        except RetrofitError as e:
            raise fail(path + ("patch",), str(e)) from None
        params = raw.get("with") or {}
        if not isinstance(params, dict):
            raise fail(path + ("with",), f"`with` holds the {name} patch's parameters as a mapping.")
        _check_keys(params, [f.name for f in dataclasses.fields(cls)], path + ("with",), f"patch {name!r}", fail)
        return Step(kind, str(raw.get("id") or name), dict(params), str(name), lines.get(path, 0))
    params = raw[kind] if raw[kind] is not None else {}
    if not isinstance(params, dict):
        raise fail(path + (kind,), f"a {kind} step's value is a mapping of its settings, e.g. `- {kind}: {{}}`.")
    _check_keys(params, step_keys(kind), path + (kind,), f"a {kind} step", fail)
    if kind == "finetune" and isinstance(params.get("lora"), dict):
        from ..training.lora import LoraSpec

        lora_keys = [f.name for f in dataclasses.fields(LoraSpec)]
        _check_keys(params["lora"], lora_keys, path + (kind, "lora"), "lora", fail)
    return Step(kind, str(raw.get("id") or kind), dict(params), None, lines.get(path, 0))


def step_keys(kind: str) -> list[str]:
    if kind == "finetune":
        from ..training.finetune import FinetuneSettings

        return FinetuneSettings.keys()
    return list({"eval": EVAL_KEYS, "card": CARD_KEYS, "push": PUSH_KEYS}[kind])


def _check_keys(params: dict[str, Any], valid: list[str], path: tuple[Any, ...], what: str, fail: Any) -> None:
    for key in params:
        if key not in valid:
            raise fail(path + (key,), f"{what} has no setting {key!r}; its settings are {', '.join(valid)}.")


def _number_ids(steps: list[Step], lines: dict[tuple[Any, ...], int], fail: Any) -> None:
    seen: dict[str, int] = {}
    for step in steps:
        if not re.fullmatch(r"[A-Za-z][\w-]*", step.id):
            raise fail((), f"step id {step.id!r} (line {step.line}) must be a word (letters, digits, _ and -).")
        count = seen.get(step.id, 0) + 1
        seen[step.id] = count
        if count > 1:
            step.id = f"{step.id}-{count}"
