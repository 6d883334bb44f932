"""Shifted sparse attention (S2-Attn, LongLoRA: arXiv 2309.12307), a training-time attention for long sequences.

While training, each sequence of N tokens is cut into groups of G = N/4 tokens and attention stays inside a group,
which costs a quarter of full attention at long lengths. Half of the heads use groups shifted by G/2, so information
crosses group borders from layer to layer. The model itself is not changed: at inference (and for the held-out eval
loss) it uses full attention, which is what LongLoRA shows the finetuned model then handles.

The shifted groups here are [0, G/2), [G/2, 3G/2), ..., [N - G/2, N): the first and last half groups stand on their
own. LongLoRA's reference code rolls the sequence instead, which puts the last G/2 tokens in front of the first ones
in a causal group, so early tokens see late ones (a leak of the future into a causal LM's loss); here no token ever
attends to a later one.

It is a transformers attention function (`AttentionInterface`): `enable(model)` switches a loaded model to it and
returns the implementation to switch back to before saving.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "llm_retrofit_s2_attn"
GROUPS = 4  # LongLoRA's group size is a quarter of the training length


def group_size(length: int) -> int | None:
    """The group size for a training sequence of `length` tokens, or None when it cannot be split evenly."""
    group = length // GROUPS
    return group if group >= 2 and length % GROUPS == 0 and group % 2 == 0 else None


def _causal_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, size: int, **sdpa: Any) -> torch.Tensor:
    """Causal attention inside consecutive blocks of `size` positions; (B, H, N, D) with N a multiple of `size`."""
    batch, heads, length, dim = query.shape
    blocks = length // size

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, heads, blocks, size, dim).transpose(1, 2).reshape(batch * blocks, heads, size, dim)

    out = F.scaled_dot_product_attention(split(query), split(key), split(value), is_causal=True, **sdpa)
    return out.reshape(batch, blocks, heads, size, dim).transpose(1, 2).reshape(batch, heads, length, dim)


def shifted_groups_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: int,
                             **sdpa: Any) -> torch.Tensor:
    """S2-Attn on (batch, heads, N, head_dim) tensors with as many key/value heads as query heads."""
    length, half_heads, shift = query.shape[2], query.shape[1] // 2, group // 2
    plain = _causal_blocks(query[:, :half_heads], key[:, :half_heads], value[:, :half_heads], group, **sdpa)
    q, k, v = query[:, half_heads:], key[:, half_heads:], value[:, half_heads:]
    pieces = [(0, shift, shift), (shift, length - shift, group), (length - shift, length, shift)]
    shifted = torch.cat([_causal_blocks(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], size, **sdpa) for a, b, size in pieces],
                        dim=2)
    return torch.cat([plain, shifted], dim=1)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: S2-Attn while training on whole sequences, sdpa otherwise."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    length = query.shape[2]
    group = group_size(length)
    if not module.training or attention_mask is not None or key.shape[2] != length or group is None:
        # Inference, cached decoding, padded batches: full attention, exactly as the saved model will run.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    repeats = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, repeats), repeat_kv(value, repeats)
    out = shifted_groups_attention(query, key, value, group, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def enable(model: Any) -> str:
    """Train `model` (a transformers causal LM) with S2-Attn; returns its attention implementation, to restore."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # no mask for whole causal rows, as with sdpa
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    return previous
