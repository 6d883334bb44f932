"""`patch`: one entry point for a checkpoint on disk (streamed) and a model already loaded in Python.

Every value the API takes is read by the spec language's one reader (`spec.read_fields`), as `retrofit patch` reads
the same value written in a spec: `window="64"` is 64, `memory="no"` is false, `pattern="Sinks"` and
`gate_init=nan` are refused with the patch's own PatchSpecError, never a TypeError or KeyError from below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch

from .errors import CheckpointError, OutputError, PatchSpecError
from .io.checkpoint import Checkpoint, load_checkpoint
from .patchers import get_patcher, parse_spec
from .plan import apply_to_checkpoint, apply_to_model
from .spec import Patcher, fields_of, read_fields

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WRITE_OPTIONS = ("output", "in_place", "max_shard_size", "force")
"""The keywords of `patch` itself; the helpers below pass these on and read every other keyword as the patch's."""


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

    A loaded `PreTrainedModel` gives back a new patched model on the same device (the model in memory is what is
    patched, so `output`, `in_place` and `max_shard_size` are refused: patch its checkpoint directory to write one).
    A checkpoint directory, Hub repo id or `Checkpoint` is rewritten tensor by tensor into `output`, or atomically
    in place with `in_place=True`, and the path of the result is returned.
    """
    patchers = [_read_patcher(spec) for spec in specs]
    if not isinstance(model, (str, os.PathLike, Checkpoint)):
        _refuse_writing_a_loaded_model(model, output=output, in_place=in_place, max_shard_size=max_shard_size)
        return apply_to_model(model, patchers, force=force)
    checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    return apply_to_checkpoint(
        checkpoint, patchers, output=output, in_place=in_place, max_shard_size=max_shard_size, force=force
    )


def _read_patcher(spec: Any) -> Patcher:
    """A spec text parsed, or a Patcher built by hand read again field by field, so that it is held to the grammar
    a spec is (a hand-built `PoolKVHeads(num_key_value_heads=1.0)` has the integer 1)."""
    if isinstance(spec, str):
        return parse_spec(spec)
    if isinstance(spec, Patcher):
        return read_fields(type(spec), fields_of(spec))  # type: ignore[no-any-return]
    raise PatchSpecError(f"{spec!r} is not a patch; give a spec such as 'dtype:to=bfloat16' or a Patcher object.")


def _refuse_writing_a_loaded_model(model: Any, **writes: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"{type(model).__name__} is not a model: give a checkpoint directory, a Hub repo id, a "
                              "Checkpoint or a loaded PreTrainedModel.")
    given = [f"{key}=" for key, value in writes.items() if value not in (None, False)]
    if given:
        raise OutputError(f"{' and '.join(given)} writes a checkpoint, but this model is loaded in Python, so patch() "
                          "returns the patched model instead of writing it. Patch its checkpoint directory to write "
                          "one (patch('path/to/model', ..., output='out')), or save the returned model with "
                          "save_pretrained.")


def _patch_with(model: Any, name: str, values: dict[str, Any], options: dict[str, Any]) -> Any:
    """`patch(model, <the patch NAME with values and options>)`: the write options (`WRITE_OPTIONS`) go to `patch`,
    every other option is one of the patch's parameters, read as a spec's would be (an unknown one is refused)."""
    patch_options = {key: options.pop(key) for key in WRITE_OPTIONS if key in options}
    patcher = read_fields(get_patcher(name), {**values, **options})
    return patch(model, patcher, **patch_options)


def upcycle_moe(model: Any, num_experts: int = 8, top_k: int = 2, **options: Any) -> Any:
    """Turn a dense Llama/Mistral (loaded model or checkpoint path) into a Mixtral; see `patchers.moe`.

    Options are the `moe` patch's parameters (router, prompts, noise, drop, split, partition, seed), plus `output`
    or `in_place` for a checkpoint on disk.
    """
    return _patch_with(model, "moe", {"num_experts": num_experts, "top_k": top_k}, options)


def expand_blocks(model: Any, num_new_layers: int | None = None, every: int | None = None, **options: Any) -> Any:
    """LLaMA-Pro block expansion of a loaded model or checkpoint path; see `patchers.expand`."""
    return _patch_with(model, "expand", {"num_new_layers": num_new_layers, "every": every}, options)


def pool_kv_heads(
    model: Any, num_key_value_heads: int, method: str = "fit", calibration: str | None = None, **options: Any
) -> Any:
    """GQA/MQA pooling of a loaded model or checkpoint path to `num_key_value_heads` KV heads; see `patchers.gqa`.

    `method` is mean, first or fit (fitted on `calibration`, any source `retrofit eval` reads; default the bundled
    Python docs). Options are `calibration_tokens`, plus `output` or `in_place` for a checkpoint on disk.
    """
    values = {"num_key_value_heads": num_key_value_heads, "method": method, "calibration": calibration}
    return _patch_with(model, "gqa", values, options)


def extend_context(
    model: Any, target_length: int, method: str = "longrope", factors: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Any:
    """Extend the context of a loaded model or checkpoint to `target_length` tokens with one of the RoPE methods
    (linear, ntk, dynamic, yarn, llama3, longrope); `factors` is the JSON of `retrofit search-rope` for longrope."""
    values: dict[str, Any] = {"target_length": target_length}
    if factors is not None:
        values["factors"] = factors
    return _patch_with(model, method, values, options)


def set_attention(model: Any, impl: str | None = None, pattern: str | None = None, **options: Any) -> Any:
    """Choose the attention kernel (`impl`: eager, sdpa, flash_attention_2, flex_attention...) and/or `pattern`
    (dense, sliding, sinks, block_sparse) of a loaded model or checkpoint path; see `patchers.attention`.

    Options are the pattern's parameters (window, full_every, sinks, block_size, global_blocks, random_blocks, seed,
    check), plus `output` or `in_place` for a checkpoint on disk.
    """
    return _patch_with(model, "attention", {"impl": impl, "pattern": pattern}, options)


def add_infini_memory(model: Any, segment_length: int, update: str = "delta", **options: Any) -> Any:
    """Infini-attention memory for a loaded model or checkpoint path, in segments of `segment_length` tokens; see
    `patchers.infini`. Options are `gate_init` and `memory`, plus `output` or `in_place` for a checkpoint on disk."""
    return _patch_with(model, "infini", {"segment_length": segment_length, "update": update}, options)
