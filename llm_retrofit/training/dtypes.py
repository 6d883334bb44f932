"""The dtypes a finetune holds weights in: what trains is float32, what is frozen keeps the checkpoint's dtype.

A float32 copy of a frozen bf16 weight only costs memory where the matrix products run in bf16 (autocast casts
every weight to bf16 for them anyway): a LoRA base, the untrained layers of a freeze spec, a distillation teacher.
What the optimizer updates is float32 (master weights): AdamW's small updates would vanish in bf16's 8-bit mantissa.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def stored_dtype(checkpoint: Any) -> torch.dtype:
    """The dtype most floating-point tensors are stored in: the finetuned model is saved in it again, and frozen
    weights are held in it."""
    counts: dict[torch.dtype, int] = {}
    for meta in checkpoint.tensors.values():
        if meta.dtype.is_floating_point:
            counts[meta.dtype] = counts.get(meta.dtype, 0) + math.prod(meta.shape)
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def frozen_dtype(checkpoint: Any, precision: str) -> torch.dtype:
    """The dtype the model is loaded in, which its frozen weights keep (what trains is then made float32).

    Under bf16 autocast a bf16 checkpoint stays bf16: autocast runs every matrix product in bf16 anyway, so a float32
    copy of a frozen weight would only double its memory (a LoRA base, the untrained layers of a freeze spec).
    Computing in float32 (no bf16 units, `bf16: false`) needs float32 operands, and float16 is upcast too: an fp16
    embedding would carry the residual stream in fp16, which overflows where bf16 does not."""
    return held_dtype(stored_dtype(checkpoint), precision)


def held_dtype(stored: torch.dtype, precision: str) -> torch.dtype:
    """`frozen_dtype` of a checkpoint stored in `stored` (what the memory plan prices a finetune's weights in)."""
    return stored if precision == "bf16" and stored == torch.bfloat16 else torch.float32
