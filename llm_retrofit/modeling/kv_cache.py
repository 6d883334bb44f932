"""Passing a KV cache to a transformers model under the keyword its installed version reads.

transformers 5.24 renamed the forward argument `past_key_values` to `cache` and warns on the old name; earlier 5.x
releases only know `past_key_values`. The supported range spans both, so the name is read off the model's forward
signature (the deprecation decorator keeps the new signature visible) instead of pinning a version.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch


@functools.cache
def _keyword(forward_type: type) -> str:
    parameters = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """`{keyword: cache}` for `model(...)`: splat it into the call."""
    return {_keyword(type(model)): cache}


def returned_cache(output: Any) -> Any:
    """The cache a forward with `use_cache=True` returned: the output's `cache` field (5.24), else the older
    `past_key_values`."""
    fields = output.keys() if hasattr(output, "keys") else ()
    return output["cache"] if "cache" in fields else output.past_key_values
