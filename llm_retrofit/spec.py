"""The Patcher protocol and the `name:key=value,...` spec language.

A patcher is a frozen dataclass whose fields are its parameters, registered under a name with `@register`. Its
`plan(view)` returns a `TensorPlan`. Specs are parsed against the field annotations, so every patcher gets typed
parameters, a list of valid keys in errors, and `retrofit patch --help` text for free.

`read_value` is the one reader of typed values: patch specs and the Python API (`read_fields`), a recipe's settings
(`recipes.schema.typed_value`), `lora`, `distill` and the finetune settings all read their values with it, so a value
means the same thing, and is refused with the same message, wherever it is written (docs/specs.md).

A patcher also declares what the rest of the codebase needs to know about it, so that no other module has to
recognise it by name: whether planning it runs the model (`loads_model`), and what a model card says about it
(`card`, `card_limitation`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from .errors import PatchSpecError, RetrofitError
from .plan import ModelView, TensorPlan

PATCHERS: dict[str, type[Patcher]] = {}
"""Every registered patcher by name; `patchers.registry()` imports the patcher modules that fill it."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PatchCard:
    """What a model card says about one kind of patch."""

    title: str
    explanation: str
    reference: str | None = None  # the paper (or, for a file format, its specification)
    url: str | None = None
    limitation: str | None = None


class Patcher(ABC):
    """Base class of patchers; subclasses are frozen dataclasses with a `name` and typed fields."""

    name: ClassVar[str]
    example: ClassVar[str]
    """A complete spec, shown in --help and in errors."""
    card: ClassVar[PatchCard | None] = None
    """What a model card says about this patch; None: the card uses the class docstring's first line."""
    representation_only: ClassVar[bool] = False
    """True for a patch that re-encodes the weights without changing what they compute, up to rounding (a dtype
    cast): the Hub calls such a derivative `quantized` rather than `finetune`."""

    @abstractmethod
    def plan(self, model: ModelView) -> TensorPlan: ...

    def loads_model(self) -> bool:
        """True when planning this patch runs the model (a search, calibration activations): it must then be the
        first patch of a chain, and a dry run cannot know its result."""
        return False

    def check(self, model: ModelView) -> None:
        """Raise what `plan(model)` would refuse about these parameters on this model, without running the model.
        A recipe's dry run cannot plan a patch that loads the model (`loads_model`), so it calls this; such a patch
        overrides it with the checks its `plan` makes before it loads anything (the others are planned whole)."""

    def shape_plan(self, model: ModelView) -> TensorPlan | None:
        """The plan as far as the model's shape goes (its config; stand-ins for what only running it can tell), made
        without running the model, so that a recipe can price the steps after this one; None if unknown."""
        return None if self.loads_model() else self.plan(model)

    def passes(self, config: Mapping[str, Any]) -> list[Any]:
        """The passes of the model (`modeling.cost.Pass`, a room above this one) planning this patch runs on a model
        with this config.json (a search's candidates, a calibration), for the time and memory a dry run expects;
        none for a patch that only rewrites."""
        return []

    @classmethod
    def card_limitation(cls, params: dict[str, Any]) -> str | None:
        """The limitation a patch with these recorded parameters brings (some hold only for some parameters)."""
        return cls.card.limitation if cls.card else None

    @classmethod
    def card_note(cls, record: dict[str, Any]) -> str | None:
        """A sentence the card adds to this patch's explanation from its history record (the facts its plan notes
        recorded, such as the KV-cache bytes a pooling saved); None: nothing to add."""
        return None

    def params(self) -> dict[str, Any]:
        """The parameters as JSON values, as recorded in the provenance."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def spec(self) -> str:
        params = ",".join(f"{key}={value}" for key, value in self.params().items())
        return f"{self.name}:{params}" if params else self.name

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]


def register(cls: type[Patcher]) -> type[Patcher]:
    PATCHERS[cls.name] = cls
    return cls


def _to_json(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, Path):
        return str(value)
    return value


def parse_fields(cls: type, spec: str, arguments: str, error: type[RetrofitError] = PatchSpecError) -> Any:
    """`cls(**values)` from the `key=value,...` part of a spec (a patcher, or another spec dataclass with `name` and
    `example`, such as `lora` and `distill`), each value read by `read_value` as its field's annotation says."""
    example: str = cls.example  # type: ignore[attr-defined]
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in arguments.split(","))):
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep:
            raise error(f"{spec!r}: {item!r} is not key=value. Example: {example}")
        if key in values:
            raise error(f"{spec!r}: {key} is given twice; give each parameter once. Example: {example}")
        values[key] = raw
    return read_fields(cls, values, spec, error)


def read_fields(cls: type, values: Mapping[str, Any], spec: str | None = None,
                error: type[RetrofitError] = PatchSpecError) -> Any:
    """`cls(**values)` from a mapping (spec text split at commas, a recipe's YAML, the Python API's keywords), each
    value read by `read_value`; a key that is not a field, and a required field left out, are refused by name."""
    where = f"{spec!r}: " if spec else ""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in fields:
            raise error(f"{where}{_owner(cls)} has no parameter {key!r}; its parameters are {_keys(cls)}.")
    read = {key: read_field(cls, key, value, error) for key, value in values.items()}
    missing = [k for k, f in fields.items() if k not in read and _is_required(f)]
    if missing:
        example: str = cls.example  # type: ignore[attr-defined]
        raise error(f"{where}{_owner(cls)} needs {', '.join(missing)}. Example: {example}")
    return cls(**read)


def read_field(cls: type, key: str, value: Any, error: type[RetrofitError] = PatchSpecError) -> Any:
    """One value of `cls`'s field `key` read by `read_value`, or `error` naming the field, the value and what it
    takes."""
    try:
        return read_value(value, typing.get_type_hints(cls)[key])
    except WrongValue as wrong:
        raise error(f"{_owner(cls)}: {key}={value!r} is not valid; expected {wrong.expected}.") from None


def fields_of(patcher: Any) -> dict[str, Any]:
    """A spec dataclass's field values, as `read_fields` takes them (to read an object built by hand again)."""
    return {f.name: getattr(patcher, f.name) for f in dataclasses.fields(patcher)}


def _owner(cls: type) -> str:
    """How messages name a spec's owner: `patch 'dtype'` for a patcher, `lora` or `distill` for the others."""
    return f"patch {cls.name!r}" if issubclass(cls, Patcher) else cls.name  # type: ignore[attr-defined]


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _keys(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    return ", ".join(f"{f.name} ({_type_name(hints[f.name])})" for f in fields)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(_text(c) for c in typing.get_args(annotation))
    if annotation is torch.dtype:
        return "dtype: " + " | ".join(sorted(DTYPES))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    return getattr(annotation, "__name__", str(annotation))


# ------------------------------------------------------------------------------------------ the one value reader

TRUE_TEXT = ("true", "yes", "1")
FALSE_TEXT = ("false", "no", "0")
NONE_TEXT = ("none", "null")


class WrongValue(Exception):
    """A value `read_value` cannot read as its annotation; `expected` says what it takes. Never reaches a user: the
    callers (`read_field`, the recipe schema) turn it into their error, naming where the value came from."""

    def __init__(self, expected: str, not_finite: bool = False) -> None:
        super().__init__(expected)
        self.expected = expected
        self.not_finite = not_finite  # nan or inf: `expected` says why, where a caller would otherwise say "a number"


def read_value(value: Any, annotation: Any, keep: tuple[type, ...] = ()) -> Any:
    """`value` as `annotation` says: the one reader of every typed value (patch specs, `lora`, `distill`, a recipe's
    settings, finetune settings, the Python API). The grammar (docs/specs.md, "Values"):

    - text is read: `64`, `1e3` and `2.0` are integers (whole numbers), `1e-4` a number; `true/yes/1` and
      `false/no/0` (any case) are booleans; `none`/`null` is None where None is allowed; a choice is one of its
      values, exactly as written; a dtype is one of `DTYPES` (any case);
    - other values must already be of the kind: a real bool for a bool (never the truthiness of 1 or "no"), a number
      (not a bool) for a number, text (or a path) for text;
    - a number is finite (nan and inf reach no config) and an integer is whole;
    - a scalar where a list (`tuple[X, ...]`) goes is a list of one; a mapping (`dict[str, X]`) must be one.
    Values of a `keep` type (a recipe's not-yet-known value) pass as they are. Raises `WrongValue`.
    """
    if annotation is Any or isinstance(value, keep):
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _read_union(value, args, keep)
    if origin is Literal:
        return _read_choice(value, args)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(read_value(item, args[0], keep) for item in items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise WrongValue(expected_text(annotation))
        return {str(k): read_value(v, args[1], keep) for k, v in value.items()}
    if annotation not in _SCALARS:
        raise TypeError(f"read_value cannot read a {annotation!r} field; teach it the type")  # our bug, not the user's
    return _SCALARS[annotation](value)


def _read_union(value: Any, args: tuple[Any, ...], keep: tuple[type, ...]) -> Any:
    options = [a for a in args if a is not type(None)]
    if len(options) < len(args) and (value is None or (isinstance(value, str) and value.strip().lower() in NONE_TEXT)):
        return None
    if len(options) == 1:  # `float | None`: the one type's own message (a finite number, one of ...)
        return read_value(value, options[0], keep)
    for option in options:
        try:
            return read_value(value, option, keep)
        except WrongValue:
            continue
    raise WrongValue(expected_text(typing.Union[tuple(args)]))  # type: ignore[arg-type]


def _read_choice(value: Any, choices: tuple[Any, ...]) -> Any:
    for choice in choices:
        if value == choice and type(value) is type(choice):
            return choice
    if isinstance(value, str):  # text names a bool or number choice as text names a bool or a number
        for choice in choices:
            if not isinstance(choice, str):
                try:
                    if _SCALARS[type(choice)](value) == choice:
                        return choice
                except WrongValue:
                    continue
    raise WrongValue(expected_text(Literal[choices]))  # type: ignore[valid-type]


def _read_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in TRUE_TEXT or text in FALSE_TEXT:
        return text in TRUE_TEXT
    raise WrongValue("true or false")


def _read_number(value: Any, kind: type) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise WrongValue(expected_text(kind))
    number: int | float = value  # type: ignore[assignment]
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise WrongValue(expected_text(kind)) from None
    if isinstance(number, float) and not math.isfinite(number):  # would reach config.json as non-standard JSON
        raise WrongValue(f"a finite {'integer' if kind is int else 'number'} (nan and inf are not numbers a model can "
                         "use)", not_finite=True)
    if kind is int:
        if isinstance(number, float) and not number.is_integer():
            raise WrongValue(expected_text(int))
        return int(number)
    return float(number)


def _read_text(value: Any) -> str:
    if isinstance(value, os.PathLike):
        return os.fspath(value)  # type: ignore[return-value]
    if isinstance(value, str):
        return value
    raise WrongValue("a string")


def _read_path(value: Any) -> Path:
    if isinstance(value, (str, os.PathLike)):
        return Path(value).expanduser()
    raise WrongValue("a path")


def _read_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.strip().lower() in DTYPES:
        return DTYPES[value.strip().lower()]
    raise WrongValue(expected_text(torch.dtype))


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    bool: _read_bool,
    int: lambda value: _read_number(value, int),
    float: lambda value: _read_number(value, float),
    str: _read_text,
    Path: _read_path,
    torch.dtype: _read_dtype,
}

_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true/false values"), Path: ("a path", "paths")}


def expected_text(annotation: Any, plural: bool = False) -> str:
    """What a value of `annotation` must be, in words: `an integer or a list of integers`, `one of mean, fit`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        text = " or ".join(expected_text(a, plural) for a in args if a is not type(None))
        return text + (" (or none)" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(_text(c) for c in args)
    if annotation is torch.dtype:
        return "one of " + ", ".join(DTYPES)
    if origin is tuple:
        return f"{expected_text(args[0])} or a list of {expected_text(args[0], plural=True)}"
    if origin is dict:
        return f"a mapping of names to {expected_text(args[1], plural=True)}"
    names = _NAMES.get(annotation, (getattr(annotation, "__name__", str(annotation)),) * 2)
    return names[plural]


def _text(choice: Any) -> str:
    """A choice as a user writes it: `true`, not `True`."""
    return str(choice).lower() if isinstance(choice, bool) else str(choice)
