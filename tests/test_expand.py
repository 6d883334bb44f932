"""Block expansion (LLaMA-Pro) keeps the model's function exactly; depth up-scaling (SOLAR) stacks two copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import read_config, save_tiny, state_of
from llm_retrofit import PatchError, PatchSpecError, expand_blocks, patch
from llm_retrofit.patchers import parse_spec

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(path_or_model: Path | torch.nn.Module) -> torch.Tensor:
    model = path_or_model if isinstance(path_or_model, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(path_or_model)
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize(("spec", "layers", "new"), [("expand:num_new_layers=3", 6, [1, 3, 5]), ("expand:every=2", 4, [2])])
def test_block_expansion_is_identity_at_init(tiny_llama: Path, tmp_path: Path, spec: str, layers: int, new: list[int]) -> None:
    output = patch(tiny_llama, spec, output=tmp_path / "expanded")
    config = read_config(output)
    assert config["num_hidden_layers"] == layers
    assert config["retrofit_history"][-1]["new_layers"] == new
    # A zeroed o_proj and down_proj make a layer add exactly 0 to the residual stream: same function, to 1e-6
    # (in fact bit-identical: x + 0 == x).
    torch.testing.assert_close(logits(output), logits(tiny_llama), rtol=0, atol=1e-6)


def test_new_layers_copy_the_layer_before_them_with_zero_output_projections(tiny_llama: Path, tmp_path: Path) -> None:
    old = state_of(tiny_llama)
    new = state_of(patch(tiny_llama, "expand:every=1", output=tmp_path / "expanded"))
    for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
        assert torch.equal(new[f"model.layers.3.{suffix}"], old[f"model.layers.1.{suffix}"])
    assert not new["model.layers.3.self_attn.o_proj.weight"].any()
    assert not new["model.layers.3.mlp.down_proj.weight"].any()
    assert torch.equal(new["model.layers.2.self_attn.o_proj.weight"], old["model.layers.1.self_attn.o_proj.weight"])


def test_biases_of_the_output_projections_are_zeroed_too(tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "biased", attention_bias=True, mlp_bias=True)
    output = patch(source, "expand:every=3", output=tmp_path / "expanded")
    assert not state_of(output)["model.layers.3.self_attn.o_proj.bias"].any()
    torch.testing.assert_close(logits(output), logits(source), rtol=0, atol=1e-6)


def test_mistral_expansion_keeps_the_sliding_window(tiny_mistral: Path, tmp_path: Path) -> None:
    output = patch(tiny_mistral, "expand:num_new_layers=1", output=tmp_path / "expanded")
    assert read_config(output)["sliding_window"] == 64
    torch.testing.assert_close(logits(output), logits(tiny_mistral), rtol=0, atol=1e-6)


def test_per_layer_config_lists_follow_their_layers(tmp_path: Path) -> None:
    import json

    source = save_tiny(tmp_path / "typed")
    config = json.loads((source / "config.json").read_text())
    config["layer_types"] = ["full_attention", "sliding_attention", "full_attention"]
    (source / "config.json").write_text(json.dumps(config))
    output = patch(source, "expand:every=2", output=tmp_path / "expanded")
    assert read_config(output)["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def test_expansions_compose(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, "expand:every=3", "expand:every=2", output=tmp_path / "twice")
    assert read_config(output)["num_hidden_layers"] == 6
    assert [r["new_layers"] for r in read_config(output)["retrofit_history"]] == [[3], [2, 5]]
    torch.testing.assert_close(logits(output), logits(tiny_llama), rtol=0, atol=1e-6)


def test_depth_upscaling_stacks_two_trimmed_copies(tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "deep", num_hidden_layers=4)
    output = patch(source, "dus:m=1", output=tmp_path / "dus")
    old, new = state_of(source), state_of(output)
    assert read_config(output)["num_hidden_layers"] == 6  # 2 * (4 - 1), as SOLAR's 2 * (32 - 8) = 48
    assert read_config(output)["retrofit_history"][-1]["layer_sources"] == [0, 1, 2, 1, 2, 3]
    assert torch.equal(new["model.layers.3.mlp.up_proj.weight"], old["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(new["model.layers.5.self_attn.o_proj.weight"], old["model.layers.3.self_attn.o_proj.weight"])


def test_python_api_on_a_loaded_model(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    expanded = expand_blocks(model, num_new_layers=3)
    assert len(expanded.model.layers) == 6
    torch.testing.assert_close(logits(expanded), logits(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("expand", PatchSpecError, "exactly one of num_new_layers=P or every=N"),
        ("expand:num_new_layers=2,every=1", PatchSpecError, "exactly one"),
        ("expand:num_new_layers=2", PatchError, r"3 layers cannot be split into 2 equal groups; use num_new_layers in \[1, 3\]"),
        ("expand:every=4", PatchError, "every=4 is more than the model's 3 layers"),
        ("dus:m=3", PatchError, "m=3 must be between 1 and 2"),
    ],
)
def test_impossible_depths_are_refused(tiny_llama: Path, tmp_path: Path, spec: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        patch(tiny_llama, parse_spec(spec) if error is PatchError else spec, output=tmp_path / "x")
    assert not (tmp_path / "x").exists()
