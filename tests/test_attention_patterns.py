"""The runtime attention patterns shipped inside patched checkpoints (llm_retrofit/modeling/shipped): StreamingLLM
attention sinks against a per-query reference that rotates at the rolling cache's slot positions, block sparsity
against hand-built masks and across flex/sdpa/eager, and loading a patched checkpoint where llm_retrofit is absent."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import WITHOUT_LLM_RETROFIT
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.models.llama.modeling_llama import rotate_half

from llm_retrofit.modeling.shipped import modeling_retrofit_attention as shipped

SHIPPED_FILE = Path(shipped.__file__)
TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=512, initializer_range=0.1)


def tiny(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A random fp32 model with GQA (4 query heads, 2 KV heads), head_dim 32 (compiled flex is unreliable below)."""
    torch.manual_seed(seed)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**TINY)).eval()
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def patched(model: torch.nn.Module, spec: dict) -> torch.nn.Module:
    """A copy of `model` switched to `spec` with install(), as the package does for models patched in memory."""
    copied = copy.deepcopy(model)
    copied.config.retrofit_attention = spec
    return shipped.install(copied)


def ids(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).logits


# --- the sinks reference: StreamingLLM's rolling cache, one query at a time -----------------------------------------

def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def reference_sinks(model: torch.nn.Module, sinks: int, window: int) -> torch.nn.Module:
    """A copy of the stock `model` whose attention is StreamingLLM's, written out plainly: for each query, the visible
    tokens (sinks, then the window) are laid in cache slots 0, 1, 2, ...; keys and the query (in the last slot) are
    rotated at those slots, then one softmax. No cache: every call recomputes the whole sequence."""
    ref = copy.deepcopy(model)
    rotary = ref.model.rotary_emb
    for layer in ref.model.layers:
        attn = layer.self_attn

        def forward(hidden_states, position_embeddings=None, attention_mask=None, cache=None, attn=attn, **kwargs):
            batch, length, _ = hidden_states.shape
            shape = (batch, length, -1, attn.head_dim)
            q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
            k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
            v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
            heads, kv_heads = q.shape[1], k.shape[1]
            out = torch.zeros_like(q)
            for i in range(length):
                visible = [j for j in range(i + 1) if j < sinks or j > i - window]
                cos, sin = rotary(v, torch.arange(len(visible))[None])  # (1, slots, d)
                keys = _rope(k[:, :, visible], cos[:, None], sin[:, None])
                query = _rope(q[:, :, i], cos[:, -1:], sin[:, -1:])  # the query sits in the last slot
                for h in range(heads):
                    kv = h // (heads // kv_heads)  # repeat_kv's order
                    weights = torch.softmax(query[:, h] @ keys[:, kv].transpose(-1, -2) * attn.scaling, dim=-1)
                    out[:, h, i] = (weights @ v[:, kv, visible]).squeeze(1)
            return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None

        attn.forward = forward
    return ref


@torch.no_grad()
def greedy_by_recompute(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(new_tokens):
        tokens = torch.cat([tokens, model(tokens, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return tokens


# --- sinks --------------------------------------------------------------------------------------------------------

def test_the_sinks_rule_and_the_cache_positions() -> None:
    q, k = torch.arange(8)[:, None], torch.arange(8)[None, :]
    seen = shipped.sinks_visible(q, k, sinks=2, window=3)
    assert seen[7].tolist() == [True, True, False, False, False, True, True, True]
    assert seen[3].tolist() == [True, True, True, True, False, False, False, False]
    assert not seen[2, 3]  # never the future
    assert shipped.sink_query_positions(torch.arange(8), 2, 3).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    assert shipped.sink_cache_positions(4, 2, 3).tolist() == [0, 1, 2, 3]
    assert shipped.sink_cache_positions(9, 2, 3).tolist() == [0, 1, 6, 7, 8]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_sinks_covering_the_whole_sequence_is_the_stock_model(family: str) -> None:
    model, tokens = tiny(family), ids(24)
    spec = {"pattern": "sinks", "sinks": 4, "window": 20}
    assert torch.allclose(logits(patched(model, spec), tokens), logits(model, tokens), atol=1e-5)


@pytest.mark.parametrize("sinks,window", [(4, 6), (1, 3), (0, 5)])
def test_sinks_equal_the_streaming_llm_reference(sinks: int, window: int) -> None:
    model, tokens = tiny(), ids(40)
    spec = {"pattern": "sinks", "sinks": sinks, "window": window}
    ours, ref = logits(patched(model, spec), tokens), logits(reference_sinks(model, sinks, window), tokens)
    assert not torch.allclose(ref, logits(model, tokens), atol=1e-3)  # the pattern really changes the model
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_sinks_prefill_in_chunks_equals_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows go QUERY_CHUNK at a time; a chunk size that cuts through sinks and windows changes nothing."""
    model, tokens = patched(tiny(), {"pattern": "sinks", "sinks": 3, "window": 7}), ids(50)
    whole = logits(model, tokens)
    monkeypatch.setattr(shipped, "QUERY_CHUNK", 5)
    assert torch.allclose(logits(model, tokens), whole, atol=1e-5)


def test_sinks_generation_keeps_a_bounded_cache_and_matches_the_reference() -> None:
    sinks, window, new = 2, 6, 24  # 4x the window
    model, prompt = tiny(), ids(5, seed=3)
    ours = patched(model, {"pattern": "sinks", "sinks": sinks, "window": window})
    with torch.no_grad():
        out = ours.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                            return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(out.cache, shipped.SinkCache)  # generate built it without being told
    assert [layer.held() for layer in out.cache.layers] == [sinks + window] * TINY["num_hidden_layers"]
    assert out.cache.get_seq_length() == prompt.shape[1] + new - 1  # true positions go on counting
    expected = greedy_by_recompute(reference_sinks(model, sinks, window), prompt, new)
    assert out.sequences.tolist() == expected.tolist()


@torch.no_grad()
def test_sinks_memory_stays_flat_while_streaming_and_after_a_long_prefill() -> None:
    sinks, window = 2, 6
    model = patched(tiny(), {"pattern": "sinks", "sinks": sinks, "window": window})
    stream = ids(40)
    out = model(stream, use_cache=True)  # a prefill much longer than S + W
    cache = out.cache
    assert [layer.keys.shape[-2] for layer in cache.layers] == [sinks + window] * 2
    for _ in range(30):
        token = out.logits[:, -1:].argmax(-1)
        stream = torch.cat([stream, token], dim=1)
        out = model(token, cache=cache, use_cache=True)
        assert [layer.keys.shape[-2] for layer in cache.layers] == [sinks + window] * 2
    assert cache.get_seq_length() == stream.shape[1] == 70
    # the last streamed token's logits are the reference's over the whole 70-token stream
    ref = logits(reference_sinks(tiny(), sinks, window), stream)
    assert torch.allclose(out.logits[0, -1], ref[0, -1], atol=1e-5)


# --- block sparse -------------------------------------------------------------------------------------------------

HAND_BUILT = """
1000000000
1100000000
1110000000
1111000000
1111100000
1111110000
1100111000
1100111100
1100001110
1100001111
"""  # block_size 2, window 2 blocks, block 0 global, no random blocks


def test_float_mask_equals_a_hand_built_mask() -> None:
    pattern = shipped.parse_pattern({"pattern": "block_sparse", "block_size": 2, "window_blocks": 2,
                                     "global_blocks": 1, "random_blocks": 0, "seed": 0})
    mask = shipped.float_mask(pattern, 10, 10)
    expected = torch.tensor([[c == "1" for c in row] for row in HAND_BUILT.split()])
    assert torch.equal(mask == 0, expected)
    assert torch.all(mask[~expected] == torch.finfo(torch.float32).min)  # eager adds it: it must really mask
    # decoding rows: the same rows of the same pattern, at their absolute positions
    assert torch.equal(shipped.float_mask(pattern, 3, 10, q_offset=7), mask[7:])


def test_random_blocks_are_deterministic_earlier_blocks_outside_window_and_globals() -> None:
    pattern = shipped.BlockSparse(block_size=4, window_blocks=2, global_blocks=1, random_blocks=2, seed=5)
    for qb in range(40):
        picked = shipped.random_blocks(qb, pattern)
        candidates = list(range(1, qb - 1))
        assert picked == shipped.random_blocks(qb, pattern)
        assert set(picked) <= set(candidates) and len(picked) == min(2, len(candidates)) == len(set(picked))
    other = shipped.BlockSparse(block_size=4, window_blocks=2, global_blocks=1, random_blocks=2, seed=6)
    assert [shipped.random_blocks(qb, pattern) for qb in range(40)] != [shipped.random_blocks(qb, other)
                                                                         for qb in range(40)]
    # the mask follows the rule token by token, and a longer sequence does not redraw earlier rows
    n = 96
    mask = shipped.float_mask(pattern, n, n) == 0
    for i in range(n):
        for j in range(n):
            qb, kb = i // 4, j // 4
            rule = j <= i and (qb - kb < 2 or kb < 1 or kb in shipped.random_blocks(qb, pattern))
            assert bool(mask[i, j]) == rule, (i, j)
    assert torch.equal(shipped.float_mask(pattern, 40, 40) == 0, mask[:40, :40])


def test_block_visible_is_the_rule_on_block_indices() -> None:
    pattern = shipped.BlockSparse(block_size=8, window_blocks=1, global_blocks=2, random_blocks=1, seed=0)
    qb, kb = torch.arange(10)[:, None], torch.arange(10)[None, :]
    seen = shipped.block_visible(qb, kb, pattern)
    for q in range(10):
        expected = {k for k in range(q + 1) if q - k < 1 or k < 2} | set(shipped.random_blocks(q, pattern))
        assert {k for k in range(10) if seen[q, k]} == expected


def test_block_mask_skips_invisible_tiles() -> None:
    """The BlockMask really is sparse: flex computes only the visible 128-token tiles."""
    pattern = shipped.BlockSparse(block_size=128, window_blocks=1, global_blocks=1)
    mask = shipped.block_mask(pattern, 1024, 1024)
    visited = (mask.kv_num_blocks + (mask.full_kv_num_blocks if mask.full_kv_num_blocks is not None else 0))
    assert visited.flatten().tolist() == [1] + [2] * 7  # the diagonal tile and block 0, never more


@pytest.mark.parametrize("q_len, kv_len, past", [(300, 300, 0), (256, 1100, 844), (130, 700, 0)])
def test_tile_by_tile_block_masks_equal_torchs_create_block_mask(q_len: int, kv_len: int, past: int) -> None:
    """The BlockMasks built one row of tiles at a time (bounded memory) visit the tiles torch's create_block_mask
    visits, for both patterns, with lengths that are not multiples of the tile."""
    from torch.nn.attention.flex_attention import create_block_mask

    block = shipped.BlockSparse(block_size=128, window_blocks=2, global_blocks=1, random_blocks=1, seed=3)
    sinks = shipped.Sinks(sinks=4, window=200)
    sinks_keys = len(shipped._sinks_key_positions(past, q_len, sinks))
    cases = [(shipped.block_mask(block, q_len, kv_len, kv_len - q_len), (q_len, kv_len)),
             (shipped._sinks_block_mask(sinks, past, q_len), (q_len, sinks_keys))]
    for ours, lengths in cases:
        assert ours.seq_lengths == lengths
        torchs = create_block_mask(ours.mask_mod, None, None, *lengths, device="cpu")
        assert torch.equal(ours.to_dense(), torchs.to_dense())


def test_block_sparse_with_a_window_covering_everything_is_dense_causal() -> None:
    model, tokens = tiny(), ids(48)
    spec = {"pattern": "block_sparse", "block_size": 8, "window_blocks": 6, "global_blocks": 0, "random_blocks": 0,
            "seed": 0}
    assert torch.allclose(logits(patched(model, spec), tokens), logits(model, tokens), atol=1e-5)


SPARSE = {"pattern": "block_sparse", "block_size": 16, "window_blocks": 2, "global_blocks": 1, "random_blocks": 1,
          "seed": 7}


def test_block_sparse_eager_and_sdpa_agree_and_differ_from_dense() -> None:
    model, tokens = tiny(), ids(130)
    sdpa = patched(model, SPARSE)
    eager = patched(model, SPARSE)
    eager.set_attn_implementation("eager")
    assert torch.allclose(logits(sdpa, tokens), logits(eager, tokens), atol=1e-5)
    assert not torch.allclose(logits(sdpa, tokens), logits(model, tokens), atol=1e-3)


@torch.no_grad()
def test_block_sparse_decoding_rows_equal_the_full_forward() -> None:
    model, tokens = patched(tiny(), SPARSE), ids(100)
    full = model(tokens).logits
    out = model(tokens[:, :70], use_cache=True)
    rows = [out.logits]
    for i in range(70, 100):
        out = model(tokens[:, i:i + 1], cache=out.cache, use_cache=True)
        rows.append(out.logits)
    assert torch.allclose(torch.cat(rows, dim=1), full, atol=1e-5)


def _flex_unavailable() -> str | None:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return "this torch has no flex_attention"
    if not (shutil.which("cc") or shutil.which("gcc")):
        return "compiled flex_attention needs a C compiler"
    return None


@pytest.mark.skipif(_flex_unavailable() is not None, reason=str(_flex_unavailable()))
def test_block_sparse_flex_equals_sdpa() -> None:
    """Compiles flex_attention once (about 20 s on CPU)."""
    model, tokens = tiny(), ids(200)
    sdpa = patched(model, SPARSE)
    flex = patched(model, SPARSE)
    flex.set_attn_implementation("flex_attention")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = logits(flex, tokens)
    assert torch.allclose(got, logits(sdpa, tokens), atol=1e-5), (got - logits(sdpa, tokens)).abs().max()


@pytest.mark.skipif(_flex_unavailable() is not None, reason=str(_flex_unavailable()))
def test_sinks_flex_is_one_fused_call_equal_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under flex_attention a prefill never takes the chunked path, in one pass or continuing a cache (each shape
    compiles once, about 20 s on CPU)."""
    sinks, window = 4, 40
    model, stream = tiny(), ids(160)
    ours = patched(model, {"pattern": "sinks", "sinks": sinks, "window": window})
    ours.set_attn_implementation("flex_attention")
    ref = logits(reference_sinks(model, sinks, window), stream)

    def chunked(*args, **kwargs):
        raise AssertionError("a flex_attention prefill took the chunked sinks path")

    monkeypatch.setattr(shipped, "sinks_attention", chunked)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        whole = ours(stream, use_cache=False).logits
        first = ours(stream[:, :100], use_cache=True)
        rest = ours(stream[:, 100:], cache=first.cache, use_cache=True).logits  # the cache already dropped keys
    assert torch.allclose(whole, ref, atol=1e-5), (whole - ref).abs().max()
    assert torch.allclose(rest, ref[:, 100:], atol=1e-5), (rest - ref[:, 100:]).abs().max()


# --- behaviour around the patterns --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [{"pattern": "sinks", "sinks": 2, "window": 4}, SPARSE])
def test_no_library_warning_and_padding_is_refused(spec: dict) -> None:
    model = patched(tiny(), spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model.generate(ids(20), max_new_tokens=4, do_sample=False, pad_token_id=0)
            model(ids(20), attention_mask=torch.ones(1, 20, dtype=torch.long))
    padded = torch.ones(1, 20, dtype=torch.long)
    padded[0, :3] = 0
    with pytest.raises(ValueError, match="padded"):
        model(ids(20), attention_mask=padded)


def test_install_keeps_weights_and_refuses_what_it_cannot_run() -> None:
    model = tiny()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    installed = patched(model, {"pattern": "sinks", "sinks": 1, "window": 2})
    assert type(installed) is shipped.RetrofitLlamaForCausalLM
    assert all(torch.equal(before[name], p) for name, p in installed.state_dict().items())
    with pytest.raises(ValueError, match="window"):
        patched(model, {"pattern": "sinks", "sinks": 1, "window": 0})
    with pytest.raises(ValueError, match="pattern"):
        patched(model, {"pattern": "dilated"})


LOADER = WITHOUT_LLM_RETROFIT + r"""

import torch
from transformers import AutoModelForCausalLM

report = {}
for name in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(f"{sys.argv[1]}/{name}", trust_remote_code=True).eval()
    tokens = torch.load(f"{sys.argv[1]}/ids.pt")
    with torch.no_grad():
        torch.save(model(tokens).logits, f"{sys.argv[1]}/{name}.pt")
        out = model.generate(tokens[:, :8], max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0)
    report[name] = [type(model).__name__, model.config.model_type, type(out.cache).__name__,
                    out.cache.layers[0].keys.shape[-2]]
report["llm_retrofit_loaded"] = any(m.split(".")[0] == "llm_retrofit" for m in sys.modules)
print(json.dumps(report))
"""


def test_a_patched_checkpoint_loads_where_llm_retrofit_is_absent(tmp_path: Path) -> None:
    specs = {"llama-sinks": ("llama", {"pattern": "sinks", "sinks": 2, "window": 6}),
             "mistral-sparse": ("mistral", SPARSE)}
    tokens = ids(40)
    torch.save(tokens, tmp_path / "ids.pt")
    expected = {}
    for name, (family, spec) in specs.items():
        model = tiny(family)
        model.save_pretrained(tmp_path / name)
        config_path = tmp_path / name / "config.json"
        config = json.loads(config_path.read_text())
        config["retrofit_attention"] = spec
        lm = "RetrofitMistralForCausalLM" if family == "mistral" else "RetrofitLlamaForCausalLM"
        config["auto_map"] = {"AutoModelForCausalLM": f"modeling_retrofit_attention.{lm}"}
        config_path.write_text(json.dumps(config))
        shutil.copy(SHIPPED_FILE, tmp_path / name / SHIPPED_FILE.name)
        expected[name] = (lm, family, logits(patched(model, spec), tokens))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-I", "-c", LOADER, str(tmp_path), *specs], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "warn" not in run.stderr.lower(), run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report.pop("llm_retrofit_loaded") is False
    assert report["llama-sinks"] == ["RetrofitLlamaForCausalLM", "llama", "SinkCache", 8]
    assert report["mistral-sparse"][:3] == ["RetrofitMistralForCausalLM", "mistral", "DynamicCache"]
    for name, (_, _, want) in expected.items():
        assert torch.allclose(torch.load(tmp_path / f"{name}.pt"), want, atol=1e-6), name
