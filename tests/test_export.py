"""`retrofit export`: the GGUF that llama.cpp runs computes what transformers computes from the checkpoint.

The reference is llama.cpp itself (llama-cpp-python, built from source): each exported file is loaded there and its
logits compared with transformers' on the same tokens, for the real SmolLM2 and for every patch llama.cpp can express,
at positions past the original context for the RoPE patches. Tolerances, measured here and stated with each test:
float32 weights agree to float32 rounding of two different kernels; f16, bf16 and q8_0 add their own rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny, state_of
from llm_retrofit import patch
from llm_retrofit.convert import convert
from llm_retrofit.errors import ExportError
from llm_retrofit.export import export_gguf, to_adjacent_pairs

llama_cpp = pytest.importorskip("llama_cpp", reason="the parity reference: pip install llama-cpp-python (test extra)")

TINY_FACTORS = Path(__file__).parent / "data" / "tiny_longrope_factors.json"
TINY_VOCABULARY = 320
ORIGINAL = 256  # the tiny models' trained context; RoPE patches double it
F32 = 0  # ggml's type number of float32, for llama.cpp's KV cache


def tiny_checkpoint(path: Path, model_type: str = "llama", **overrides) -> Path:
    """A tiny random model with a byte-level BPE tokenizer of its own (a GGUF carries its tokenizer).

    Weights 5x the usual initial scale give attention sharp enough for RoPE to matter: at 0.02 the short and long
    LongRoPE factors change the logits by 0.002, at 0.1 by 1.6 (logits up to 3.9), far above kernel rounding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    save_tiny(path, model_type, vocab_size=TINY_VOCABULARY, max_position_embeddings=ORIGINAL, initializer_range=0.1,
              **overrides)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCABULARY, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([Path(__file__).read_text()], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def transformers_logits(checkpoint: Path, tokens: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def llama_cpp_logits(gguf: Path, tokens: list[int], context: int) -> np.ndarray:
    """Logits of every position, from llama.cpp started with a context of `context` tokens."""
    model = llama_cpp.Llama(str(gguf), n_ctx=context, n_batch=len(tokens), n_ubatch=len(tokens), logits_all=True,
                            type_k=F32, type_v=F32, verbose=False, n_threads=2)  # its default cache is float16
    try:
        model.eval(tokens)
        return np.array(model.scores[: len(tokens)], dtype=np.float32)
    finally:
        model.close()


def random_tokens(length: int) -> list[int]:
    return np.random.default_rng(0).integers(0, TINY_VOCABULARY, length).tolist()


def max_difference(checkpoint: Path, gguf: Path, length: int, context: int) -> float:
    tokens = random_tokens(length)
    return float(np.abs(llama_cpp_logits(gguf, tokens, context) - transformers_logits(checkpoint, tokens)).max())


# ------------------------------------------------------------------------------------------------- the patches


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "tiny")


EXPRESSIBLE = {
    "original": [],
    "linear": ["linear:factor=2"],
    "ntk": ["ntk:factor=2"],
    "yarn": ["yarn:factor=2"],
    "llama3": ["llama3:factor=2"],
    "longrope": [f"longrope:factors={TINY_FACTORS},target_length={2 * ORIGINAL}"],
    "gqa": ["gqa:num_key_value_heads=1"],
    "expand": ["expand:num_new_layers=3"],
}


@pytest.mark.parametrize("name", EXPRESSIBLE)
def test_llama_cpp_computes_what_transformers_computes(name: str, tiny: Path, tmp_path: Path) -> None:
    """float32 export: llama.cpp's logits equal transformers' to 1e-4 at every position (measured: 3e-6 to 1.4e-5, with
    llama.cpp's KV cache in float32), past the original context for the RoPE patches (400 tokens against 256)."""
    model = patch(tiny, *EXPRESSIBLE[name], output=tmp_path / "patched") if EXPRESSIBLE[name] else tiny
    gguf = export_gguf(model, tmp_path / "model.gguf", dtype="f32")
    length = 400 if name not in ("original", "gqa", "expand") else 200
    context = 2 * ORIGINAL if length > ORIGINAL else ORIGINAL
    assert max_difference(model, gguf, length, context) < 1e-4


def test_a_mistral_computes_the_same(tmp_path: Path) -> None:
    model = tiny_checkpoint(tmp_path / "mistral", "mistral", sliding_window=None)
    gguf = export_gguf(model, tmp_path / "mistral.gguf", dtype="f32")
    assert max_difference(model, gguf, 200, ORIGINAL) < 1e-4


def test_longrope_below_the_original_context_uses_the_short_factors(tiny: Path, tmp_path: Path) -> None:
    """llama.cpp picks LongRoPE's set by its context size, transformers by each sequence's length. Started within
    the original context, llama.cpp computes transformers' short-factor logits; started with the long context, it
    gives every sequence the long factors: a short one's logits are then what transformers computes for the same
    positions inside a sequence past the original context, not what it computes for the short sequence alone."""
    factors = json.loads(TINY_FACTORS.read_text())
    factors["short_factor"] = [1.0 + i / 16 for i in range(len(factors["long_factor"]))]
    (tmp_path / "factors.json").write_text(json.dumps(factors))
    model = patch(tiny, f"longrope:factors={tmp_path / 'factors.json'},target_length={2 * ORIGINAL}",
                  output=tmp_path / "long")
    gguf = export_gguf(model, tmp_path / "long.gguf", dtype="f32")
    tokens = random_tokens(300)
    short = transformers_logits(model, tokens[:200])
    long = transformers_logits(model, tokens)[:200]
    assert np.abs(short - long).max() > 0.5  # the two sets of factors give different models
    assert np.abs(llama_cpp_logits(gguf, tokens[:200], ORIGINAL) - short).max() < 1e-4
    assert np.abs(llama_cpp_logits(gguf, tokens[:200], 2 * ORIGINAL) - long).max() < 1e-4


def test_upcycled_mixtral_computes_the_same(tiny: Path, tmp_path: Path) -> None:
    """Experts made different from each other (upcycling copies one MLP), so a wrong stacking order shows."""
    model = patch(tiny, "moe:num_experts=4,top_k=2", output=tmp_path / "moe")
    torch.manual_seed(1)
    for file in model.glob("*.safetensors"):
        tensors = load_file(file)
        for name in tensors:
            if "experts" in name or "gate.weight" in name:
                tensors[name] = tensors[name] + 0.05 * torch.randn_like(tensors[name])
        save_file(tensors, file, metadata={"format": "pt"})
    gguf = export_gguf(model, tmp_path / "moe.gguf", dtype="f32")
    assert max_difference(model, gguf, 200, ORIGINAL) < 1e-4


# ------------------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_tokens(smollm2: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in 12 words, then count to 7."}]
    return tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)


# Measured on the 50 tokens of the chat below (logits up to 28): largest and mean difference, f32 9.1e-5 / 1.2e-5,
# f16 0.092 / 0.013, bf16 0.51 / 0.060, q8_0 2.2 / 0.27 (llama.cpp also rounds the activations to 8 bits against
# q8_0 weights); the greedy token agreed at every position but q8_0's (48 of 50).
@pytest.mark.parametrize("dtype, largest, mean", [("f32", 1e-3, 1e-4), ("f16", 0.25, 0.03), ("bf16", 1.0, 0.15),
                                                  ("q8_0", 4.0, 0.5)])
def test_real_model_logits_match(dtype: str, largest: float, mean: float, smollm2: Path, real_tokens: list[int],
                                 tmp_path: Path) -> None:
    gguf = export_gguf(smollm2, tmp_path / f"smollm2.{dtype}.gguf", dtype=dtype)
    ours = llama_cpp_logits(gguf, real_tokens, 512)
    reference = transformers_logits(smollm2, real_tokens)
    difference = np.abs(ours - reference)
    assert difference.max() < largest and difference.mean() < mean
    assert (ours.argmax(-1) == reference.argmax(-1)).mean() >= 0.9


def test_llama_cpp_tokenizes_as_transformers(smollm2: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    gguf = export_gguf(smollm2, tmp_path / "smollm2.gguf", dtype="q8_0")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Prices rose 12.5% in 2024, didn't they? "
                                           "ça va:\n\tdef f(x): return x**2  # 😀"}],
                                         tokenize=False, add_generation_prompt=True)
    model = llama_cpp.Llama(str(gguf), n_ctx=256, vocab_only=True, verbose=False)
    try:
        assert model.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text)["input_ids"]
        assert model.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    finally:
        model.close()


def sentencepiece_style_checkpoint(path: Path) -> Path:
    """A tiny Mistral with a tokenizer.json as transformers writes Llama 2's and Mistral's: BPE with byte fallback,
    '▁' for spaces and one put before the text, merges for every pair of pieces that joins into a piece, in the
    order of the joined piece (how a SentencePiece model becomes a tokenizer.json), and a BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator([Path(__file__).read_text()], trainers.BpeTrainer(vocab_size=600,
                                                                                   special_tokens=specials))
    vocab = trained.get_vocab()
    pieces = [piece for piece in vocab if piece not in specials]
    merges = sorted(((a, b) for a in pieces for b in pieces if a + b in vocab), key=lambda pair: vocab["".join(pair)])
    tokenizer = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    save_tiny(path, "mistral", vocab_size=len(vocab), max_position_embeddings=ORIGINAL, initializer_range=0.1,
              sliding_window=None)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return path


def test_a_sentencepiece_style_tokenizer_tokenizes_as_transformers(tmp_path: Path) -> None:
    """llama.cpp's SentencePiece tokenizer merges the pair whose joined piece scores highest: the export scores each
    piece by its first merge's rank, so it merges in transformers' order; bytes outside the pieces fall back alike."""
    from transformers import AutoTokenizer

    model = sentencepiece_style_checkpoint(tmp_path / "spm")
    gguf = export_gguf(model, tmp_path / "spm.gguf", dtype="f32")
    tokenizer = AutoTokenizer.from_pretrained(model)
    reader = llama_cpp.Llama(str(gguf), n_ctx=256, vocab_only=True, verbose=False)
    try:
        for text in ["def export_gguf(source, output):\n    return Path(output)", "x",
                     "Prices rose 12.5% in 2024, didn't they? ça va 😀", "  two  spaces\tand a tab"]:
            assert reader.tokenize(text.encode(), add_bos=True, special=False) == tokenizer(text)["input_ids"]
    finally:
        reader.close()
    assert max_difference(model, gguf, 200, ORIGINAL) < 1e-4


def test_export_round_trips_through_convert(tiny: Path, tmp_path: Path) -> None:
    gguf = export_gguf(tiny, tmp_path / "tiny.gguf", dtype="f32")
    back = convert(gguf, tmp_path / "back")
    original, read_back = state_of(tiny), state_of(back)
    assert read_back.keys() == original.keys()
    for name in original:
        torch.testing.assert_close(read_back[name], original[name], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["linear", "ntk", "yarn", "llama3", "longrope"])
def test_convert_reads_the_rope_back(name: str, tiny: Path, tmp_path: Path) -> None:
    """transformers' GGUF import keeps only the RoPE base; `retrofit convert` reads the scaling keys and factor
    tensors too, so the checkpoint it writes computes what the exported one did, past the original context. (Llama 3
    comes back as LongRoPE with its divisors for every length: the same frequencies under another name.)"""
    model = patch(tiny, *EXPRESSIBLE[name], output=tmp_path / "patched")
    back = convert(export_gguf(model, tmp_path / "model.gguf", dtype="f32"), tmp_path / "back")
    tokens = random_tokens(400)
    np.testing.assert_allclose(transformers_logits(back, tokens), transformers_logits(model, tokens), rtol=0,
                               atol=1e-5)


def test_rotate_half_rows_become_adjacent_pairs() -> None:
    """Head 0 of a Q with head dim 4: rows (0, 1 | 2, 3) pair as (0, 2) and (1, 3); llama.cpp wants 0, 2, 1, 3."""
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert to_adjacent_pairs(rows, heads=2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


# ------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("spec, reason", [
    ("dynamic:factor=2", "dynamic NTK"),
    ("attention:pattern=sliding,window=64", "sliding window shorter than the context"),
    ("attention:pattern=sliding,window=64,full_every=2", "Ministral's layer_types"),
    ("attention:pattern=sinks,sinks=4,window=64", "--keep N --context-shift"),
    ("attention:pattern=block_sparse,window=64,block_size=16", "attention pattern"),
    ("infini:segment_length=64", "Infini-attention"),
])
def test_what_llama_cpp_cannot_express_is_refused(spec: str, reason: str, tiny: Path, tmp_path: Path) -> None:
    model = patch(tiny, spec, output=tmp_path / "patched")
    with pytest.raises(ExportError, match=reason):
        export_gguf(model, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*retrofit-tmp*"))


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_a_model_with_code_of_its_own_is_refused(tiny: Path, tmp_path: Path) -> None:
    edit_json(tiny / "config.json", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLlama"})
    with pytest.raises(ExportError, match="modeling code of its own"):
        export_gguf(tiny, tmp_path / "out.gguf")


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(tiny: Path, tmp_path: Path) -> None:
    edit_json(tiny / "tokenizer.json", pre_tokenizer={"type": "Whitespace"})
    with pytest.raises(ExportError, match="would split differently"):
        export_gguf(tiny, tmp_path / "out.gguf")


def test_a_tokenizer_of_another_model_is_refused(tiny: Path, tmp_path: Path) -> None:
    edit_json(tiny / "config.json", vocab_size=200)  # the tokenizer has 320 tokens: they cannot all have an embedding
    with pytest.raises(ExportError, match="belongs to another model"):
        export_gguf(tiny, tmp_path / "out.gguf")


def test_a_failed_export_leaves_the_old_file(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_retrofit import export

    target = tmp_path / "model.gguf"
    target.write_bytes(b"the previous export")
    def broken(self, data):
        raise RuntimeError("the machine failed half-way")
    monkeypatch.setattr(export.GgufTensor, "encode", broken)
    with pytest.raises(RuntimeError):
        export_gguf(tiny, target)
    assert target.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir() if "retrofit-tmp" in p.name] == []


def test_a_disk_that_fills_gives_one_error_and_leaves_nothing(tiny: Path, small_disk: Path) -> None:
    from llm_retrofit.errors import OutputError

    with pytest.raises(OutputError, match="No space left on device"):
        export_gguf(tiny, small_disk / "model.gguf", dtype="f32")
    assert list(small_disk.iterdir()) == []


def test_bad_output_names_are_refused(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not end in .gguf"):
        export_gguf(tiny, tmp_path / "model.bin")
    with pytest.raises(ExportError, match="not a GGUF type we write"):
        export_gguf(tiny, tmp_path / "model.gguf", dtype="q4_k")
