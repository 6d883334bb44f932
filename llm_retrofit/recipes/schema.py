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
rather than a silently ignored default. The values are typed by the step's spec: a patch's by its patcher's fields,
a finetune's by `FinetuneSettings` (and `LoraSpec`, `DistillSpec`), the others by `EvalSettings`, `CardSettings`,
`PushSettings` (`typed_value`; the runner checks them before the first step, see `runner.check_step`).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import RetrofitError
from ..modeling.precision import AUTOCAST_CHOICES
from ..spec import WrongValue, expected_text, read_value

MAX_VALUES = 10_000
"""The most values a recipe may hold once its YAML aliases are expanded (the built-in ones hold under 100)."""
TOP_LEVEL = {"name": True, "description": False, "inputs": False, "profiles": False, "steps": True}
KINDS = ("patch", "finetune", "eval", "card", "push")


class RecipeError(RetrofitError):
    """A recipe cannot be read or run: bad YAML, an unknown key or step, a bad override, an unresolvable value."""


@dataclass(frozen=True)
class Unknown:
    """A value not known before the run (the config after a patch that must search, a step's measured result)."""

    why: str


# ------------------------------------------------------------------------------------------------ typed values


def typed_value(key: str, value: Any, annotation: Any, meta: typing.Mapping[str, Any] | None = None) -> Any:
    """A YAML value read as a settings field's annotation says, by the spec language's one reader
    (`spec.read_value`: int, float, bool, str, Literal, Optional, `tuple[X, ...]`, `dict[str, X]`), or a RecipeError
    naming the key, the value and what is expected.

    A scalar where a list goes is a list of one: `lengths: 512` is `[512]`, as `data: file.txt` already was, since
    that is what it can only mean. Text is read as a spec's text is (`1e-4` is text to YAML, and a number here); a
    number is not text (`data: 7` is refused, quote it if a file is called 7). An `Unknown` value or item passes as
    it is, to be checked when it is known. `meta` (a field's metadata) may add a `check` of each item, the
    `expect`ed text that replaces the annotation's, and an `example`."""
    meta = meta or {}
    try:
        converted = read_value(value, annotation, keep=(Unknown,))
        check = meta.get("check")
        if check is not None:
            for item in converted if isinstance(converted, tuple) else (converted,):
                if item is not None and not isinstance(item, Unknown) and not check(item):
                    raise WrongValue(expected_text(annotation))  # the meta's `expect` says what the check wants
    except WrongValue as wrong:
        expect = meta.get("expect") or (wrong.expected if wrong.not_finite else expected_text(annotation))
        example = f", e.g. {meta['example']}" if meta.get("example") else ""
        quote = "; quote it if it is text" if isinstance(value, (int, float)) and "string" in str(expect) else ""
        raise RecipeError(f"{key}={value!r} is not valid; expected {expect() if callable(expect) else expect}"
                          f"{example}{quote}.") from None
    return converted


def _setting(default: Any = None, check: Callable[[Any], bool] | None = None, expect: Any = None,
             example: str | None = None) -> Any:
    return field(default=default, metadata={"check": check, "expect": expect, "example": example})


def _protocol_ok(value: str) -> bool:
    from ..evaluation.perplexity import PROTOCOLS

    return value in PROTOCOLS


def _protocols() -> str:
    from ..evaluation.perplexity import PROTOCOLS

    return "one of " + ", ".join(PROTOCOLS)


def _dtype_ok(value: str) -> bool:
    from ..spec import DTYPES

    return value.lower() in DTYPES or value.lower() == "auto"  # auto: the checkpoint's own, always


def _dtypes() -> str:
    from ..spec import DTYPES

    return "one of " + ", ".join(DTYPES) + ", or auto"


def read_settings(cls: type, values: typing.Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Each of `values` read as the field of `cls` it names says (`typed_value`); Unknown values pass as they are."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise RecipeError(f"{prefix}{key} is not a setting; the settings are "
                              f"{', '.join(prefix + k for k in fields)}.")
    return {key: typed_value(prefix + key, value, hints[key], fields[key].metadata) for key, value in values.items()}


_S = typing.TypeVar("_S", bound="_Settings")


class _Settings:
    """Settings read from a step's YAML values: `cls.read(values)` checks each value, then (EvalSettings) the whole."""

    @classmethod
    def read(cls: type[_S], values: typing.Mapping[str, Any]) -> _S:
        return cls(**read_settings(cls, values))


@dataclass(frozen=True)
class EvalSettings(_Settings):
    """An `eval` step's settings: those of `retrofit eval`, plus the base comparison and the plot; None leaves the
    choice to `evaluate` (its defaults are not repeated here)."""

    data: tuple[str, ...] = _setting(("bundled:python-docs",), example="data: [docs/, bundled:python-docs]")
    chat: tuple[str, ...] = _setting((), example="chat: [bundled:python-chat@test]")
    """Held-out conversations: their assistant-token perplexity is reported beside the documents' (eval.json's
    `chat`)."""
    lengths: tuple[int, ...] | None = _setting(None, lambda n: n >= 2, "an integer >= 2 or a list of them",
                                               "lengths: [2048, 4096]")
    max_docs: int | None = _setting(None, lambda n: n >= 1, "a positive integer (or null for all)")
    protocol: str | None = _setting(None, _protocol_ok, _protocols, "protocol: sliding")
    stride: int | None = _setting(None, lambda n: n >= 1, "a positive integer (or null)")
    passkey: bool = False
    passkey_lengths: tuple[int, ...] | None = _setting(None, lambda n: n >= 2, "an integer >= 2 or a list of them",
                                                       "passkey_lengths: [4096]")
    passkey_depths: tuple[float, ...] | None = _setting(None, lambda d: 0 <= d <= 1,
                                                        "a number in [0, 1] or a list of them (0: the key first)",
                                                        "passkey_depths: [0.25, 0.5, 0.75]")
    passkey_trials: int | None = _setting(None, lambda n: n >= 1, "a positive integer")
    passkey_compared: bool = True
    """With `passkey`, the before and baseline columns get the passkey too; false: the step's model only (each
    prompt costs a forward pass at its length)."""
    batch_size: int | None = _setting(None, lambda n: n >= 1, "a positive integer")
    compare_base: bool = False
    baselines: tuple[str, ...] = _setting((), example="baselines: [\"yarn:factor=2\"]")
    """Patch specs applied to the base model in memory and evaluated beside it: the free alternatives (a config-only
    YaRN at the same factor, say) that the recipe's work has to beat. Each column is named by its patch."""
    plot: bool = True
    dtype: str | None = _setting(None, _dtype_ok, _dtypes, "dtype: bfloat16")
    autocast: str | None = _setting(None, lambda c: c in AUTOCAST_CHOICES, "one of " + ", ".join(AUTOCAST_CHOICES),
                                    "autocast: off")
    device_map: str | None = _setting(None, example="device_map: auto")
    """`retrofit eval --device-map`: auto, balanced, sequential or one device (default: whole on the GPU or CPU when
    the model fits, else auto)."""
    max_memory: str | None = _setting(None, example="max_memory: cuda:0=20GiB,cpu=64GiB")
    offload_folder: str | None = None

    @classmethod
    def read(cls, values: typing.Mapping[str, Any]) -> EvalSettings:
        settings = cls(**read_settings(cls, values))
        from ..evaluation.perplexity import DEFAULT_PROTOCOL, check_protocol

        check_protocol(settings.measured_lengths(), settings.protocol or DEFAULT_PROTOCOL, settings.stride)
        from ..modeling.placement import check_placement

        check_placement(None, settings.device_map, settings.max_memory)
        settings.baseline_patchers()  # a bad spec is refused before the run
        return settings

    def measured_lengths(self) -> list[int]:
        """The lengths the step measures: its own, or `evaluate`'s default ones."""
        from ..evaluation.perplexity import DEFAULT_LENGTHS

        return list(self.lengths or DEFAULT_LENGTHS)

    def labels(self) -> list[str]:
        """The models this step evaluates, in the order of its table's columns."""
        before = ["before"] if self.compare_base else []
        alternatives = [label for label, _ in self.baseline_patchers()]
        return before + alternatives + ["after" if before or alternatives else "model"]

    def baseline_patchers(self) -> list[tuple[str, Any]]:
        """(column label, patcher) of each baseline: the patch's name, or its spec as written where two share a
        name."""
        from ..patchers import parse_spec

        patchers = [parse_spec(spec) for spec in self.baselines]
        names = [p.name for p in patchers]
        return [(p.name if names.count(p.name) == 1 and p.name not in ("before", "after") else "".join(spec.split()), p)
                for spec, p in zip(self.baselines, patchers)]

    def evaluate_options(self) -> dict[str, Any]:
        """The keyword arguments of `evaluate` that were given (the others keep its defaults)."""
        from ..spec import DTYPES

        keys = ("lengths", "max_docs", "protocol", "stride", "passkey", "passkey_lengths", "passkey_depths",
                "passkey_trials", "batch_size", "autocast", "device_map", "max_memory", "offload_folder")
        options = {key: getattr(self, key) for key in keys if getattr(self, key) is not None}
        dtype = self.dtype.lower() if self.dtype else None
        return options | {"dtype": DTYPES[dtype] if dtype and dtype != "auto" else dtype}


@dataclass(frozen=True)
class CardSettings(_Settings):
    """A `card` step's settings (`retrofit card`'s options)."""

    base_model: str | None = None
    repo_id: str | None = None


@dataclass(frozen=True)
class PushSettings(_Settings):
    """A `push` step's settings (`retrofit push`'s options); `repo_id` may come from --push-to-hub instead."""

    repo_id: str | None = _setting(None, None, "a Hub repo id such as you/model (a string)", "repo_id: you/model")
    private: bool | None = None
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None


SETTINGS: dict[str, type] = {"eval": EvalSettings, "card": CardSettings, "push": PushSettings}
"""The settings of the step kinds whose settings are the recipe's own (a patch takes its patcher's dataclass fields,
a finetune `FinetuneSettings`'s)."""


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
    overridden: dict[tuple[Any, ...], str] = field(default_factory=dict, repr=False)
    """Paths whose values came from --set, with that --set: an error in one names it rather than a line."""
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named sets of --set overrides (`--set profile=gpu`): a recipe's budget for other hardware, one switch away."""

    def where(self, step: Step | None = None, *keys: Any) -> str:
        """`SOURCE:LINE` of a step's setting (`keys` inside its kind's mapping), of the step, or (no step) of the
        input `keys[0]`; a value given by --set is named by its --set instead."""
        if step is None:
            path: tuple[Any, ...] = ("inputs", *keys)
        else:
            index = next((i for i, s in enumerate(self.steps) if s is step), None)
            if index is None:
                return self.source
            path = ("steps", index) + ((("with" if step.kind == "patch" else step.kind), *keys) if keys else ())
        for n in range(len(path), 1, -1):
            if path[:n] in self.overridden:
                return f"{self.source} ({self.overridden[path[:n]]})"
        for n in range(len(path), 0 if step is None else 1, -1):  # not the `steps:` line: --push-to-hub adds a step
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source

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
        try:
            return str(path), path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(f"{path} is not a recipe: byte {e.start} is not UTF-8 text, and a recipe is a YAML file "
                              "(`retrofit recipes show llama-pro > my.yaml` gives one to edit).") from None
        except OSError as e:
            raise RecipeError(f"cannot read the recipe {path}: {e.strerror}; check that it is a readable file."
                              ) from None
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
    except yaml.reader.ReaderError as e:  # a control character or a binary file: the reader has no line, a position
        line = text[:e.position].count("\n") + 1
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise RecipeError(f"{source}:{line}: not a YAML text: character U+{code:04X} is not allowed in YAML; a "
                          "recipe is a text file (`retrofit recipes show llama-pro` prints one).") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        raise RecipeError(f"{source}:{line}: not valid YAML: {getattr(e, 'problem', e)}.") from None
    except RecursionError:
        raise RecipeError(f"{source}: not valid YAML: nested too deeply for a recipe.") from None
    lines: dict[tuple[Any, ...], int] = {}
    try:
        data = _to_python(node, (), lines, [MAX_VALUES]) if node is not None else None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply for a recipe; a recipe is a few levels of mappings and "
                          "lists.") from None
    except _ValueProblem as e:
        raise RecipeError(f"{source}:{e.line}: {e}") from None

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
    profiles = data.get("profiles") or {}
    if not isinstance(profiles, dict) or not all(isinstance(p, dict) and p for p in profiles.values()):
        raise fail(("profiles",), "profiles must map a NAME to the settings it sets, as --set takes them, e.g. "
                   "`profiles: {gpu: {finetune.steps: 100}}`; `--set profile=gpu` applies one.")
    steps: list[Step] = []
    for index, raw in enumerate(data["steps"]):
        steps.append(_step(raw, ("steps", index), lines, fail))
    _number_ids(steps, lines, fail)
    return Recipe(str(data["name"]), str(data.get("description") or ""), dict(inputs), steps, source, text, lines,
                  profiles={str(k): dict(v) for k, v in profiles.items()})


class _ValueProblem(Exception):
    """A YAML value that is no recipe value (a Python tag, a list as a key...), at `line`."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def _to_python(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int], budget: list[int]) -> Any:
    """A composed YAML node -> plain Python values, recording the line of every path in `lines`.

    `budget` counts the values left: YAML aliases let a few lines expand to billions of values (a file of nine
    anchors, each a list of ten of the one before, is 10^9), which would hang here rather than fail."""
    line = node.start_mark.line + 1
    lines[path] = line
    budget[0] -= 1
    if budget[0] < 0:
        raise _ValueProblem(f"the recipe expands to more than {MAX_VALUES} values (YAML aliases repeated inside "
                            "each other?); write the values out.", line)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            try:
                hash(key)
            except TypeError:
                raise _ValueProblem(f"a key must be a word or a number, not {key!r}.", key_node.start_mark.line + 1)
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, path + (key,), lines, budget)
            lines[path + (key,)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), lines, budget) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    try:
        return yaml.safe_load(yaml.serialize(node))
    except yaml.YAMLError as e:  # a tag such as !!python/object: recipes hold plain values only
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    except (ValueError, TypeError, AttributeError, KeyError):  # PyYAML's constructors on `!!int abc`, `!!bool maybe`
        problem = f"{node.tag} {node.value!r} is not a value of that type"
    raise _ValueProblem(f"{problem}; a recipe holds plain values (numbers, text, lists, mappings), without tags.",
                        node.start_mark.line + 1)


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
    if kind == "finetune" and isinstance(params.get("distill"), dict):
        from ..training.distill import DistillSpec

        _check_keys(params["distill"], DistillSpec.keys(), path + (kind, "distill"), "distill", fail)
    return Step(kind, str(raw.get("id") or kind), dict(params), None, lines.get(path, 0))


def step_keys(kind: str) -> list[str]:
    if kind == "finetune":
        from ..training.finetune import FinetuneSettings

        return FinetuneSettings.keys()
    return [f.name for f in dataclasses.fields(SETTINGS[kind])]


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
