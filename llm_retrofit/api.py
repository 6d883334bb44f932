"""`patch`: one entry point for a checkpoint on disk (streamed) and a model already loaded in Python."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, overload

from .checkpoint import Checkpoint, load_checkpoint
from .patchers import Patcher, parse_spec
from .plan import apply_to_checkpoint, apply_to_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@overload
def patch(model: PreTrainedModel, *specs: str | Patcher, force: bool = ...) -> PreTrainedModel: ...
@overload
def patch(
    model: str | os.PathLike[str] | Checkpoint,
    *specs: str | Patcher,
    output: str | os.PathLike[str] | None = ...,
    in_place: bool = ...,
    max_shard_size: int | str | None = ...,
    force: bool = ...,
) -> Path: ...
def patch(model, *specs, output=None, in_place=False, max_shard_size=None, force=False):  # type: ignore[no-untyped-def]
    """Apply patches, given as specs ("dtype:to=bfloat16") or Patcher objects, in order, as one plan.

    A loaded `PreTrainedModel` gives back a new patched model on the same device. A checkpoint directory, Hub repo id
    or `Checkpoint` is rewritten tensor by tensor into `output`, or atomically in place with `in_place=True`, and the
    path of the result is returned.
    """
    patchers = [spec if isinstance(spec, Patcher) else parse_spec(spec) for spec in specs]
    if not isinstance(model, (str, os.PathLike, Checkpoint)):
        return apply_to_model(model, patchers, force=force)
    checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    return apply_to_checkpoint(
        checkpoint, patchers, output=output, in_place=in_place, max_shard_size=max_shard_size, force=force
    )
