"""No warning of a library we call reaches the user: each call site that transformers 5.24 or peft warn about is run
here with every warning turned into an error."""

from __future__ import annotations

import warnings

import torch

from conftest import tiny_model
from llm_retrofit.evaluation.passkey import greedy_answer
from llm_retrofit.modeling.rope_search import segment_nll
from llm_retrofit.training.lora import LoraSpec


def test_kv_cached_decoding_passes_the_cache_under_the_keyword_transformers_reads() -> None:
    model = tiny_model()
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy_answer(model, ids.tolist(), new_tokens=3)
        list(segment_nll(model, ids, segments=2))


def test_wrapping_a_model_with_lora_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraSpec(r=2).attach(tiny_model())
