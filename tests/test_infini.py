"""The `infini` patch: gate tensors added to the weights, the Infini modeling file shipped, the original model exactly
on inputs of one segment, and the same model from disk and in memory. The memory itself is specified in
tests/test_infini_modeling.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import read_config, save_tiny, state_of, tiny_model
from llm_retrofit import PatchError, PatchSpecError, patch
from llm_retrofit.api import add_infini_memory
from llm_retrofit.patchers import parse_spec

SEGMENT = 16
IDS = torch.randint(0, 128, (1, 3 * SEGMENT + 5), generator=torch.Generator().manual_seed(0))
SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head_dim 32, GQA


def run(path: Path, ids: torch.Tensor = IDS, **load: object) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, **load).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "src", **SHAPE)


def test_the_patch_adds_one_gate_per_query_head_and_ships_the_modeling_file(source: Path, tmp_path: Path) -> None:
    out = patch(source, f"infini:segment_length={SEGMENT},update=linear,gate_init=-6", output=tmp_path / "out")
    config = read_config(out)
    assert config["retrofit_infini"] == {"segment_length": SEGMENT, "update": "linear", "gate_init": -6.0, "memory": True}
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_retrofit_infini.RetrofitInfiniLlamaForCausalLM"}
    assert (out / "modeling_retrofit_infini.py").is_file()
    before, after = state_of(source), state_of(out)
    gates = {name: t for name, t in after.items() if name not in before}
    assert sorted(gates) == [f"model.layers.{i}.self_attn.memory_gate" for i in range(3)]
    assert all(torch.equal(g, torch.full((4,), -6.0)) for g in gates.values())
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_at_init_it_is_the_original_on_one_segment_and_a_new_model_past_it(source: Path, tmp_path: Path) -> None:
    out = patch(source, f"infini:segment_length={SEGMENT}", output=tmp_path / "out")
    infini, original = run(out, trust_remote_code=True), run(source)
    torch.testing.assert_close(infini[:, :SEGMENT], original[:, :SEGMENT], atol=1e-6, rtol=0)
    assert (infini[:, SEGMENT:] - original[:, SEGMENT:]).abs().max() > 1e-2  # segment-local attention past N


def test_a_loaded_model_gets_the_same_memory_as_the_checkpoint(source: Path, tmp_path: Path) -> None:
    out = patch(source, f"infini:segment_length={SEGMENT}", output=tmp_path / "out")
    live = add_infini_memory(AutoModelForCausalLM.from_pretrained(source), segment_length=SEGMENT)
    assert type(live).__name__ == "RetrofitInfiniLlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(live(IDS).logits, run(out, trust_remote_code=True), atol=1e-6, rtol=0)


def test_a_bf16_checkpoint_gets_bf16_gates(tmp_path: Path) -> None:
    source = patch(save_tiny(tmp_path / "src", **SHAPE), "dtype:to=bfloat16", output=tmp_path / "bf16")
    out = patch(source, f"infini:segment_length={SEGMENT}", output=tmp_path / "out")
    assert state_of(out)["model.layers.0.self_attn.memory_gate"].dtype == torch.bfloat16


def test_it_cannot_be_combined_with_a_shipped_attention_pattern(source: Path, tmp_path: Path) -> None:
    with pytest.raises(PatchError, match="already loads custom code"):
        patch(source, "attention:pattern=sinks,window=8", f"infini:segment_length={SEGMENT}", output=tmp_path / "a")
    with pytest.raises(PatchError, match="loads custom code"):
        patch(source, f"infini:segment_length={SEGMENT}", "attention:pattern=sliding,window=8", output=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PatchSpecError, match="segment_length=1 must be at least 2"):
        parse_spec("infini:segment_length=1")
    with pytest.raises(PatchSpecError, match="needs segment_length"):
        parse_spec("infini")
    windowed = save_tiny(tmp_path / "mistral", "mistral", sliding_window=8, **SHAPE)
    with pytest.raises(PatchError, match="sliding window.*attention:pattern=dense first"):
        patch(windowed, f"infini:segment_length={SEGMENT}", output=tmp_path / "out")
    # A Mistral without a window is fine, and loads the Mistral class.
    plain = save_tiny(tmp_path / "plain-mistral", "mistral", sliding_window=None, **SHAPE)
    out = patch(plain, f"infini:segment_length={SEGMENT}", output=tmp_path / "ok")
    assert read_config(out)["auto_map"]["AutoModelForCausalLM"].endswith("RetrofitInfiniMistralForCausalLM")


def test_a_live_model_patched_twice_in_one_chain_keeps_its_weights() -> None:
    model = tiny_model(**SHAPE)
    live = patch(model, f"infini:segment_length={SEGMENT}", "ntk:factor=2")
    gates = [p for n, p in live.named_parameters() if n.endswith("memory_gate")]
    assert len(gates) == 3 and all(torch.equal(g, torch.full((4,), -8.0)) for g in gates)


def test_finetuning_trains_the_gates_at_their_own_rate_and_keeps_the_memory(tmp_path: Path) -> None:
    from conftest import char_tokenizer
    from llm_retrofit import finetune

    source = save_tiny(tmp_path / "src", **SHAPE)
    char_tokenizer().save_pretrained(source)
    infini = patch(source, f"infini:segment_length={SEGMENT}", output=tmp_path / "infini")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    tuned = finetune(infini, output=tmp_path / "tuned", data=[str(text)], steps=2, seq_len=4 * SEGMENT, lr=0.0,
                     train=["memory_gate"], lr_groups={"memory_gate": 1e-1}).path
    assert read_config(tuned)["retrofit_infini"] == read_config(infini)["retrofit_infini"]
    assert (tuned / "modeling_retrofit_infini.py").is_file()
    before, after = state_of(infini), state_of(tuned)
    gates = [name for name in after if name.endswith("memory_gate")]
    assert len(gates) == 3 and all(not torch.equal(before[n], after[n]) for n in gates)  # trained through the memory
    assert all(torch.equal(before[n], after[n]) for n in before if n not in gates)  # nothing else moved


def test_the_gate_histogram_counts_every_head_in_its_bin_and_the_card_reads_it_off_the_checkpoint(
        source: Path, tmp_path: Path) -> None:
    from llm_retrofit import render_card
    from llm_retrofit.evaluation.gates import gate_summary

    weights = torch.tensor([0.0005, 0.005, 0.05, 0.3])  # one head in each of the first four bins
    summary = gate_summary([("model.layers.10.self_attn.memory_gate", torch.logit(weights)),
                            ("model.layers.9.self_attn.memory_gate", torch.logit(torch.full((4,), 0.95)))])
    assert [b["count"] for b in summary["histogram"]] == [1, 1, 1, 1, 0, 4]
    assert summary["weights"][0] == pytest.approx([0.95] * 4) and summary["weights"][1] == pytest.approx(weights.tolist())
    assert gate_summary([("model.layers.0.self_attn.q_proj.weight", torch.zeros(4))]) is None
    out = patch(source, f"infini:segment_length={SEGMENT}", output=tmp_path / "out")
    card = render_card(out).read_text()
    assert "| [0, 0.001) | 12 |" in card  # 3 layers x 4 heads, all at sigmoid(-8)
    assert "12 gates (3 layers): mean 0.0003354" in card
