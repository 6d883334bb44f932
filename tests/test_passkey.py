"""Passkey retrieval: the prompt hides the key where asked, fits the length, and the answer is read by greedy decoding."""

from __future__ import annotations

from pathlib import Path

import re
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from conftest import char_tokenizer, tiny_model
from llm_retrofit import EvaluationError
from llm_retrofit.evaluation.passkey import (
    ANSWER_TOKENS,
    FILLER,
    QUESTION,
    first_number,
    greedy_answer,
    passkey_prompt,
    passkey_trials,
)


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


def test_each_trial_answers_what_transformers_generate_answers() -> None:
    model, tokenizer = tiny_model(), char_tokenizer()
    with torch.no_grad():  # logit 0 for ids that decode to nothing (and for </s>): the answers are 8 visible characters
        model.lm_head.weight[[i for i in range(128) if not 32 <= i < 127]] = 0.0
    trials = passkey_trials(model, tokenizer, [400], [0.0, 0.5], trials=2)
    assert all(len(t.answer) == ANSWER_TOKENS for t in trials), [t.answer for t in trials]
    for trial in trials:
        ids = torch.tensor([passkey_prompt(tokenizer, 400, trial.depth, trial.key).input_ids])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                                   do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        assert trial.answer == tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
        assert trial.prompt_tokens == ids.shape[1]


class ScriptedModel(LlamaForCausalLM):
    """A model whose answer is known in advance: it reads the key off the prompt (one character per token) and
    replies `reply(key)`, one character per decoding step. The ground truth for what a trial must count as correct."""

    def __init__(self, reply: Callable[[str], str]) -> None:
        super().__init__(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, eos_token_id=2))
        self.reply, self.pending = reply, []

    def forward(self, input_ids: torch.Tensor, **_: object) -> CausalLMOutputWithPast:
        if input_ids.shape[1] > 1:  # the prompt: plan the reply
            key = re.search(r"The pass key is (\d+)\.", "".join(map(chr, input_ids[0].tolist()))).group(1)
            self.pending = [ord(c) for c in self.reply(key)] + [2]  # then </s>
        logits = torch.full((1, 1, 128), -1e4)
        logits[0, 0, self.pending.pop(0) if self.pending else 2] = 0.0
        return CausalLMOutputWithPast(logits=logits)


@pytest.mark.parametrize(
    ("reply", "correct"),
    [
        (lambda key: f" {key}.", True),
        (lambda key: f" {key}", True),  # stops at the end of the number
        (lambda key: f" {int(key) + 1}.", False),  # another number
        (lambda key: f" 7 {key}.", False),  # the key, but not as the first number
        (lambda key: " the pass key.", False),  # no number at all
    ],
)
def test_a_trial_is_correct_exactly_when_the_first_number_of_the_answer_is_the_key(reply, correct: bool) -> None:
    trials = passkey_trials(ScriptedModel(reply), char_tokenizer(), [400, 600], [0.0, 0.5, 1.0], trials=2)
    assert len(trials) == 12 and len({t.key for t in trials}) == 12
    # The answer is what the model said, up to ANSWER_TOKENS tokens (here characters) or its end of sequence.
    assert [t.answer for t in trials] == [reply(t.key)[:ANSWER_TOKENS] for t in trials]
    assert [t.correct for t in trials] == [correct] * 12
