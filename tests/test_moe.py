"""MoE upcycling: a dense Llama/Mistral becomes a Mixtral that computes the same function until trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from conftest import char_tokenizer, read_config, save_tiny, state_of
from llm_retrofit import PatchError, PatchSpecError, patch, upcycle_moe
from llm_retrofit.patchers import parse_spec
from llm_retrofit.patchers.moe import _balanced_kmeans

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model_or_path: torch.nn.Module | Path) -> torch.Tensor:
    model = model_or_path if isinstance(model_or_path, torch.nn.Module) else AutoModelForCausalLM.from_pretrained(model_or_path)
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("layout", ["tiny_llama", "tiny_mistral"])
def test_upcycled_model_loads_as_mixtral_in_vanilla_transformers(layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    source: Path = request.getfixturevalue(layout)
    output = patch(source, "moe:num_experts=4,top_k=2", output=tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(output)
    assert isinstance(model, MixtralForCausalLM)
    config = read_config(output)
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    assert config["sliding_window"] == read_config(source).get("sliding_window")  # 64 for Mistral, None for Llama
    assert config["rope_parameters"] == read_config(source)["rope_parameters"]


@pytest.mark.parametrize("layout", ["tiny_llama", "tiny_mistral"])
def test_copied_experts_with_top2_reproduce_the_dense_logits(layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    source: Path = request.getfixturevalue(layout)
    output = patch(source, "moe:num_experts=4,top_k=2", output=tmp_path / "moe")
    # Renormalised top-2 weights sum to 1 (up to float rounding) over two identical experts.
    torch.testing.assert_close(logits(output), logits(source), rtol=0, atol=1e-5)


def test_copied_experts_with_top1_reproduce_the_dense_logits(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, "moe:num_experts=4,top_k=1", output=tmp_path / "moe")
    # A weight of exactly 1.0; the only difference is that the sparse path multiplies the routed tokens as their
    # own batch, which BLAS may block differently: at most an ulp or so of fp32 per logit.
    torch.testing.assert_close(logits(output), logits(tiny_llama), rtol=0, atol=1e-6)


def test_uniform_router_is_bit_exact(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, "moe:num_experts=4,top_k=2,router=uniform", output=tmp_path / "moe")
    assert torch.equal(logits(output), logits(tiny_llama))  # 0.5 * y + 0.5 * y == y exactly in binary floating point


def test_experts_are_byte_copies_of_the_dense_mlp(tiny_llama: Path, tmp_path: Path) -> None:
    dense = state_of(tiny_llama)
    moe = state_of(patch(tiny_llama, "moe:num_experts=3,top_k=2", output=tmp_path / "moe"))
    for expert in range(3):
        for w, name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            assert torch.equal(moe[f"model.layers.1.block_sparse_moe.experts.{expert}.{w}.weight"], dense[f"model.layers.1.mlp.{name}.weight"])
    assert moe["model.layers.1.block_sparse_moe.gate.weight"].shape == (3, 64)
    assert not any(".mlp." in name for name in moe)


def test_noise_and_drop_diversify_experts_reproducibly(tiny_llama: Path, tmp_path: Path) -> None:
    first = state_of(patch(tiny_llama, "moe:num_experts=2,top_k=1,noise=0.05,drop=0.5", output=tmp_path / "a"))
    again = state_of(patch(tiny_llama, "moe:num_experts=2,top_k=1,noise=0.05,drop=0.5", output=tmp_path / "b"))
    name = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    assert torch.equal(first[name.format(0)], again[name.format(0)]), "same seed, same experts"
    assert not torch.equal(first[name.format(0)], first[name.format(1)]), "experts differ from each other"


def test_drop_upcycling_reinitialises_the_same_neurons_in_w1_w2_w3(tiny_llama: Path, tmp_path: Path) -> None:
    dense = state_of(tiny_llama)
    moe = state_of(patch(tiny_llama, "moe:num_experts=2,top_k=1,drop=0.25", output=tmp_path / "moe"))
    prefix = "model.layers.0.block_sparse_moe.experts.1."
    rows_w1 = (moe[prefix + "w1.weight"] != dense["model.layers.0.mlp.gate_proj.weight"]).any(dim=1)
    rows_w3 = (moe[prefix + "w3.weight"] != dense["model.layers.0.mlp.up_proj.weight"]).any(dim=1)
    cols_w2 = (moe[prefix + "w2.weight"] != dense["model.layers.0.mlp.down_proj.weight"]).any(dim=0)
    assert torch.equal(rows_w1, rows_w3) and torch.equal(rows_w1, cols_w2)
    assert rows_w1.sum() == round(0.25 * 96)  # 96 intermediate neurons


@pytest.mark.parametrize("partition", ["random", "cluster"])
def test_split_experts_partition_the_neurons(tiny_llama: Path, tmp_path: Path, partition: str) -> None:
    dense = state_of(tiny_llama)
    output = patch(tiny_llama, f"moe:num_experts=4,top_k=2,split=true,partition={partition}", output=tmp_path / "moe")
    moe = state_of(output)
    assert read_config(output)["intermediate_size"] == 96 // 4
    rows = torch.cat([moe[f"model.layers.2.block_sparse_moe.experts.{e}.w1.weight"] for e in range(4)])
    assert torch.equal(rows.sort(dim=0).values, dense["model.layers.2.mlp.gate_proj.weight"].sort(dim=0).values)
    # Every neuron lands in exactly one expert, and the down projection carries the E = 4 output scale.
    down = torch.cat([moe[f"model.layers.2.block_sparse_moe.experts.{e}.w2.weight"] for e in range(4)], dim=1)
    assert torch.allclose(down.abs().sum(), 4 * dense["model.layers.2.mlp.down_proj.weight"].abs().sum(), rtol=1e-5)


def test_split_with_all_experts_active_is_the_dense_model(tiny_llama: Path, tmp_path: Path) -> None:
    """With top_k = E every neuron is used; a uniform router weighs each expert 1/E and each expert's output carries
    the scale E, so the sum is the dense MLP. Tolerance: float32 rounding of a 3-layer model's logits."""
    output = patch(tiny_llama, "moe:num_experts=2,top_k=2,split=true,router=uniform", output=tmp_path / "moe")
    torch.testing.assert_close(logits(output), logits(tiny_llama), rtol=0, atol=1e-5)


def test_split_with_fewer_active_experts_is_the_dense_mlp_in_expectation(tmp_path: Path) -> None:
    """With K < E of E neuron groups active, Mixtral's renormalised top-K weights sum to 1, so the E scale makes the
    output an unbiased estimate of the dense MLP: projected onto the dense output over many random tokens, the
    coefficient is 1. Measured over 8192 tokens and 4 seeds: 0.99-1.01 per layer (a scale of E/K gives 1/K = 0.5),
    hence the 0.05 tolerance."""
    source = save_tiny(tmp_path / "dense", intermediate_size=256)
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    moe = AutoModelForCausalLM.from_pretrained(patch(source, "moe:num_experts=8,top_k=2,split=true", output=tmp_path / "moe"))
    tokens = torch.randn(1, 8192, 64, generator=torch.Generator().manual_seed(1))
    for dense_layer, moe_layer in zip(dense.model.layers, moe.eval().model.layers):
        with torch.no_grad():
            expected, estimate = dense_layer.mlp(tokens), moe_layer.mlp(tokens)
        coefficient = (estimate * expected).sum() / (expected * expected).sum()
        assert abs(coefficient.item() - 1) < 0.05, coefficient.item()


def test_balanced_kmeans_gives_equal_clusters_of_similar_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=generator) * 10
    points = torch.cat([centres[i] + torch.randn(6, 8, generator=generator) * 0.1 for i in range(4)])
    groups = _balanced_kmeans(points, 4, seed=0)
    assert sorted(len(g) for g in groups) == [6, 6, 6, 6]
    assert sorted(sorted(g.tolist()) for g in groups) == [list(range(i * 6, i * 6 + 6)) for i in range(4)]


def test_hidden_router_sends_each_experts_prompts_to_it(tiny_llama: Path, tmp_path: Path) -> None:
    char_tokenizer().save_pretrained(tiny_llama)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["abcabcabc", ["xyzzy", "zyxzyx"], "mnopqmnop"]))

    output = patch(tiny_llama, f"moe:num_experts=3,top_k=1,router=hidden,prompts={prompts}", output=tmp_path / "moe")
    router = state_of(output)["model.layers.1.block_sparse_moe.gate.weight"]
    assert torch.allclose(router.norm(dim=1), torch.ones(3))
    # Row e is expert e's mean MLP input, normalised; by Cauchy-Schwarz that mean scores highest on its own row.
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama)
    captured: list[torch.Tensor] = []
    dense.model.layers[1].mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0][0].mean(0)))
    with torch.no_grad():
        for text in ("abcabcabc", "mnopqmnop"):
            dense(torch.tensor([[ord(c) for c in text]]))
    assert (router @ captured[0]).argmax() == 0 and (router @ captured[1]).argmax() == 2


def test_python_api_on_a_loaded_model(tiny_llama: Path) -> None:
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama)
    moe = upcycle_moe(dense, num_experts=4, top_k=2)
    assert isinstance(moe, MixtralForCausalLM)
    torch.testing.assert_close(logits(moe), logits(dense), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("moe:num_experts=1", "at least 2 experts"),
        ("moe:num_experts=4,top_k=5", "top_k=5 must be between 1 and num_experts=4"),
        ("moe:router=hidden", "router=hidden needs prompts=FILE"),
        ("moe:split=true,noise=0.1", "does not combine"),
    ],
)
def test_impossible_settings_are_refused(spec: str, message: str) -> None:
    with pytest.raises(PatchSpecError, match=message):
        parse_spec(spec)


def test_prompt_count_must_match_the_experts(tiny_llama: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("- one\n- two\n")
    with pytest.raises(PatchSpecError, match="prompts for 2 experts but num_experts=3"):
        patch(tiny_llama, f"moe:num_experts=3,router=hidden,prompts={prompts}", output=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_mixtral_cannot_be_upcycled_again(tiny_llama: Path, tmp_path: Path) -> None:
    moe = patch(tiny_llama, "moe:num_experts=2,top_k=1", output=tmp_path / "moe")
    with pytest.raises(PatchError, match="dense llama or mistral"):
        patch(moe, "moe:num_experts=2,top_k=1", output=tmp_path / "again", force=True)


def test_biases_are_refused(tmp_path: Path) -> None:
    from conftest import save_tiny

    source = save_tiny(tmp_path / "biased", attention_bias=True)
    with pytest.raises(PatchError, match="biases"):
        patch(source, "moe:num_experts=2", output=tmp_path / "x")


def test_a_tied_lm_head_is_written_untied_with_the_same_logits(tmp_path: Path) -> None:
    """SGLang's Mixtral builds its own output layer whatever tie_word_embeddings says: the head must be stored."""
    source = save_tiny(tmp_path / "tied", tie_word_embeddings=True)
    untied = patch(source, "moe:num_experts=2,top_k=1", output=tmp_path / "untied")
    tied = patch(source, "moe:num_experts=2,top_k=1,untie_lm_head=false", output=tmp_path / "still-tied")
    assert read_config(untied)["tie_word_embeddings"] is False and read_config(tied)["tie_word_embeddings"] is True
    weights = state_of(untied)
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert "lm_head.weight" not in state_of(tied)
    torch.testing.assert_close(logits(untied), logits(tied), rtol=0, atol=0)
    torch.testing.assert_close(logits(untied), logits(source), rtol=0, atol=1e-5)  # top-1 of identical experts
    # The same plan on a loaded model (whose state dict leaves the tied head out) unties it the same way.
    in_memory = upcycle_moe(AutoModelForCausalLM.from_pretrained(source), num_experts=2, top_k=1)
    assert in_memory.config.tie_word_embeddings is False
    assert in_memory.lm_head.weight.data_ptr() != in_memory.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(in_memory), logits(tied), rtol=0, atol=0)


def test_an_untied_source_keeps_its_own_head(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, "moe:num_experts=2,top_k=1", output=tmp_path / "moe")
    assert torch.equal(state_of(output)["lm_head.weight"], state_of(tiny_llama)["lm_head.weight"])
