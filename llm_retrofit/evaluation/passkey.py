"""Passkey retrieval: can the model repeat a 5-digit key hidden at a chosen depth inside a long stretch of filler?

The prompt is the standard one (Mohtashami & Jaggi, "Landmark Attention", 2023; used by LongLoRA, YaRN and LongRoPE):
an instruction, the filler sentence repeated, the key sentence inserted after a fraction `depth` of the filler, more
filler, then "What is the pass key? The pass key is". The model answers by greedy decoding; a trial is correct when
the first number in the answer is the key.

The prompt is tokenized as one string (so the tokens are the ones the model would see in use), with the tokenizer's
default special tokens (the BOS convention of `evaluate`), and the filler is repeated as often as fits in `length`.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EvaluationError
from ..modeling.kv_cache import cache_argument, returned_cache
from ..modeling.devices import input_device
from .report import PasskeyTrial

log = logging.getLogger(__name__)

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 8  # enough for " 12345." with any tokenizer that splits digits


@dataclass(frozen=True)
class PasskeyPrompt:
    """A tokenized passkey prompt and where its parts begin (token indices)."""

    input_ids: list[int]
    key: str
    filler_start: int
    key_start: int  # the key sentence
    key_end: int  # the filler resumes (or the question begins, at depth 1)
    question_start: int
    repeats: int  # filler sentences in the prompt
    repeats_before_key: int

    @property
    def depth(self) -> float:
        """Where the key ended up: the share of the filler's tokens that come before it."""
        before = self.key_start - self.filler_start
        filler = before + self.question_start - self.key_end
        return before / filler if filler else 0.0


def _text(repeats: int, before_key: int, key: str) -> tuple[str, list[int]]:
    """The prompt, and the character offsets where the filler, the key sentence, the rest and the question begin."""
    parts = [
        INSTRUCTION + " ",
        (FILLER + " ") * before_key,
        KEY_SENTENCE.format(key=key) + " ",
        (FILLER + " ") * (repeats - before_key),
        QUESTION,
    ]
    offsets = [sum(map(len, parts[:i])) for i in range(1, len(parts))]
    return "".join(parts), offsets


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyPrompt:
    """The longest standard prompt of at most `length` tokens with `key` after a fraction `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise EvaluationError(f"passkey depth {depth} is outside [0, 1]; 0 puts the key first, 1 last.")

    def build(repeats: int) -> PasskeyPrompt:
        before_key = round(depth * repeats)
        text, offsets = _text(repeats, before_key, key)
        encoding = tokenizer(text, add_special_tokens=True)
        starts = [_token_at(tokenizer, encoding, text, offset) for offset in offsets]
        return PasskeyPrompt(list(encoding["input_ids"]), key, *starts, repeats, before_key)

    fixed = len(build(0).input_ids)
    per_filler = len(tokenizer(" " + FILLER, add_special_tokens=False)["input_ids"])
    prompt = build(max(1, (length - fixed) // per_filler))
    while len(prompt.input_ids) > length and prompt.repeats > 1:  # joined text may tokenize longer; shrink to fit
        prompt = build(prompt.repeats - 1)
    if len(prompt.input_ids) > length:
        raise EvaluationError(
            f"a passkey prompt needs more than {length} tokens with this tokenizer ({fixed} without filler); "
            "use a larger length."
        )
    return prompt


def _token_at(tokenizer: Any, encoding: Any, text: str, char: int) -> int:
    """Index of the token that holds character `char` (the next one if that character is merged away)."""
    if hasattr(encoding, "char_to_token") and getattr(encoding, "encodings", None):
        for offset in range(char, len(text)):
            token = encoding.char_to_token(offset)
            if token is not None:
                return token
    return len(tokenizer(text[:char].rstrip(" "), add_special_tokens=True)["input_ids"])


def greedy_answer(model: Any, input_ids: list[int], new_tokens: int = ANSWER_TOKENS) -> list[int]:
    """Greedy decoding with the KV cache; only the last position's logits are ever computed (`logits_to_keep=1`).

    The prompt's forward builds the cache the model wants (a DynamicCache for a stock model, the bounded caches of
    attention sinks and Infini-attention for theirs), and every step after it reuses that one."""
    device = input_device(model)  # the embedding's: a placed model's first parameter may be offloaded (meta)
    ids = torch.tensor([input_ids], device=device)
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    stop = set(eos if isinstance(eos, list) else [eos]) - {None}
    answer: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = cache_argument(model, returned_cache(out))  # filled in place by every call
        for _ in range(new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token in stop:
                break
            answer.append(token)
            step = torch.tensor([[token]], device=device)
            out = model(input_ids=step, use_cache=True, logits_to_keep=1, **cache)
    return answer


def first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group() if match else None


def passkey_trials(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> list[PasskeyTrial]:
    """Every (length, depth) cell `trials` times, each with its own random 5-digit key (the same for every model)."""
    from ..io.progress import Progress

    rng = random.Random(seed)
    cells = [(length, depth) for length in lengths for depth in depths for _ in range(trials)]
    keys = [str(rng.randint(10_000, 99_999)) for _ in cells]
    results: list[PasskeyTrial] = []
    bar = Progress(sum(length for length, _ in cells), "passkey", "tok", unit_scale=True, enabled=progress)
    was_training = model.training
    model.eval()
    try:
        for (length, depth), key in zip(cells, keys):
            prompt = passkey_prompt(tokenizer, length, depth, key)
            answer = tokenizer.decode(greedy_answer(model, prompt.input_ids), skip_special_tokens=True)
            correct = first_number(answer) == key
            log.debug("passkey length=%d depth=%.2f key=%s answer=%r", length, depth, key, answer)
            results.append(PasskeyTrial(length, depth, key, answer, correct, len(prompt.input_ids), prompt.key_start))
            bar.update(length)
    finally:
        model.train(was_training)
        bar.close()
    return results
