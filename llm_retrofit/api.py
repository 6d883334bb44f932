"""`patch`: one entry point for a checkpoint on disk (streamed) and a model already loaded in Python."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from .io.checkpoint import Checkpoint, load_checkpoint
from .patchers import parse_spec
from .spec import Patcher
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


def upcycle_moe(model: Any, num_experts: int = 8, top_k: int = 2, **options: Any) -> Any:
    """Turn a dense Llama/Mistral (loaded model or checkpoint path) into a Mixtral; see `patchers.moe`.

    Options are the `moe` patch's parameters (router, prompts, noise, drop, split, partition, seed), plus `output`
    or `in_place` for a checkpoint on disk.
    """
    from .patchers.moe import UpcycleMoE

    patch_options = {k: options.pop(k) for k in ("output", "in_place", "max_shard_size", "force") if k in options}
    return patch(model, UpcycleMoE(num_experts=num_experts, top_k=top_k, **options), **patch_options)


def expand_blocks(model: Any, num_new_layers: int | None = None, every: int | None = None, **patch_options: Any) -> Any:
    """LLaMA-Pro block expansion of a loaded model or checkpoint path; see `patchers.expand`."""
    from .patchers.expand import ExpandBlocks

    return patch(model, ExpandBlocks(num_new_layers=num_new_layers, every=every), **patch_options)


def pool_kv_heads(
    model: Any, num_key_value_heads: int, method: str = "fit", calibration: str | None = None, **options: Any
) -> Any:
    """GQA/MQA pooling of a loaded model or checkpoint path to `num_key_value_heads` KV heads; see `patchers.gqa`.

    `method` is mean, first or fit (fitted on `calibration`, any source `retrofit eval` reads; default the bundled
    Python docs). Options are `calibration_tokens`, plus `output` or `in_place` for a checkpoint on disk.
    """
    from .patchers.gqa import PoolKVHeads

    patch_options = {k: options.pop(k) for k in ("output", "in_place", "max_shard_size", "force") if k in options}
    patcher = PoolKVHeads(num_key_value_heads=num_key_value_heads, method=method, calibration=calibration, **options)
    return patch(model, patcher, **patch_options)


def extend_context(
    model: Any, target_length: int, method: str = "longrope", factors: str | os.PathLike[str] | None = None, **patch_options: Any
) -> Any:
    """Extend the context of a loaded model or checkpoint to `target_length` tokens with one of the RoPE methods
    (linear, ntk, dynamic, yarn, llama3, longrope); `factors` is the JSON of `retrofit search-rope` for longrope."""
    from .patchers import get_patcher

    options: dict[str, Any] = {"target_length": target_length}
    if factors is not None:
        options["factors"] = Path(factors)
    return patch(model, get_patcher(method)(**options), **patch_options)


def set_attention(model: Any, impl: str | None = None, pattern: str | None = None, **options: Any) -> Any:
    """Choose the attention kernel (`impl`: eager, sdpa, flash_attention_2, flex_attention...) and/or `pattern`
    (dense, sliding, sinks, block_sparse) of a loaded model or checkpoint path; see `patchers.attention`.

    Options are the pattern's parameters (window, full_every, sinks, block_size, global_blocks, random_blocks, seed,
    check), plus `output` or `in_place` for a checkpoint on disk.
    """
    from .patchers.attention import SetAttention

    patch_options = {k: options.pop(k) for k in ("output", "in_place", "max_shard_size", "force") if k in options}
    return patch(model, SetAttention(impl=impl, pattern=pattern, **options), **patch_options)  # type: ignore[arg-type]


def add_infini_memory(model: Any, segment_length: int, update: str = "delta", **options: Any) -> Any:
    """Infini-attention memory for a loaded model or checkpoint path, in segments of `segment_length` tokens; see
    `patchers.infini`. Options are `gate_init`, plus `output` or `in_place` for a checkpoint on disk."""
    from .patchers.infini import AddInfiniMemory

    patch_options = {k: options.pop(k) for k in ("output", "in_place", "max_shard_size", "force") if k in options}
    return patch(model, AddInfiniMemory(segment_length=segment_length, update=update, **options), **patch_options)  # type: ignore[arg-type]
