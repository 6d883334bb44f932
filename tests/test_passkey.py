"""Passkey retrieval: the prompt hides the key where asked, fits the length, and the answer is read by greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, tiny_model
from llm_retrofit import EvaluationError
from llm_retrofit.evaluation.passkey import FILLER, QUESTION, first_number, greedy_answer, passkey_prompt, passkey_trials


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("length", [400, 1000, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_places_the_key_at_the_requested_depth(bos: bool, length: int, depth: float) -> None:
    tokenizer = char_tokenizer(bos=bos)  # one token per character: positions can be checked exactly
    prompt = passkey_prompt(tokenizer, length, depth, "48213")
    ids = prompt.input_ids
    assert length - len(FILLER) - 1 < len(ids) <= length, "as much filler as fits"
    assert (ids[0] == tokenizer.bos_token_id) == bos, "the tokenizer's own BOS convention"
    assert tokenizer.decode(ids[prompt.key_start :]).startswith("The pass key is 48213. Remember it. 48213 is the pass key.")
    assert tokenizer.decode(ids[prompt.question_start :]) == QUESTION
    # The key sits after a whole number of filler sentences: depth is met to within one sentence of the filler.
    assert abs(prompt.depth - depth) <= 1 / prompt.repeats
    assert prompt.repeats_before_key == round(depth * prompt.repeats)


def test_passkey_prompt_with_a_real_bpe_tokenizer(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    for depth in (0.0, 0.5, 1.0):
        prompt = passkey_prompt(tokenizer, 2048, depth, "90210")
        assert 1900 < len(prompt.input_ids) <= 2048
        assert tokenizer.decode(prompt.input_ids[prompt.key_start : prompt.key_start + 8]).strip().startswith("The pass key is 9")
        assert abs(prompt.depth - depth) < 0.02


def test_a_length_too_short_for_the_prompt_is_refused() -> None:
    with pytest.raises(EvaluationError, match="needs more than 100 tokens"):
        passkey_prompt(char_tokenizer(), 100, 0.5, "12345")
    with pytest.raises(EvaluationError, match="outside \\[0, 1\\]"):
        passkey_prompt(char_tokenizer(), 1000, 1.5, "12345")


def test_greedy_answer_equals_transformers_generate() -> None:
    model = tiny_model()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    ours = greedy_answer(model, ids[0].tolist(), new_tokens=6)
    theirs = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, attention_mask=torch.ones_like(ids))
    assert ours == theirs[0, 40:].tolist()


def test_the_answer_is_the_first_number() -> None:
    assert first_number(" 71432. Remember it.") == "71432"
    assert first_number(" the pass key.") is None


def test_trials_use_the_same_keys_for_every_model() -> None:
    tokenizer = char_tokenizer()
    first = passkey_trials(tiny_model(seed=0), tokenizer, [400], [0.0, 1.0], trials=2)
    second = passkey_trials(tiny_model(seed=1), tokenizer, [400], [0.0, 1.0], trials=2)
    assert [t.key for t in first] == [t.key for t in second] and len({t.key for t in first}) == 4
    assert [(t.length, t.depth) for t in first] == [(400, 0.0), (400, 0.0), (400, 1.0), (400, 1.0)]
    assert all(t.correct == (first_number(t.answer) == t.key) for t in first + second)
