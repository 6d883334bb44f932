"""The patcher registry and the `name:key=value,...` spec language.

A patcher is a frozen dataclass whose fields are its parameters, registered under a name with `@register`. Its
`plan(view)` returns a `TensorPlan`. Specs are parsed against the field annotations, so every patcher gets typed
parameters, a list of valid keys in errors, and `retrofit patch --help` text for free. Every module in this package
is imported on first use, so adding a patcher is adding one module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
import typing
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..errors import PatchSpecError
from ..plan import ModelView, TensorPlan

PATCHERS: dict[str, type[Patcher]] = {}

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


class Patcher(ABC):
    """Base class of patchers; subclasses are frozen dataclasses with a `name` and typed fields."""

    name: ClassVar[str]
    example: ClassVar[str]
    """A complete spec, shown in --help and in errors."""

    @abstractmethod
    def plan(self, model: ModelView) -> TensorPlan: ...

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


@functools.cache
def registry() -> dict[str, type[Patcher]]:
    """Every patcher: importing each module of this package registers the patchers it defines."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return PATCHERS


def get_patcher(name: str) -> type[Patcher]:
    try:
        return registry()[name]
    except KeyError:
        if name == "lora":  # patchers/lora.py: an adapter is trained, not computed from the weights
            raise PatchSpecError(
                "lora is trained, not computed from the weights: use `retrofit finetune MODEL --lora lora:r=16,...` "
                "or a recipe's finetune step with `lora: {r: 16, ...}`."
            ) from None
        raise PatchSpecError(f"unknown patch {name!r}; the patches are: {', '.join(sorted(registry()))}.") from None


def parse_spec(spec: str) -> Patcher:
    """`"dtype:to=bfloat16"` -> `CastDtype(to=torch.bfloat16)`, with errors that list what is valid."""
    name, _, arguments = spec.strip().partition(":")
    return parse_fields(get_patcher(name.strip()), spec, arguments)  # type: ignore[return-value]


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
        values[key] = _convert(cls, key, raw, hints[key])
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


def _convert(cls: type[Patcher], key: str, raw: str, annotation: Any) -> Any:
    """Parse one spec value according to the field's annotation."""

    def bad(expected: str) -> PatchSpecError:
        return PatchSpecError(f"patch {cls.name!r}: {key}={raw!r} is not valid; expected {expected}.")

    if typing.get_origin(annotation) in (typing.Union, type(int | None)):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if raw.lower() == "none":
            return None
        for option in options:
            try:
                return _convert(cls, key, raw, option)
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
            return annotation(raw)
        except ValueError:
            raise bad(f"a number ({annotation.__name__})") from None
    if annotation is Path:
        return Path(raw).expanduser()
    return raw
