"""The time a recipe expects: the passes it prices are the passes its steps run, and the probe prices any model.

Each test counts the forward passes a step really makes (a hook on the decoder records the token count of every
call) and compares them with what the step's pricing function predicts, before anything was loaded. Calls of at
most 32 tokens are left out of the count: the LM-head check (32 random tokens) and the passkey answer's decoding
steps (1 token each), which cost nothing next to a long pass and are not priced.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import char_tokenizer, save_tiny, tiny_model
from llm_retrofit.evaluation.perplexity import evaluate, forward_lengths
from llm_retrofit.modeling.cost import PassCost, measure

SHORT_CALLS = 32
PAIRS = 8  # the tiny models' head_dim is 64 / 4 = 16: 8 rotary pairs

ROPES = {
    "plain": {"max_position_embeddings": 512},
    "longrope": {
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "factor": 2.0,
                            "original_max_position_embeddings": 256, "long_factor": [1.0 + i / 4 for i in range(PAIRS)],
                            "short_factor": [1.0] * PAIRS},
    },
    "dynamic": {"max_position_embeddings": 256,
                "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}},
}


class PassCounter:
    """Records the token count of every call of a model's decoder longer than SHORT_CALLS."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        self.handle = model.get_decoder().register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > SHORT_CALLS:
            self.lengths.append(int(ids.shape[-1]))


def random_text(size: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(size))


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_evaluate_runs_the_passes_forward_lengths_prices(rope: str) -> None:
    model = tiny_model(**ROPES[rope])
    documents, lengths = [random_text(600, 1), random_text(400, 2)], [128, 256, 384, 512]
    counter = PassCounter(model)
    evaluate(model, documents, tokenizer=char_tokenizer(), lengths=lengths, passkey=True, passkey_lengths=[512],
             passkey_depths=[0.5], progress=False)
    priced = forward_lengths(model.config.to_dict(), [600, 400], lengths, passkey=True, passkey_lengths=[512],
                             passkey_depths=[0.5])
    perplexity_passes, passkey_passes = counter.lengths[:-1], counter.lengths[-1:]
    assert sorted(perplexity_passes) == sorted(priced[:-1])
    # A passkey prompt is priced at its length; the prompt itself stops at the last whole filler sentence before it.
    assert len(passkey_passes) == 1 and 0.8 * priced[-1] <= passkey_passes[0] <= priced[-1]


def test_the_rope_classes_decide_the_passes() -> None:
    """Against hand counts: a plain RoPE shares one pass per document (the longest length it has), LongRoPE two
    (up to and past the original context), dynamic NTK one per length past the original context."""
    lengths = [128, 256, 384, 512]
    passes = {rope: forward_lengths(tiny_model(**settings).config.to_dict(), [600], lengths)
              for rope, settings in ROPES.items()}
    assert sorted(passes["plain"]) == [512]
    assert sorted(passes["longrope"]) == [256, 512]
    assert sorted(passes["dynamic"]) == [256, 384, 512]


def test_a_longrope_search_runs_the_passes_its_patcher_prices(tmp_path: Path) -> None:
    from llm_retrofit.patchers import parse_spec
    from llm_retrofit.plan import ModelView, build_plan

    path = save_tiny(tmp_path / "tiny", max_position_embeddings=128)
    char_tokenizer().save_pretrained(path)
    (tmp_path / "docs.txt").write_text(random_text(600, 3))
    patcher = parse_spec(f"longrope:target_length=256,data={tmp_path / 'docs.txt'},population=3,iterations=1")
    config = json.loads((path / "config.json").read_text())
    counted: list[int] = []
    original = torch.nn.Module.__call__

    def counting_call(module: torch.nn.Module, *args, **kwargs):
        if type(module).__name__ == "LlamaModel":
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and ids.shape[-1] > SHORT_CALLS:
                counted.append(int(ids.shape[-1]))
        return original(module, *args, **kwargs)

    from llm_retrofit.io.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    torch.nn.Module.__call__ = counting_call
    try:
        build_plan(ModelView(config, checkpoint.tensors, checkpoint.path), [patcher])
    finally:
        torch.nn.Module.__call__ = original
    priced = [one.tokens for one in patcher.passes(config)]
    # The priced count is the most the search runs: a child equal to a candidate already scored is not run again.
    assert set(counted) == {256} and 3 <= len(counted) <= len(priced) == 6


def test_a_pass_costs_its_linear_and_quadratic_parts() -> None:
    cost = PassCost(linear=2e-3, attention=1e-6, arithmetic="float32 on cpu")
    assert cost.forward(1000) == pytest.approx(2e-3 * 1000 + 1e-6 * 1000**2)
    # LongLoRA's groups make attention quadratic in the group, not the sequence; checkpointing adds a forward.
    one_forward = 2e-3 * 1000 + 1e-6 * 250 * 1000
    assert cost.train_step(1000, checkpointing=True, attention_group=250) == pytest.approx(4 * one_forward)
    assert cost.train_step(1000, checkpointing=False) == pytest.approx(3 * cost.forward(1000))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "mixtral"])
def test_the_probe_prices_every_supported_architecture(model_type: str) -> None:
    extra = {"num_local_experts": 4, "num_experts_per_tok": 2} if model_type == "mixtral" else {}
    config = tiny_model(model_type, **extra).config.to_dict()
    cost = measure(config)
    assert cost.linear > 0 and cost.attention > 0 and math.isfinite(cost.forward(16384))
    assert cost.arithmetic == "float32 on cpu"
