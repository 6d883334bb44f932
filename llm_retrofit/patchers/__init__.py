"""The patchers: one module each, registered by name.

Every module in this package is imported on first use of the registry, so adding a patcher is adding one module
(plus its tests and its doc row). The Patcher protocol and the spec language are in `..spec`.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from ..errors import PatchSpecError
from ..spec import PATCHERS, Patcher, parse_fields


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
        if name == "lora":  # training/lora.py: an adapter is trained, not computed from the weights
            raise PatchSpecError(
                "lora is trained, not computed from the weights: use `retrofit finetune MODEL --lora lora:r=16,...` "
                "or a recipe's finetune step with `lora: {r: 16, ...}`."
            ) from None
        raise PatchSpecError(f"unknown patch {name!r}; the patches are: {', '.join(sorted(registry()))}.") from None


def parse_spec(spec: str) -> Patcher:
    """`"dtype:to=bfloat16"` -> `CastDtype(to=torch.bfloat16)`, with errors that list what is valid."""
    name, _, arguments = spec.strip().partition(":")
    return parse_fields(get_patcher(name.strip()), spec, arguments)  # type: ignore[return-value]


