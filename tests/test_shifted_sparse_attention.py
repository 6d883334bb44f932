"""S2-Attn (LongLoRA's shifted sparse attention): grouped causal attention while training, full attention after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_retrofit.training.finetune import FinetuneError, FinetuneSettings, finetune
from llm_retrofit.modeling.shifted_sparse_attention import NAME, shifted_groups_attention
from conftest import read_config, state_of
from test_finetune import chars_model, corpus


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, group: int) -> torch.Tensor:
    """Plain softmax attention under an explicit mask: the first half of the heads attend inside groups
    [0, G), [G, 2G), ...; the second half inside [0, G/2), [G/2, 3G/2), ..., [N - G/2, N); always causally."""
    length, heads = query.shape[2], query.shape[1]
    position = torch.arange(length)
    causal = position[:, None] >= position[None, :]
    plain = position // group
    shifted = (position + group // 2) // group
    masks = [causal & (ids[:, None] == ids[None, :]) for ids in (plain, shifted)]
    mask = torch.stack([masks[0]] * (heads // 2) + [masks[1]] * (heads - heads // 2))  # (H, N, N)
    scores = (query @ key.transpose(-1, -2)) / query.shape[-1] ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ value


def test_grouped_attention_equals_attention_under_the_shifted_group_mask() -> None:
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 32, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(shifted_groups_attention(query, key, value, group=8), reference(query, key, value, 8))


def test_no_position_attends_to_a_later_one() -> None:
    # LongLoRA's reference code rolls the sequence, so its first tokens see its last ones in the shifted heads.
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, 2, 32, 8, generator=generator) for _ in range(3))
    before = shifted_groups_attention(query, key, value, group=8)
    key[:, :, 20:], value[:, :, 20:] = 0.0, 0.0
    after = shifted_groups_attention(query, key, value, group=8)
    assert torch.equal(before[:, :, :20], after[:, :, :20])


def test_s2_attn_trains_with_groups_and_saves_a_model_with_full_attention(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = chars_model(tmp_path / "base")
    common = dict(data=[str(corpus(tmp_path))], steps=2, seq_len=64, lr=1e-2, seed=0)
    grouped = finetune(base, tmp_path / "s2", s2_attn=True, **common)
    full = finetune(base, tmp_path / "full", **common)
    # The same first batch: the loss before any update differs only by the attention pattern.
    assert grouped.losses[0] != pytest.approx(full.losses[0], rel=1e-6)
    assert state_of(tmp_path / "s2").keys() == state_of(base).keys()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s2")  # a fresh load knows nothing of S2-Attn
    assert model.config._attn_implementation in ("sdpa", "eager")
    assert NAME not in json.dumps(read_config(tmp_path / "s2")), "the training-time attention is not saved"


def test_s2_attn_needs_a_length_that_splits_into_four_even_groups() -> None:
    with pytest.raises(FinetuneError, match="seq_len=100 does not divide so"):
        FinetuneSettings(steps=1, seq_len=100, s2_attn=True)
