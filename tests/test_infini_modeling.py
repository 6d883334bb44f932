"""Infini-attention shipped inside patched checkpoints (llm_retrofit/modeling/shipped/modeling_retrofit_infini.py):
the memory math against hand computations, the model against the stock model run segment by segment, carried state
against one long forward, generation against the full-forward argmax path, and loading where llm_retrofit is absent."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import WITHOUT_LLM_RETROFIT
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llm_retrofit.modeling.shipped import modeling_retrofit_infini as infini

SHIPPED_FILE = Path(infini.__file__)
N = 8  # segment length
TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512, initializer_range=0.1)


def tiny(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A random fp32 model with GQA (4 query heads, 2 KV heads)."""
    torch.manual_seed(seed)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**TINY)).eval()
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def converted(model: torch.nn.Module, update: str = "linear", gate: float | list[float] | None = None,
              **spec: object) -> torch.nn.Module:
    """A copy of `model` switched to Infini-attention with install(); `gate` then overrides every layer's gates."""
    copied = copy.deepcopy(model)
    copied.config.retrofit_infini = {"segment_length": N, "update": update, **spec}
    infini.install(copied)
    if gate is not None:
        set_gates(copied, gate)
    return copied


def set_gates(model: torch.nn.Module, gate: float | list[float]) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.memory_gate.copy_(torch.as_tensor(gate, dtype=torch.float32).expand(TINY[
                "num_attention_heads"]))


def ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return model(tokens, **kwargs).logits


@torch.no_grad()
def segment_local(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The stock model run on each segment on its own, at the segment's true positions (the file's choice)."""
    length = tokens.shape[1]
    return torch.cat([model(tokens[:, s:s + N], position_ids=torch.arange(s, min(s + N, length))[None]).logits
                      for s in range(0, length, N)], dim=1)


# --- the memory math --------------------------------------------------------------------------------------------

def hand_sigma(x: float) -> float:
    return x + 1.0 if x > 0 else float(torch.tensor(x).exp())


def test_retrieve_and_update_match_a_hand_computation() -> None:
    keys = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-0.3, 0.7]])
    values = torch.tensor([[1.0, 2.0, -1.0], [0.0, -3.0, 0.5], [4.0, 1.0, 1.0]])
    query = torch.tensor([[1.0, -2.0], [0.1, 0.4]])
    s = [[hand_sigma(float(x)) for x in row] for row in keys]
    # linear: M[i][j] = sum_t s(k_t)_i v_tj, z_i = sum_t s(k_t)_i
    hand_m = [[sum(s[t][i] * float(values[t, j]) for t in range(3)) for j in range(3)] for i in range(2)]
    hand_z = [sum(s[t][i] for t in range(3)) for i in range(2)]
    memory, norm = infini.memory_update(keys, values, *infini.empty_memory((), 2, 3), rule="linear")
    assert memory.dtype == norm.dtype == torch.float32
    assert torch.allclose(memory, torch.tensor(hand_m), atol=1e-6) and torch.allclose(norm, torch.tensor(hand_z))
    for row in range(2):
        sq = [hand_sigma(float(x)) for x in query[row]]
        denominator = sum(sq[i] * hand_z[i] for i in range(2))
        want = [sum(sq[i] * hand_m[i][j] for i in range(2)) / denominator for j in range(3)]
        got, present = infini.memory_retrieve(query[row:row + 1], memory, norm)
        assert bool(present.all()) and torch.allclose(got[0], torch.tensor(want), atol=1e-6)
    # delta on top: M += s(K)^T (V - s(K) M / (s(K) z)), with the M, z from before this update
    new_keys, new_values = keys.flip(0) * 0.5, values.flip(1)
    s2 = [[hand_sigma(float(x)) for x in row] for row in new_keys]
    old = [[sum(s2[t][i] * hand_m[i][j] for i in range(2)) / sum(s2[t][i] * hand_z[i] for i in range(2))
            for j in range(3)] for t in range(3)]
    want_m = [[hand_m[i][j] + sum(s2[t][i] * (float(new_values[t, j]) - old[t][j]) for t in range(3))
               for j in range(3)] for i in range(2)]
    want_z = [hand_z[i] + sum(s2[t][i] for t in range(3)) for i in range(2)]
    delta_m, delta_z = infini.memory_update(new_keys, new_values, memory, norm, rule="delta")
    assert torch.allclose(delta_m, torch.tensor(want_m), atol=1e-5) and torch.allclose(delta_z, torch.tensor(want_z))
    # storing what the memory already retrieves exactly changes nothing under delta (but does under linear)
    retrieved = infini.memory_retrieve(new_keys, memory, norm)[0]
    assert torch.allclose(infini.memory_update(new_keys, retrieved, memory, norm, "delta")[0], memory, atol=1e-5)
    assert not torch.allclose(infini.memory_update(new_keys, retrieved, memory, norm, "linear")[0], memory)


def test_empty_memory_retrieves_nothing_and_mixing_then_keeps_the_local_output() -> None:
    memory, norm = infini.empty_memory((1, 2), 4, 4)
    retrieved, present = infini.grouped_retrieve(torch.randn(1, 4, 3, 4), memory, norm)
    assert not present.any() and torch.equal(retrieved, torch.zeros(1, 4, 3, 4))
    local = torch.randn(1, 4, 3, 4)
    assert torch.equal(infini.mix(local, retrieved, present, torch.zeros(4)), local)  # not halved, exactly A_local


def test_grouped_retrieval_uses_the_repeat_kv_head_order() -> None:
    torch.manual_seed(0)
    query, memory, norm = torch.randn(2, 4, 5, 3), torch.randn(2, 2, 3, 6), torch.rand(2, 2, 3) + 0.1
    got, _ = infini.grouped_retrieve(query, memory, norm)
    for head in range(4):
        kv = head // 2  # heads 0, 1 -> kv 0; heads 2, 3 -> kv 1
        features = F.elu(query[:, head]) + 1
        want = (features @ memory[:, kv]) / (features @ norm[:, kv].unsqueeze(-1))
        assert torch.allclose(got[:, head], want, atol=1e-6), head


# --- the model against the stock model ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("gate", [-8.0, 0.0, 5.0])
def test_up_to_one_segment_equals_the_stock_model_at_any_gate(family: str, gate: float) -> None:
    stock = tiny(family)
    model = converted(stock, "delta", gate)
    for length in (1, 5, N):
        assert torch.allclose(logits(model, ids(length)), logits(stock, ids(length)), atol=1e-6, rtol=0)


def test_past_one_segment_the_model_is_segment_local_attention_plus_a_gated_memory_term() -> None:
    """At gate -8 (sigmoid 3.4e-4) logits stay within 5e-3 of the stock model run per segment (logits are ~4 in
    size); the first segment is exact, and the gap shrinks ~e^4-fold per 4 steps of the gate."""
    stock, tokens = tiny(), ids(4 * N + 3)
    reference = segment_local(stock, tokens)
    gaps = {}
    for gate in (-4.0, -8.0, -12.0):
        out = logits(converted(stock, "linear", gate), tokens)
        assert torch.allclose(out[:, :N], reference[:, :N], atol=1e-6, rtol=0)
        gaps[gate] = float((out - reference).abs().max())
    assert gaps[-8.0] < 5e-3
    assert gaps[-4.0] > 10 * gaps[-8.0] > 100 * gaps[-12.0] > 0


@pytest.mark.parametrize("gate", [-8.0, 3.0])
def test_with_the_memory_switched_off_every_segment_is_the_stock_model_on_that_segment_alone(gate: float) -> None:
    stock, tokens = tiny(), ids(4 * N + 3)
    model = converted(stock, "delta", gate, memory=False)
    assert torch.allclose(logits(model, tokens), segment_local(stock, tokens), atol=1e-5, rtol=0)
    cache = infini.InfiniCache(model.config)  # and the stream keeps no memory, only its current segment
    logits(model, tokens, cache=cache, use_cache=True)
    assert all(layer.memory is None and layer.held() == 3 for layer in cache.layers)


def test_one_layer_matches_a_hand_built_infini_attention_with_gqa() -> None:
    """Layer 0's attention output on two segments rebuilt by hand: memory from segment 1's pre-RoPE keys per KV
    head, query head h reading KV head h // 2, local softmax over segment 2 at true positions, per-head gates."""
    stock, tokens = tiny(), ids(2 * N)
    model = converted(stock, "linear", [-1.0, 0.5, 2.0, -0.2])
    attn = model.model.layers[0].self_attn
    seen = {}
    hooks = [getattr(attn, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
             for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    hooks.append(attn.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[0])))
    logits(model, tokens)
    for hook in hooks:
        hook.remove()
    heads, kv_heads, dim = 4, 2, 32
    q = seen["q_proj"].view(1, 2 * N, heads, dim).transpose(1, 2)
    k = seen["k_proj"].view(1, 2 * N, kv_heads, dim).transpose(1, 2)
    v = seen["v_proj"].view(1, 2 * N, kv_heads, dim).transpose(1, 2)
    cos, sin = model.model.rotary_emb(q, torch.arange(2 * N)[None])
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    second = slice(N, 2 * N)
    causal = torch.ones(N, N).tril().bool()
    rows = []
    for head in range(heads):
        kv = head // 2
        sk = F.elu(k[0, kv, :N]) + 1
        memory, norm = sk.T @ v[0, kv, :N], sk.sum(0)
        sq = F.elu(q[0, head, second]) + 1
        retrieved = (sq @ memory) / (sq @ norm)[:, None]
        scores = (q_rot[0, head, second] @ k_rot[0, kv, second].T) / dim ** 0.5
        local = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[0, kv, second]
        g = torch.sigmoid(attn.memory_gate[head])
        rows.append(g * retrieved + (1 - g) * local)
    want = attn.o_proj(torch.stack(rows, 1).reshape(N, heads * dim))
    assert torch.allclose(seen["out"][0, second], want, atol=1e-5)
    # the memory term matters here: swapping the KV heads' memories (the `repeat` order bug) would be visible
    assert not torch.allclose(seen["out"][0, second], attn.o_proj(torch.stack(rows[::-1], 1).reshape(N, -1)))


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_carried_state_equals_one_long_forward(update: str) -> None:
    model, tokens = converted(tiny(), update, 0.0), ids(3 * N + 5)
    full = logits(model, tokens, use_cache=False)
    for cuts in ([2 * N], [N, 2 * N], [5, 19], list(range(1, 3 * N + 5))):
        cache = infini.InfiniCache(model.config)
        bounds = [0, *cuts, tokens.shape[1]]
        parts = [logits(model, tokens[:, a:b], cache=cache, use_cache=True) for a, b in zip(bounds, bounds[1:])]
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5, rtol=0), cuts
        assert cache.get_seq_length() == tokens.shape[1]


def test_greedy_generation_follows_the_full_forward_argmax_over_several_segments() -> None:
    model, prompt = converted(tiny(), "delta", 0.0), ids(5)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=4 * N, do_sample=False, return_dict_in_generate=True)
    sequence = out.sequences
    assert sequence.shape[1] == 5 + 4 * N  # > 4 segments
    full = logits(model, sequence, use_cache=False)
    assert torch.equal(full[0, 4:-1].argmax(-1), sequence[0, 5:])
    assert isinstance(out.cache, infini.InfiniCache)
    assert all(layer.held() < N and layer.memory.dtype == torch.float32 for layer in out.cache.layers)


def test_carried_state_stays_flat_as_the_stream_grows() -> None:
    """Size measured as the bytes of every tensor the cache holds (local segment + M + z, all layers), after each
    call of a stream fed 3 tokens at a time; the largest seen up to 8N is within 1.2x of the largest up to 2N."""
    model, tokens = converted(tiny(), "linear", 0.0), ids(8 * N)
    cache, sizes = infini.InfiniCache(model.config), {}
    for start in range(0, 8 * N, 3):
        logits(model, tokens[:, start:start + 3], cache=cache, use_cache=True)
        sizes[min(start + 3, 8 * N)] = cache.nbytes()
        assert all(layer.held() < N for layer in cache.layers)
    up_to = lambda n: max(size for seen, size in sizes.items() if seen <= n)  # noqa: E731
    assert up_to(8 * N) <= 1.2 * up_to(2 * N)


@pytest.mark.parametrize("position", [3, N, N + 3, 2 * N - 1, 3 * N + 1])
def test_a_later_token_never_changes_an_earlier_output(position: int) -> None:
    model, tokens = converted(tiny(), "delta", 0.0), ids(4 * N)
    changed = tokens.clone()
    changed[0, position] = (changed[0, position] + 1) % TINY["vocab_size"]
    before, after = logits(model, tokens), logits(model, changed)
    assert torch.allclose(before[:, :position], after[:, :position], atol=1e-6, rtol=0)
    assert not torch.allclose(before[:, -1], after[:, -1])  # while the last segment does see it, through memory


def test_memory_state_is_float32_under_a_bf16_model() -> None:
    model = converted(tiny(), "delta").to(torch.bfloat16)
    cache = infini.InfiniCache(model.config)
    out = logits(model, ids(3 * N + 2), cache=cache, use_cache=True)
    assert torch.isfinite(out).all()
    assert model.model.layers[0].self_attn.memory_gate.dtype == torch.bfloat16
    for layer in cache.layers:
        assert layer.memory.dtype == layer.norm.dtype == torch.float32
        assert layer.keys.dtype == torch.bfloat16


def test_a_later_segment_loss_trains_the_key_value_projections_of_earlier_segments() -> None:
    model = converted(tiny(), "linear").train()  # gates at -8: the path through memory is faint but there
    grads = {}

    def keep(name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            output.retain_grad()
            grads[name] = output
        return hook

    for layer in (0, 1):
        attn = model.model.layers[layer].self_attn
        attn.k_proj.register_forward_hook(keep(f"k{layer}"))
        attn.v_proj.register_forward_hook(keep(f"v{layer}"))
    tokens = ids(3 * N)
    out = model(tokens, use_cache=False).logits
    F.cross_entropy(out[0, 2 * N:-1], tokens[0, 2 * N + 1:]).backward()  # a loss on the last segment only
    for name, output in grads.items():
        earlier = output.grad[0, :2 * N]
        assert earlier.abs().sum() > 0, name
    assert model.model.layers[0].self_attn.memory_gate.grad.abs().sum() > 0


def test_per_layer_gradient_checkpointing_gives_the_same_gradients() -> None:
    """A forward without labels (a distillation computes its own loss from the logits) is checkpointed per layer."""
    tokens = ids(3 * N)
    grads = []
    for checkpointing in (False, True):
        model = converted(tiny(), "delta", 0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        logits = model(tokens, use_cache=False).logits
        F.cross_entropy(logits[0, :-1], tokens[0, 1:]).backward()
        grads.append(model.model.layers[0].self_attn.k_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_checkpointed_training_runs_segment_by_segment_with_the_same_loss_and_gradients() -> None:
    """With checkpointing on, a training forward with labels runs one segment at a time, each checkpointed whole
    (stack, lm_head, loss): the loss and every gradient equal the ordinary forward's, while autograd keeps only each
    segment's inputs and memories instead of every layer's activations."""
    tokens = ids(8 * N + 3)
    labels = tokens.clone()
    labels[0, :5] = -100  # unscored positions count as transformers counts them
    runs = {}
    for checkpointing in (False, True):
        model = converted(tiny(), "delta", 0.0).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        kept = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            kept[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        runs[checkpointing] = loss, {name: p.grad for name, p in model.named_parameters()}, kept[0]
    (loss, grads, kept), (by_segment, segment_grads, segment_kept) = runs[False], runs[True]
    assert torch.allclose(by_segment, loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        assert torch.allclose(segment_grads[name], grad, atol=1e-6, rtol=1e-5), name
    assert segment_grads["model.layers.0.self_attn.memory_gate"].abs().sum() > 0
    assert segment_kept < kept / 10


def test_install_and_the_config_are_checked() -> None:
    stock = tiny()
    with pytest.raises(ValueError, match="retrofit_infini"):
        infini.install(copy.deepcopy(stock))
    broken = copy.deepcopy(stock)
    broken.config.retrofit_infini = {"segment_length": N, "update": "sum"}
    with pytest.raises(ValueError, match="update"):
        infini.install(broken)
    broken.config.retrofit_infini = {"segment_length": N, "memory": "off"}
    with pytest.raises(ValueError, match="memory must be true or false"):
        infini.install(broken)(ids(2))
    model = converted(stock, gate_init=-3.0)
    assert type(model).__name__ == "RetrofitInfiniLlamaForCausalLM"
    assert torch.equal(model.model.layers[1].self_attn.memory_gate, torch.full((4,), -3.0))
    assert converted(stock).model.layers[0].self_attn.memory_gate[0] == infini.DEFAULT_GATE_INIT
    with pytest.raises(ValueError, match="padded"):
        model(ids(4), attention_mask=torch.tensor([[0, 1, 1, 1]]))


# --- a checkpoint loaded where llm_retrofit is absent -------------------------------------------------------------

LOADER = WITHOUT_LLM_RETROFIT + r"""

import torch
from transformers import AutoModelForCausalLM

report = {}
for name in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(f"{sys.argv[1]}/{name}", trust_remote_code=True).eval()
    tokens = torch.load(f"{sys.argv[1]}/ids.pt")
    with torch.no_grad():
        torch.save(model(tokens).logits, f"{sys.argv[1]}/{name}.pt")
        out = model.generate(tokens[:, :5], max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
    gates = [layer.self_attn.memory_gate.tolist() for layer in model.model.layers]
    report[name] = [type(model).__name__, type(out.cache).__name__, out.cache.layers[0].held(), gates]
report["llm_retrofit_loaded"] = any(m.split(".")[0] == "llm_retrofit" for m in sys.modules)
print(json.dumps(report))
"""


def write_checkpoint(path: Path, family: str, spec: dict, gates: list[float] | None) -> None:
    """What the patcher writes: the stock weights, config keys, the gate tensors (or none) and this file."""
    from safetensors.torch import load_file, save_file

    tiny(family).save_pretrained(path)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    lm = "RetrofitInfiniMistralForCausalLM" if family == "mistral" else "RetrofitInfiniLlamaForCausalLM"
    config.update(retrofit_infini=spec, auto_map={"AutoModelForCausalLM": f"modeling_retrofit_infini.{lm}"})
    config_path.write_text(json.dumps(config))
    if gates is not None:
        weights = load_file(path / "model.safetensors")
        for i in range(TINY["num_hidden_layers"]):
            weights[f"model.layers.{i}.self_attn.memory_gate"] = torch.tensor(gates) + i
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(SHIPPED_FILE, path / SHIPPED_FILE.name)


def test_a_patched_checkpoint_loads_where_llm_retrofit_is_absent(tmp_path: Path) -> None:
    gates = [-1.0, 0.5, 2.0, -0.25]  # exact in fp32, so loaded gates compare equal
    specs = {"llama": ("llama", {"segment_length": N, "update": "delta"}, gates),
             "mistral": ("mistral", {"segment_length": N, "update": "linear"}, gates),
             "llama-no-gates": ("llama", {"segment_length": N, "update": "linear", "gate_init": -2.0}, None)}
    tokens = ids(3 * N + 2)
    torch.save(tokens, tmp_path / "ids.pt")
    expected = {}
    for name, (family, spec, written) in specs.items():
        write_checkpoint(tmp_path / name, family, spec, written)
        model = converted(tiny(family), spec["update"], gate_init=spec.get("gate_init", infini.DEFAULT_GATE_INIT))
        want_gates = [[g + i for g in written] for i in range(2)] if written else [[-2.0] * 4] * 2
        with torch.no_grad():
            for layer, layer_gates in zip(model.model.layers, want_gates):
                layer.self_attn.memory_gate.copy_(torch.tensor(layer_gates))
        expected[name] = (want_gates, logits(model, tokens))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-I", "-c", LOADER, str(tmp_path), *specs], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "warn" not in run.stderr.lower() and "missing" not in run.stderr.lower(), run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report.pop("llm_retrofit_loaded") is False
    for name, (want_gates, want_logits) in expected.items():
        lm, cache, held, loaded_gates = report[name]
        assert lm == ("RetrofitInfiniMistralForCausalLM" if name == "mistral" else "RetrofitInfiniLlamaForCausalLM")
        assert cache == "InfiniCache" and held == (5 + 20 - 1) % N  # the last token is never fed back
        assert loaded_gates == want_gates, name
        assert torch.allclose(torch.load(tmp_path / f"{name}.pt"), want_logits, atol=1e-6), name
