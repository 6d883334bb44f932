"""A step's YAML values read into the typed spec of its kind: a patch's into its patcher (each value as the same
value in a `--patch` spec is read), a finetune's into `FinetuneSettings` (and its `lora:` into a `LoraSpec`).

The step kinds (`steps/`) build their specs with these when they check and when they run, so both read alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .schema import RecipeError, Step, read_settings

if TYPE_CHECKING:
    from ..spec import Patcher
    from ..training.finetune import FinetuneSettings
    from ..training.lora import LoraSpec


def build_patcher(step: Step, params: dict[str, Any]) -> Patcher:
    """The patcher of a patch step from resolved YAML values, each converted as its spec text would be."""
    from ..patchers import get_patcher

    cls = get_patcher(step.patcher or "")
    values = {key: patch_value(cls, key, value) for key, value in params.items()}
    require_patch_fields(cls, values)
    return cls(**values)


def patch_value(cls: Any, key: str, value: Any) -> Any:
    """One YAML value of a patch step read by the spec language's one reader (`spec.read_field`), as the same value
    in a `--patch` spec is."""
    from ..errors import PatchSpecError
    from ..spec import read_field

    if isinstance(value, (list, dict)):  # a spec value is one value; text `+`-joins several where a patch takes them
        raise PatchSpecError(f"patch {cls.name!r}: {key}={value!r} is not valid; expected one value, not a "
                             f"{'list' if isinstance(value, list) else 'mapping'}. Example: {cls.example}.")
    return read_field(cls, key, value)


def require_patch_fields(cls: Any, values: Mapping[str, Any]) -> None:
    from ..errors import PatchSpecError

    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PatchSpecError(f"patch {cls.name!r} needs {', '.join(missing)} (under `with:`). Example: {cls.example}.")


def finetune_settings(params: dict[str, Any]) -> FinetuneSettings:
    """A finetune step's FinetuneSettings from resolved YAML values, each read as its field's type says."""
    from ..training.finetune import FinetuneSettings

    values = read_settings(FinetuneSettings, params)
    if "lora" in values:
        values["lora"] = lora_spec(values["lora"])
    return FinetuneSettings(**values)


def lora_spec(value: Any) -> LoraSpec | None:
    """A finetune step's `lora:` (a mapping of LoraSpec fields, or a `lora:...` spec text) as a LoraSpec."""
    from ..training.lora import LoraSpec, parse_lora

    if value is None or isinstance(value, (str, LoraSpec)):
        return None if value is None else parse_lora(value)
    return parse_lora(read_settings(LoraSpec, _lora_values(value), prefix="lora."))


def _lora_values(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecipeError(f"lora={value!r} is not valid; expected a mapping of lora settings, e.g. lora: {{r: 16, "
                          "alpha: 32}.")
    from ..training.lora import joined_lists

    return joined_lists(value)
