"""The Patcher protocol and the `name:key=value,...` spec language.

A patcher is a frozen dataclass whose fields are its parameters, registered under a name with `@register`. Its
`plan(view)` returns a `TensorPlan`. Specs are parsed against the field annotations, so every patcher gets typed
parameters, a list of valid keys in errors, and `retrofit patch --help` text for free.

A patcher also declares what the rest of the codebase needs to know about it, so that no other module has to
recognise it by name: whether planning it runs the model (`loads_model`), and what a model card says about it
(`card`, `card_limitation`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from .errors import PatchSpecError
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

    def forward_lengths(self, config: Mapping[str, Any]) -> list[int]:
        """The token counts of the forward passes planning this patch runs on a model with this config.json (a
        search's candidates), for the time a recipe expects before it starts; none for a patch that only rewrites."""
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


def parse_fields(cls: type, spec: str, arguments: str) -> Any:
    """`cls(**values)` from the `key=value,...` part of a spec, typed by `cls`'s field annotations (a patcher, or
    another spec dataclass with `name` and `example`, such as `lora`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in arguments.split(","))):
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep:
            raise PatchSpecError(f"{spec!r}: {item!r} is not key=value. Example: {cls.example}")
        if key not in fields:
            raise PatchSpecError(f"{spec!r}: patch {cls.name!r} has no parameter {key!r}; its parameters are {_keys(cls)}.")
        if key in values:
            raise PatchSpecError(f"{spec!r}: {key} is given twice; give each parameter once. Example: {cls.example}")
        values[key] = parse_value(cls, key, raw, hints[key])
    missing = [k for k, f in fields.items() if k not in values and _is_required(f)]
    if missing:
        raise PatchSpecError(f"{spec!r}: patch {cls.name!r} needs {', '.join(missing)}. Example: {cls.example}")
    return cls(**values)


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _keys(cls: type[Patcher]) -> str:
    hints = typing.get_type_hints(cls)
    return ", ".join(f"{f.name} ({_type_name(hints[f.name])})" for f in dataclasses.fields(cls))  # type: ignore[arg-type]


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(map(str, typing.get_args(annotation)))
    if annotation is torch.dtype:
        return "dtype: " + " | ".join(sorted(DTYPES))
    if typing.get_origin(annotation) in (typing.Union, type(int | None)):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    return getattr(annotation, "__name__", str(annotation))


def parse_value(cls: type[Patcher], key: str, raw: str, annotation: Any) -> Any:
    """Parse one spec value according to the field's annotation."""

    def bad(expected: str) -> PatchSpecError:
        return PatchSpecError(f"patch {cls.name!r}: {key}={raw!r} is not valid; expected {expected}.")

    if typing.get_origin(annotation) in (typing.Union, type(int | None)):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw.lower() == "none":
            return None
        if len(options) == 1:  # `float | None`: the one type's own message (a finite number, one of ...)
            return parse_value(cls, key, raw, options[0])
        for option in options:
            try:
                return parse_value(cls, key, raw, option)
            except PatchSpecError:
                continue
        raise bad(_type_name(annotation))
    if typing.get_origin(annotation) is Literal:
        choices = {str(c): c for c in typing.get_args(annotation)}
        if raw not in choices:
            raise bad("one of " + ", ".join(choices))
        return choices[raw]
    if annotation is torch.dtype:
        if raw.lower() not in DTYPES:
            raise bad("one of " + ", ".join(DTYPES))
        return DTYPES[raw.lower()]
    if annotation is bool:
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise bad("true or false")
        return raw.lower() in ("true", "1", "yes")
    if annotation in (int, float):
        try:
            number = annotation(raw)
        except ValueError:
            raise bad(f"a number ({annotation.__name__})") from None
        if not math.isfinite(number):  # nan and inf parse as floats, and would reach config.json as non-JSON
            raise bad("a finite number (nan and inf are not numbers a model can use)")
        return number
    if annotation is Path:
        return Path(raw).expanduser()
    return raw
