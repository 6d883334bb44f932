"""Serving what we write: a checkpoint that needs shipped code is never served as another model without a word
(docs/ARCHITECTURE.md, "No silent model swap"), and `retrofit serve-check` tells, per engine, whether a checkpoint is
served as patched, served differently, or refused (docs/serving.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import read_config, save_tiny
from llm_retrofit import patch
from llm_retrofit.evaluation.perplexity import load_model

SHIPPED = {"sinks": ("attention:pattern=sinks,sinks=2,window=8", "RetrofitLlamaForCausalLM"),
           "block-sparse": ("attention:pattern=block_sparse,block_size=4,window=8", "RetrofitLlamaForCausalLM"),
           "infini": ("infini:segment_length=16", "RetrofitInfiniLlamaForCausalLM")}
IDS = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("serving") / "src")


@pytest.fixture(scope="module")
def patched(source: Path) -> dict[str, Path]:
    return {name: patch(source, spec, output=source.parent / name) for name, (spec, _) in SHIPPED.items()}


# ------------------------------------------------------------------------------------------ no silent model swap


@pytest.mark.parametrize("name", SHIPPED)
def test_a_checkpoint_that_needs_shipped_code_names_its_class_in_architectures(patched: dict, name: str) -> None:
    config = read_config(patched[name])
    causal_lm = SHIPPED[name][1]
    assert config["architectures"] == [causal_lm]
    assert config["auto_map"]["AutoModelForCausalLM"].endswith(f".{causal_lm}")
    assert config["model_type"] == "llama"  # without trust_remote_code, transformers loads the stock class (the limit)


def test_removing_the_pattern_names_the_stock_class_again(patched: dict, tmp_path: Path) -> None:
    config = read_config(patch(patched["sinks"], "attention:pattern=dense", output=tmp_path / "dense"))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and "retrofit_attention" not in config


@pytest.mark.parametrize("name", ["sinks", "infini"])
def test_trust_remote_code_loads_the_shipped_class_and_generates(patched: dict, name: str) -> None:
    causal_lm = SHIPPED[name][1]
    plain = AutoModelForCausalLM.from_pretrained(patched[name], trust_remote_code=True).eval()
    ours, _ = load_model(patched[name])
    assert type(plain).__name__ == type(ours).__name__ == causal_lm
    out = plain.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 4)
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, ours(IDS).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sinks", "infini"])
def test_save_pretrained_of_the_loaded_model_writes_the_same_architectures(patched: dict, name: str,
                                                                          tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(patched[name], trust_remote_code=True)
    model.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["architectures"] == read_config(patched[name])["architectures"]


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_class_refuses_the_engines_transformers_backends(patched: dict, name: str) -> None:
    # vLLM's registry (_try_resolve_transformers) and SGLang's resolve_transformers_arch take an auto_map class only
    # when its is_backend_compatible() is true; their backend would then build the stock model with their attention.
    model = AutoModelForCausalLM.from_pretrained(patched[name], trust_remote_code=True)
    assert type(model).is_backend_compatible() is False
    assert AutoModelForCausalLM.from_pretrained(patched[name]).is_backend_compatible() is True  # the stock Llama
