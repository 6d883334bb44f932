"""LoRA finetunes (a trained spec, not a patcher): a peft adapter that reloads with vanilla peft and equals the merged
model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_retrofit.errors import PatchSpecError
from llm_retrofit.training.finetune import finetune
from llm_retrofit.training.lora import LoraSpec, parse_lora
from conftest import read_config, state_of
from test_finetune import chars_model, corpus


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("options", [
    "r=4,alpha=8,trainable=embed_tokens+norm",
    "r=4,use_dora=true,use_rslora=true,target_modules=all-linear",
])
@pytest.mark.parametrize("tied", [False, True])
def test_adapter_reloads_with_vanilla_peft_and_equals_the_merged_model(tmp_path: Path, options: str, tied: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = chars_model(tmp_path / "base", tie_word_embeddings=tied)
    data = [str(corpus(tmp_path))]
    common = dict(data=data, steps=2, seq_len=32, lr=1e-2, seed=3)
    adapter = finetune(base, tmp_path / "adapter", lora=f"lora:{options},merge=false", **common)
    merged = finetune(base, tmp_path / "merged", lora=f"lora:{options},merge=true", **common)
    config = json.loads((adapter.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert not (adapter.path / "README.md").exists()  # peft's template card would be refused by `retrofit push`

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                         adapter.path).eval()
    full = AutoModelForCausalLM.from_pretrained(merged.path).eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.randint(3, 127, (2, 24), generator=torch.Generator().manual_seed(0))
    # Both runs are the same seeded training; merging adds B @ A into the float32 weights, which rounds differently
    # from applying it on the side: 1e-4 absolute on logits of magnitude ~1 is a few float32 ulps of accumulated error.
    torch.testing.assert_close(logits(reloaded, ids), logits(full, ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(plain, ids), logits(full, ids), atol=1e-3)  # the training did change the model
    if tied and "embed_tokens" in options:
        # The trained embedding is the head too. Without peft's ensure_weight_tying the trained copy of embed_tokens
        # is cut loose from lm_head and the merged checkpoint stores a separate lm_head.weight (checked: this fails
        # then), although its config still says the two are tied.
        saved, original = state_of(merged.path), state_of(base)
        assert "lm_head.weight" not in saved
        assert not torch.equal(saved["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert read_config(merged.path)["retrofit_history"][-1]["patch"] == "lora"


def test_lora_spec_rejects_unknown_keys_and_trainables() -> None:
    with pytest.raises(PatchSpecError, match="has no parameter 'rank'; its parameters are r"):
        parse_lora("lora:rank=8")
    with pytest.raises(PatchSpecError, match="choose from embed_tokens, norm, lm_head"):
        LoraSpec(trainable="embeddings")
    assert parse_lora({"r": 8, "target_modules": ["q_proj", "v_proj"]}).targets == ["q_proj", "v_proj"]
