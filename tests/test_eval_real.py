"""Evaluation on the real SmolLM2-135M-Instruct: our perplexity is vanilla transformers' loss, and the model can
find a passkey it was shown."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_retrofit import evaluate, load_documents
from llm_retrofit.evaluation.passkey import passkey_trials


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2: Path) -> tuple:
    return AutoModelForCausalLM.from_pretrained(smollm2).eval(), AutoTokenizer.from_pretrained(smollm2)


def test_perplexity_of_the_first_2048_tokens_equals_transformers_labels_loss(model_and_tokenizer: tuple) -> None:
    """Same BOS convention on both sides: the tokenizer's default (SmolLM2 adds none), first token never scored."""
    model, tokenizer = model_and_tokenizer
    document = load_documents(["bundled:python-docs"], max_docs=1)
    found = evaluate(model, document, lengths=[2048], tokenizer=tokenizer, progress=False).models[0].perplexity[0]
    ids = torch.tensor([tokenizer(document[0].text)["input_ids"][:2048]])
    with torch.no_grad():
        vanilla = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert found.tokens == 2047
    assert abs(found.perplexity / vanilla - 1) < 1e-3
    assert 3 < found.perplexity < 30, "English prose, a capable model: a plausible perplexity"


def test_smollm2_finds_a_passkey_in_the_middle_of_a_thousand_tokens(model_and_tokenizer: tuple) -> None:
    model, tokenizer = model_and_tokenizer
    trials = passkey_trials(model, tokenizer, [1024], [0.5], trials=2, seed=3)
    assert all(t.correct for t in trials), [(t.key, t.answer) for t in trials]
