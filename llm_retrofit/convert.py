"""`retrofit convert`: GGUF -> Hugging Face checkpoint, and checkpoint -> checkpoint with another dtype or sharding."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from xxhash import xxh3_128

from .architectures import architecture_of
from .io.bundled import bundled_gguf
from .io.checkpoint import load_checkpoint, restore_dropped_config
from .io.commit import staged_directory
from .io.progress import note, quiet_libraries
from .errors import CheckpointError
from .export import rope_parameters_of_gguf
from .plan import TensorPlan, apply_to_checkpoint, model_view, write_weights
from .io.provenance import HISTORY_KEY, make_records
from .io.writer import DEFAULT_MAX_SHARD_SIZE, parse_size

log = logging.getLogger(__name__)


def convert(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Convert a GGUF file or a checkpoint into a safetensors checkpoint at `output`; returns `output`."""
    from .patchers.dtype import CastDtype

    output = Path(output).expanduser()
    if str(source).startswith("bundled:"):
        source = bundled_gguf(str(source))
    if Path(source).suffix == ".gguf":
        return import_gguf(Path(source).expanduser(), output, dtype=dtype, max_shard_size=max_shard_size)
    checkpoint = load_checkpoint(source)
    params = {"dtype": str(dtype).removeprefix("torch.") if dtype else None, "max_shard_size": max_shard_size}
    return apply_to_checkpoint(
        checkpoint,
        [CastDtype(to=dtype)] if dtype else [],
        output=output,
        max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
        record=[("convert", {"params": params})],
    )


def import_gguf(
    gguf: Path, output: Path, *, dtype: torch.dtype | None = None, max_shard_size: int | str | None = None
) -> Path:
    """Dequantize a GGUF file into a safetensors checkpoint with config, tokenizer, chat template and generation config.

    transformers does the GGUF reading and dequantization, which needs the whole model in memory once; the result is
    written beside the output and renamed into place only when complete.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise CheckpointError(f"{gguf} does not exist; pass the path of a .gguf file.")
    shard_bytes = parse_size(max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    directory, file_name = gguf.parent, gguf.name
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=file_name)
    except Exception as e:  # gguf and transformers raise assorted types for unreadable or unknown files
        raise CheckpointError(
            f"{gguf} could not be read as a GGUF model ({type(e).__name__}: {e}). It is corrupt, truncated, or of an "
            "architecture transformers cannot import; obtain a clean copy."
        ) from None
    architecture_of(config.to_dict())
    with staged_directory(output, in_place=False) as staging:
        note(f"dequantizing {gguf.name} (this loads the whole model once)")
        with quiet_libraries(), _no_dequantization_bar():  # the line above says what happens, for 2 s on SmolLM2
            model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=dtype or torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
        # The weights are dequantized now: the GGUF quantization settings no longer describe them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = ""
        model.config.architectures = [architecture_of(model.config.to_dict()).class_name]
        rope = rope_parameters_of_gguf(gguf, model.config.rope_parameters["rope_theta"],
                                       model.config.max_position_embeddings)
        if rope:
            model.config.rope_parameters = rope
        params = {"from": "gguf", "dtype": str(model.dtype).removeprefix("torch."), "max_shard_size": max_shard_size}
        setattr(model.config, HISTORY_KEY, make_records([("convert", {"params": params})], str(gguf), _file_hash(gguf)))
        # Our own writer rather than save_pretrained, which refuses models that came from a quantized file.
        view, state = model_view(model)
        write_weights(TensorPlan.identity(view), state.__getitem__, staging, shard_bytes)
        model.config.save_pretrained(staging)
        restore_dropped_config(staging, {})  # the RoPE keys other readers need, which save_pretrained leaves out
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return output


def _no_dequantization_bar() -> Any:
    """transformers' GGUF reader draws its own tqdm bar, which its progress-bar switch does not reach."""
    import functools
    from unittest import mock

    from transformers import modeling_gguf_pytorch_utils as gguf_reader

    return mock.patch.object(gguf_reader, "tqdm", functools.partial(gguf_reader.tqdm, disable=True))


def _file_hash(path: Path) -> str:
    digest = xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()
