"""Layer-streamed calibration: the calibration text's hidden states go through the model one decoder layer at a time,
each layer read from the checkpoint and freed, and every calibrated result equals what the whole model gives.

The reference is the old path, written here independently: the whole model loaded by transformers in float32 (our
shipped modeling code included, as the patch runs it), run once per sequence with forward hooks on every layer. It
stands in for `run_layers`, the one runner every reduction uses, so a result computed both ways differs only in how
the model was run.

Tolerance: both ways run the same float32 kernels on the same inputs (each layer gets the very hidden states, mask
and position embeddings the whole model gives it), so on a CPU the results are bit-identical; the comparison allows
float32 rounding (rtol 1e-5) for kernels that may pick another reduction order on other hardware.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import char_tokenizer, save_tiny, state_of
from llm_retrofit import PatchError, patch
from llm_retrofit.io.checkpoint import Checkpoint, load_checkpoint
from llm_retrofit.modeling import activations
from llm_retrofit.modeling.activations import Tap, attention_moments, calibration_tokenizer, mean_mlp_inputs
from llm_retrofit.modeling.remote_code import runs_our_code
from llm_retrofit.plan import ModelView, checkpoint_view

GQA_FIT = "gqa:num_key_value_heads=1,method=fit,calibration_tokens=512"
PROMPTS = [["abcabcabc", "the quick brown fox"], ["xyzzy", "zyxzyx zyx"], ["mnopqmnop"]]


def whole_model(view: ModelView, sequences: list[torch.Tensor], tap: Tap) -> None:
    """The reference runner: the whole model as transformers loads it, in float32, with every layer's hooks."""
    assert isinstance(view.origin, Path)
    trusted = runs_our_code(view.origin, view.config)
    network = AutoModelForCausalLM.from_pretrained(view.origin, dtype=torch.float32, trust_remote_code=trusted).eval()
    current = [0]
    for index, layer in enumerate(network.model.layers):
        for key, module in tap.modules(index, layer).items():
            if tap.inputs:
                module.register_forward_pre_hook(lambda _m, args, key=key: tap.observe(current[0], key, args[0]))
            else:
                module.register_forward_hook(lambda _m, _args, out, key=key: tap.observe(current[0], key, out))
    with torch.no_grad():
        for sequence, ids in enumerate(sequences):
            current[0] = sequence
            network(ids[None])


def checkpoint(kind: str, path: Path) -> Path:
    """A tiny checkpoint with the one-character tokenizer: a Llama; a Mistral whose 16-token sliding window is far
    shorter than the 256-token calibration pieces; a Llama running our shipped attention-sinks pattern."""
    base = save_tiny(path / "base", "mistral" if kind == "mistral" else "llama",
                     **({"sliding_window": 16} if kind == "mistral" else {}))
    char_tokenizer().save_pretrained(base)
    if kind == "sinks":
        return patch(base, "attention:pattern=sinks,sinks=2,window=8", output=path / "sinks")
    return base


def both_ways(monkeypatch: pytest.MonkeyPatch, compute: Any) -> tuple[Any, Any]:
    """`compute()` run layer by layer, then with the whole-model reference runner."""
    streamed = compute("streamed")
    with monkeypatch.context() as context:
        context.setattr(activations, "run_layers", whole_model)
        return streamed, compute("whole")


KINDS = ["llama", "mistral", "sinks"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_streamed_gqa_fit_writes_what_the_whole_model_gives(kind: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    source = checkpoint(kind, tmp_path)
    streamed, whole = both_ways(monkeypatch, lambda name: state_of(patch(source, GQA_FIT, output=tmp_path / name)))
    projections = [n for n in whole if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))]
    assert len(projections) == 4 * 3
    for name in projections:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_a_streamed_hidden_router_writes_what_the_whole_model_gives(kind: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    source = checkpoint(kind, tmp_path)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    spec = f"moe:num_experts=3,top_k=1,router=hidden,prompts={prompts}"
    streamed, whole = both_ways(monkeypatch, lambda name: state_of(patch(source, spec, output=tmp_path / name)))
    routers = [name for name in whole if name.endswith("block_sparse_moe.gate.weight")]
    assert len(routers) == 3
    for name in routers:
        torch.testing.assert_close(streamed[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_mlp_means_of_the_sinks_pattern_are_the_whole_models(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """MoE upcycling refuses a checkpoint with an attention pattern, so the reduction behind its router is compared."""
    view = checkpoint_view(load_checkpoint(checkpoint("sinks", tmp_path)))
    streamed, whole = both_ways(monkeypatch, lambda _: mean_mlp_inputs(view, calibration_tokenizer(view), PROMPTS))
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=1e-7)


def test_a_loaded_model_calibrates_as_its_checkpoint(tmp_path: Path) -> None:
    """The same runner goes over a loaded model's own layers (nothing is read): the same fit as from the disk."""
    source = checkpoint("llama", tmp_path)
    from_disk = state_of(patch(source, GQA_FIT, output=tmp_path / "from-disk"))
    loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    from_memory = dict(patch(loaded, GQA_FIT).state_dict())
    for name in (n for n in from_disk if "_proj" in n and "self_attn" in n):
        torch.testing.assert_close(from_memory[name], from_disk[name], rtol=1e-5, atol=1e-7, msg=name)


def test_only_one_decoder_layer_is_in_memory_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = save_tiny(tmp_path / "deep", num_hidden_layers=6)
    networks: list[torch.nn.Module] = []
    build = activations._skeleton
    monkeypatch.setattr(activations, "_skeleton", lambda *args: networks.append(build(*args)) or networks[-1])
    reads: list[str] = []
    read = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: reads.append(name) or read(self, name))
    held: dict[int, set[str]] = {}

    def watch(index: int, layer: torch.nn.Module) -> dict[int, torch.nn.Module]:
        held[index] = {name for name, p in networks[0].named_parameters() if p.device.type != "meta"}
        return {}

    activations.run_layers(checkpoint_view(load_checkpoint(source)), [torch.arange(2, 40)], Tap(watch, lambda *_: None))
    assert held == {i: {f"model.layers.{i}.{name}" for name, _ in networks[0].model.layers[i].named_parameters()}
                    for i in range(6)}
    assert all(p.device.type == "meta" for p in networks[0].parameters())  # and nothing is left once done
    assert sorted(reads) == sorted(n for n in load_checkpoint(source).tensors if n != "lm_head.weight")  # each once


def test_a_checkpoint_transformers_converts_on_load_is_refused_with_the_fix(tmp_path: Path) -> None:
    """transformers 5 fuses Mixtral's experts while loading: one layer cannot be read by its in-memory names."""
    base = save_tiny(tmp_path / "base")
    char_tokenizer().save_pretrained(base)
    mixtral = patch(base, "moe:num_experts=2,top_k=1", output=tmp_path / "mixtral")
    with pytest.raises(PatchError, match="another layout .* patch the loaded model"):
        patch(mixtral, GQA_FIT, output=tmp_path / "pooled")


def test_streamed_calibration_of_smollm2_equals_the_whole_model(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    view = checkpoint_view(load_checkpoint(smollm2))
    tokenizer = calibration_tokenizer(view)
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest. " * 12
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    sequences = [ids[:64], ids[70:102]]
    streamed, whole = both_ways(monkeypatch, lambda _: attention_moments(view, sequences, groups=1))
    assert len(streamed) == 30
    for layer in streamed:
        for field in ("query_energy", "key_pairs", "values"):
            torch.testing.assert_close(getattr(streamed[layer], field), getattr(whole[layer], field), rtol=1e-5,
                                       atol=1e-7, msg=f"layer {layer} {field}")
        assert streamed[layer].tokens == whole[layer].tokens == 96
    prompts = [["Paris is the capital of France."], ["def f(x):\n    return x * 2"]]
    streamed_means, whole_means = both_ways(monkeypatch, lambda _: mean_mlp_inputs(view, tokenizer, prompts))
    torch.testing.assert_close(streamed_means, whole_means, rtol=1e-5, atol=1e-6)
