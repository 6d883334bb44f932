"""The `attention` patch: kernels and sliding windows expressed in configs transformers already reads, shipped code
for the patterns it does not, and the plan's rules for files a checkpoint ships."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import read_config, save_tiny, state_of, tiny_model
from llm_retrofit import CheckpointError, PatchError, PatchSpecError, patch, set_attention
from llm_retrofit.patchers import parse_spec
from llm_retrofit.patchers.attention import SHIPPED_MODULE, unavailable_reason

IDS = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
SHIPPED = f"{SHIPPED_MODULE}.py"


def logits(path: Path, ids: torch.Tensor = IDS, mask: torch.Tensor | None = None, **load: object) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load).eval()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def sliding_mask(length: int, window: int) -> torch.Tensor:
    """The hand-built additive mask of a causal sliding window: query i sees key j iff i - window < j <= i."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    visible = (j <= i) & (j > i - window)
    return torch.zeros(length, length).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]


# ------------------------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize(
    "spec, message",
    [
        ("attention", "give impl=KERNEL, pattern=PATTERN or both"),
        ("attention:impl=fast", "is not a kernel"),
        ("attention:pattern=sliding", "needs window=W"),
        ("attention:pattern=sliding,window=0", "needs window=W"),
        ("attention:pattern=sliding,window=64,full_every=1", "full_every=1 would be no sliding window"),
        ("attention:pattern=sinks,window=64,full_every=2", "full_every do not apply to pattern=sinks"),
        ("attention:impl=sdpa,window=64", "window do not apply to a kernel choice without a pattern"),
        ("attention:pattern=block_sparse,window=100,block_size=64", "must be a multiple of it"),
        ("attention:pattern=sinks,window=64,sinks=-1", "sinks=-1 must be >= 0"),
        ("attention:pattern=spiral,window=64", "expected one of dense, sliding, sinks, block_sparse"),
    ],
)
def test_bad_specs_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(PatchSpecError, match=message):
        parse_spec(spec)


def test_a_kernel_this_machine_cannot_run_is_refused_with_the_alternative(tiny_llama: Path, tmp_path: Path) -> None:
    if unavailable_reason("flash_attention_2") is None:
        pytest.skip("this machine runs flash_attention_2")
    before = tiny_llama.joinpath("config.json").read_bytes()
    with pytest.raises(PatchError, match="cannot run on this machine.*Use impl=sdpa.*check=false"):
        patch(tiny_llama, "attention:impl=flash_attention_2", output=tmp_path / "out")
    assert not (tmp_path / "out").exists() and tiny_llama.joinpath("config.json").read_bytes() == before
    # For another machine: written, not checked.
    out = patch(tiny_llama, "attention:impl=flash_attention_2,check=false", output=tmp_path / "out")
    assert read_config(out)["attn_implementation"] == "flash_attention_2"


# ------------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex_attention"])
def test_every_kernel_gives_eagers_logits_and_is_what_plain_loading_uses(impl: str, tmp_path: Path) -> None:
    if unavailable_reason(impl):
        pytest.skip(unavailable_reason(impl))
    # flex on CPU miscompiles at head_dim 16 (NaN): 2 heads of 32 here.
    source = save_tiny(tmp_path / "src", num_attention_heads=2, num_key_value_heads=1)
    out = patch(source, f"attention:impl={impl}", output=tmp_path / impl)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config._attn_implementation == impl
    reference = logits(source, attn_implementation="eager")
    torch.testing.assert_close(logits(out), reference, atol=1e-4, rtol=1e-4)
    assert state_of(out).keys() == state_of(source).keys()


def test_a_loaded_model_switches_kernel_and_keeps_its_weights() -> None:
    model = tiny_model()
    with torch.no_grad():
        expected = model(IDS).logits
    switched = set_attention(model, impl="eager")
    assert switched.config._attn_implementation == "eager" and model.config._attn_implementation != "eager"
    with torch.no_grad():
        torch.testing.assert_close(switched(IDS).logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ sliding windows


def test_sliding_window_makes_llama_a_mistral_with_the_same_weight_bytes(tiny_llama: Path, tmp_path: Path) -> None:
    out = patch(tiny_llama, "attention:pattern=sliding,window=48", output=tmp_path / "out")
    config = read_config(out)
    assert (config["model_type"], config["architectures"], config["sliding_window"]) == (
        "mistral", ["MistralForCausalLM"], 48)
    assert "attention_bias" not in config and "mlp_bias" not in config
    # Config-only: the weight file is the source's, linked, not rewritten.
    assert os.path.samefile(out / "model.safetensors", tiny_llama / "model.safetensors")
    # A window as long as the input changes nothing.
    torch.testing.assert_close(logits(out), logits(tiny_llama), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_a_small_window_equals_the_hand_built_mask(tiny_llama: Path, tmp_path: Path, impl: str) -> None:
    out = patch(tiny_llama, "attention:pattern=sliding,window=8", output=tmp_path / "out")
    reference = logits(tiny_llama, mask=sliding_mask(IDS.shape[1], 8), attn_implementation="eager")
    windowed = logits(out, attn_implementation=impl)
    torch.testing.assert_close(windowed, reference, atol=1e-5, rtol=1e-5)
    assert (windowed - logits(tiny_llama)).abs().max() > 1e-3  # the window did cut something


def test_full_every_makes_a_hybrid_ministral(tiny_llama: Path, tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "src", num_hidden_layers=4)
    out = patch(source, "attention:pattern=sliding,window=8,full_every=2", output=tmp_path / "out")
    config = read_config(out)
    assert config["model_type"] == "ministral" and config["head_dim"] == 16
    assert config["layer_types"] == ["sliding_attention", "full_attention"] * 2
    # Window >= length: the original logits; small window: between the original and all-sliding.
    torch.testing.assert_close(logits(out, IDS[:, :8]), logits(source, IDS[:, :8]), atol=1e-5, rtol=1e-5)
    all_sliding = patch(source, "attention:pattern=sliding,window=8", output=tmp_path / "uniform")
    hybrid = logits(out)
    assert (hybrid - logits(source)).abs().max() > 1e-3 and (hybrid - logits(all_sliding)).abs().max() > 1e-3


def test_generation_with_a_sliding_window_keeps_a_bounded_cache(tiny_llama: Path, tmp_path: Path) -> None:
    out = patch(tiny_llama, "attention:pattern=sliding,window=16", output=tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    sizes = []
    cache = DynamicCache(config=model.config)
    ids = IDS[:, :4]
    with torch.no_grad():
        for _ in range(64):  # 4x the window, one token at a time, as generate does
            step = model(ids[:, -1:] if sizes else ids, cache=cache, use_cache=True)
            ids = torch.cat([ids, step.logits[:, -1:].argmax(-1)], dim=1)
            sizes.append(cache.layers[0].keys.shape[-2])
    assert max(sizes) <= 16 and sizes[-1] == max(sizes)
    generated = model.generate(IDS[:, :4], max_new_tokens=64, do_sample=False)
    assert torch.equal(generated, ids)


def test_a_biased_llama_cannot_become_a_mistral(tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "src", attention_bias=True)
    with pytest.raises(PatchError, match="Mistral.*has no bias tensors"):
        patch(source, "attention:pattern=sliding,window=8", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dense_removes_a_window(tiny_llama: Path, tmp_path: Path) -> None:
    windowed = patch(tiny_llama, "attention:pattern=sliding,window=8,full_every=3", output=tmp_path / "w")
    dense = patch(windowed, "attention:pattern=dense", output=tmp_path / "dense")
    config = read_config(dense)
    assert config["model_type"] == "mistral" and config["sliding_window"] is None and "layer_types" not in config
    torch.testing.assert_close(logits(dense), logits(tiny_llama), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ our own saves


def test_finetune_keeps_the_chosen_kernel(tiny_llama_chars: Path, tmp_path: Path) -> None:
    from llm_retrofit import finetune

    chosen = patch(tiny_llama_chars, "attention:impl=eager", output=tmp_path / "eager")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    tuned = finetune(chosen, output=tmp_path / "tuned", data=[str(text)], steps=1, seq_len=32, batch_size=1)
    assert read_config(tuned.path)["attn_implementation"] == "eager"


# ------------------------------------------------------------------------------------------------ shipped patterns


@pytest.mark.parametrize("spec", ["attention:pattern=sinks,sinks=2,window=8",
                                  "attention:pattern=block_sparse,window=16,block_size=8,global_blocks=1"])
def test_a_shipped_pattern_loads_from_disk_as_it_runs_in_memory(spec: str, tiny_llama: Path, tmp_path: Path) -> None:
    out = patch(tiny_llama, spec, output=tmp_path / "out")
    assert (out / SHIPPED).read_bytes() == (Path(__file__).parent.parent / "llm_retrofit/modeling/shipped" / SHIPPED).read_bytes()
    assert read_config(out)["auto_map"] == {"AutoModelForCausalLM": f"{SHIPPED_MODULE}.RetrofitLlamaForCausalLM"}
    assert os.path.samefile(out / "model.safetensors", tiny_llama / "model.safetensors")  # no weight changes
    from_disk = logits(out, trust_remote_code=True)
    in_memory = patch(tiny_model(), spec)
    with torch.no_grad():
        torch.testing.assert_close(from_disk, in_memory(IDS).logits, atol=1e-5, rtol=1e-5)
    assert (from_disk - logits(tiny_llama)).abs().max() > 1e-3  # the pattern did cut something
    # Without trust_remote_code, the same checkpoint is the plain model.
    torch.testing.assert_close(logits(out), logits(tiny_llama), atol=1e-6, rtol=1e-6)


def test_our_commands_run_our_shipped_code_and_no_one_elses(tiny_llama: Path, tmp_path: Path) -> None:
    from llm_retrofit.evaluation.perplexity import load_model

    out = patch(tiny_llama, "attention:pattern=sinks,sinks=2,window=8", output=tmp_path / "out")
    model, _ = load_model(out)
    assert type(model).__name__ == "RetrofitLlamaForCausalLM"
    # The same name with other contents (another version's, or edited) is neither run nor silently skipped.
    (out / SHIPPED).write_text((out / SHIPPED).read_text() + "\nraise SystemExit('not ours')\n")
    with pytest.raises(CheckpointError, match=f"is not the {SHIPPED} this llm-retrofit ships.*cp .*{SHIPPED}"):
        load_model(out)
    # Code we do not ship at all is never run by our commands, nor silently replaced by the plain architecture
    # (tests/reliability/test_remote_code.py holds every variant).
    config = json.loads((out / "config.json").read_text())
    (out / SHIPPED).rename(out / "their_modeling.py")
    config["auto_map"] = {"AutoModelForCausalLM": "their_modeling.RetrofitLlamaForCausalLM"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="auto_map names code that is not llm-retrofit's"):
        load_model(out)


def test_finetune_keeps_a_shipped_pattern(tiny_llama_chars: Path, tmp_path: Path) -> None:
    from llm_retrofit import finetune

    sinks = patch(tiny_llama_chars, "attention:pattern=sinks,sinks=2,window=8", output=tmp_path / "sinks")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    tuned = finetune(sinks, output=tmp_path / "tuned", data=[str(text)], steps=1, seq_len=32, batch_size=1).path
    config = read_config(tuned)
    assert config["retrofit_attention"] == {"pattern": "sinks", "sinks": 2, "window": 8}
    assert config["auto_map"] == read_config(sinks)["auto_map"]
    assert (tuned / SHIPPED).read_bytes() == (sinks / SHIPPED).read_bytes()


def test_going_back_to_dense_drops_the_shipped_file(tiny_llama: Path, tmp_path: Path) -> None:
    sinks = patch(tiny_llama, "attention:pattern=sinks,window=8", output=tmp_path / "sinks")
    dense = patch(sinks, "attention:pattern=dense", output=tmp_path / "dense")
    assert not (dense / SHIPPED).exists()
    config = read_config(dense)
    assert "auto_map" not in config and "retrofit_attention" not in config
    torch.testing.assert_close(logits(dense, trust_remote_code=True), logits(tiny_llama), atol=1e-6, rtol=1e-6)


def test_patching_a_loaded_model_prints_nothing_of_the_libraries(capfd: pytest.CaptureFixture[str]) -> None:
    model = tiny_model()
    capfd.readouterr()
    set_attention(model, pattern="sinks", window=8)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
