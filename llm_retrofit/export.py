"""`retrofit export`: a checkpoint -> one GGUF file that llama.cpp and ollama run as the model we wrote.

What llama.cpp's `llama` architecture computes, and so what a GGUF can say (read in llama.cpp's
`src/models/llama.cpp`, `src/llama-model.cpp`, `src/llama-context.cpp`):
- Llama, Mistral without a binding window, and Mixtral (experts stacked per layer), any number of KV heads or layers;
- RoPE as a base, a linear scale, YaRN, per-pair divisors of the frequencies (`rope_freqs`: Llama 3), or LongRoPE's
  two sets of divisors (`rope_factors_long/short`), with an attention factor and the original context. llama.cpp picks
  LongRoPE's set by the context size it was started with (`n_ctx`), not by the length of each sequence as
  transformers does: above the original context every token gets the long factors.
Everything else is refused before a byte is written, with the reason and the nearest thing that runs (`refusal`).

The file is streamed: every tensor's type and size is known from the checkpoint's headers, so the GGUF header is
written first and then one tensor at a time is read, converted and appended; peak memory is about one tensor (one
layer's experts for Mixtral), whatever the model's size. It is written beside the output and renamed into place when
complete (`io.commit.staged_file`).

The format rules we follow are llama.cpp's, re-derived here rather than taken from its converter:
- Q and K rows are reordered from the rotate-half layout of Hugging Face (pair i is dims i and i + d/2 of a head) to
  the adjacent pairs (2i, 2i + 1) that llama.cpp's `llama` rotation uses.
- Norms, biases, the MoE router and the RoPE factor tensors stay float32 (small, and precision-critical); a matrix
  whose rows do not split into whole Q8_0 blocks of 32 is written float16.
- The tokenizer goes in with its special ids, whether a BOS is added, and the chat template: a byte-level BPE one as
  llama.cpp's `gpt2` tokenizer with its merges and the pre-tokenizer named by what tokenizer.json's does
  (`_pre_tokenizer_name`); a SentencePiece-style one (byte fallback, '▁' for spaces: Llama 2, Mistral) as llama.cpp's
  `llama` tokenizer, each piece scored by the rank of its first merge (`_merge_scores`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .architectures import architecture_of, layer_name
from .errors import ExportError, OutputError
from .io.checkpoint import Checkpoint, load_checkpoint
from .io.commit import staged_file
from .io.progress import Progress
from .modeling.rope import rotary_of

DTYPES = ("f32", "f16", "bf16", "q8_0")
"""The weight types `retrofit export --dtype` writes (llama.cpp's `llama-quantize` makes the smaller ones from f16)."""

_Q8_BLOCK = 32


# ------------------------------------------------------------------------------------------------- what can go


def refusal(config: Mapping[str, Any]) -> str | None:
    """Why llama.cpp would compute another model than this config describes, with the nearest thing that runs; None
    when the GGUF can say everything the config does. The reasons are serve-check's rules for llama.cpp, so the two
    never disagree."""
    from .publishing.serving import EXPORT_REFUSES, refusals

    reasons = [rule.how.removeprefix(EXPORT_REFUSES) for rule in refusals(config, "llama.cpp")]
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if config.get("auto_map") and not reasons:  # code that is not ours: what it computes is unknown to us
        reasons.append(f"it loads modeling code of its own (auto_map {dict(config['auto_map'])}), which llama.cpp "
                       "does not run")
    if rope_type not in _ROPE_TYPES and not reasons:
        reasons.append(f"its RoPE type {rope_type!r} has no GGUF form that llama.cpp reads")
    return "; ".join(reasons) + "." if reasons else None


def export_gguf(source: str | os.PathLike[str], output: str | os.PathLike[str], *, dtype: str = "f16",
                revision: str | None = None) -> Path:
    """Write the checkpoint `source` (directory or Hub id) as one GGUF file at `output`; returns its path."""
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not a GGUF type we write; choose one of {', '.join(DTYPES)}.")
    output = Path(output).expanduser()
    if output.suffix != ".gguf":
        raise ExportError(f"{output} does not end in .gguf; name the output file, e.g. {output.name or 'model'}.gguf.")
    if not output.parent.is_dir():
        raise OutputError(f"{output.parent} does not exist; create it first or choose another output path.")
    checkpoint = load_checkpoint(source, revision=revision)
    checkpoint.require_complete()
    config = checkpoint.config
    architecture_of(config)
    why = refusal(config)
    if why:
        raise ExportError(f"{checkpoint.path} cannot be exported to GGUF: {why}")
    vocabulary = read_vocabulary(checkpoint.path, config)
    tensors = gguf_tensors(config, checkpoint, dtype)
    with staged_file(output) as staging:
        _write(staging, output.name, config, vocabulary, tensors, checkpoint, dtype)
    return output


# ------------------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the GGUF: name, float shape (row-major) and type, and how to make it from checkpoint tensors."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    sources: tuple[str, ...]
    make: Callable[[list[np.ndarray]], np.ndarray]

    @property
    def byte_shape(self) -> tuple[int, ...]:
        from gguf.quants import quant_shape_to_byte_shape

        return tuple(quant_shape_to_byte_shape(self.shape, self.qtype))

    def encode(self, data: np.ndarray) -> np.ndarray:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import quantize

        if self.qtype == Q.F32:
            return np.ascontiguousarray(data, dtype=np.float32)
        if self.qtype == Q.F16:
            return np.ascontiguousarray(data, dtype=np.float16)
        return quantize(np.ascontiguousarray(data, dtype=np.float32), self.qtype)


# A layer's tensors, Hugging Face name -> llama.cpp's (each with .weight and, where the model has biases, .bias).
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_ROTATED_HEADS = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}


def gguf_tensors(config: Mapping[str, Any], checkpoint: Checkpoint, dtype: str) -> list[GgufTensor]:
    """Every tensor of the GGUF, in the order it is written, from the checkpoint's tensor names and shapes. A
    checkpoint tensor with no place in the GGUF is refused rather than left out."""
    shapes = {name: tuple(meta.shape) for name, meta in checkpoint.tensors.items()}
    kind = _weight_type(dtype)
    tensors = [_copy("token_embd.weight", "model.embed_tokens.weight", shapes, kind),
               _copy("output_norm.weight", "model.norm.weight", shapes, kind)]
    tied = config.get("tie_word_embeddings", False)
    if "lm_head.weight" in shapes and not tied:
        tensors.append(_copy("output.weight", "lm_head.weight", shapes, kind))
    tensors += _rope_tensors(config)
    for layer in range(config["num_hidden_layers"]):
        tensors += _layer_tensors(layer, config, shapes, kind)
    placed = {source for tensor in tensors for source in tensor.sources} | ({"lm_head.weight"} if tied else set())
    unplaced = sorted(set(shapes) - placed)
    if unplaced:
        raise ExportError(f"llama.cpp's llama architecture has no tensor for {', '.join(unplaced[:5])}"
                          f"{' ...' if len(unplaced) > 5 else ''}; this checkpoint cannot be exported to GGUF.")
    return tensors


def _layer_tensors(layer: int, config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]],
                   kind: Any) -> list[GgufTensor]:
    tensors = []
    for hf_name, gguf_name in _LAYER_NAMES.items():
        heads = config.get(_ROTATED_HEADS.get(hf_name, "")) or config["num_attention_heads"]
        for suffix in ("weight", "bias"):
            name = layer_name(layer, f"{hf_name}.{suffix}")
            if name in shapes:
                tensors.append(_copy(f"blk.{layer}.{gguf_name}.{suffix}", name, shapes, kind,
                                     rotary_heads=heads if hf_name in _ROTATED_HEADS else None))
    if config.get("num_local_experts"):
        tensors += _expert_tensors(layer, config["num_local_experts"], shapes, kind)
    return tensors


def _weight_type(dtype: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]


def _kept_type(shape: tuple[int, ...], kind: Any) -> Any:
    """A vector stays float32; a matrix whose rows do not split into Q8_0 blocks is written float16."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2:
        return Q.F32
    if kind == Q.Q8_0 and shape[-1] % _Q8_BLOCK:
        return Q.F16
    return kind


def _copy(gguf_name: str, name: str, shapes: Mapping[str, tuple[int, ...]], kind: Any, *,
          rotary_heads: int | None = None) -> GgufTensor:
    shape = shapes[name]
    make = (lambda data: data[0]) if rotary_heads is None else (lambda data: to_adjacent_pairs(data[0], rotary_heads))
    return GgufTensor(gguf_name, shape, _kept_type(shape, kind), (name,), make)


def to_adjacent_pairs(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder Q or K output rows (or bias entries) of each head from rotate-half pairs (i, i + d/2) to adjacent
    pairs (2i, 2i + 1), the rotation llama.cpp applies to the `llama` architecture."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _expert_tensors(layer: int, experts: int, shapes: Mapping[str, tuple[int, ...]], kind: Any) -> list[GgufTensor]:
    """Mixtral's router (float32) and its experts' w1/w3/w2, each stacked into one 3-D tensor as llama.cpp reads."""
    from gguf import GGMLQuantizationType as Q

    router = layer_name(layer, "block_sparse_moe.gate.weight")
    tensors = [GgufTensor(f"blk.{layer}.ffn_gate_inp.weight", shapes[router], Q.F32, (router,), lambda d: d[0])]
    for hf, gg in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
        names = tuple(layer_name(layer, f"block_sparse_moe.experts.{e}.{hf}.weight") for e in range(experts))
        shape = (experts, *shapes[names[0]])
        tensors.append(GgufTensor(f"blk.{layer}.{gg}.weight", shape, _kept_type(shape, kind), names, np.stack))
    return tensors


# ------------------------------------------------------------------------------------------------- RoPE

_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")


def _rope_tensors(config: Mapping[str, Any]) -> list[GgufTensor]:
    """Per-pair frequency divisors: Llama 3's `rope_freqs`, LongRoPE's long and short sets."""
    from gguf import GGMLQuantizationType as Q

    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type") == "llama3":
        divisors = _divisors_of(config)
        return [GgufTensor("rope_freqs.weight", divisors.shape, Q.F32, (), lambda _: divisors)]
    if rope.get("rope_type") == "longrope":
        return [GgufTensor(f"rope_factors_{which}.weight", (len(rope[f"{which}_factor"]),), Q.F32, (),
                           lambda _, f=rope[f"{which}_factor"]: np.asarray(f, dtype=np.float32))
                for which in ("long", "short")]
    return []


def _divisors_of(config: Mapping[str, Any]) -> np.ndarray:
    """lambda_i = theta_i / theta_i' of this config's RoPE, from transformers' own frequencies (its rotary
    embedding)."""
    base = config["rope_parameters"]["rope_theta"]
    plain = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": base}}
    return (rotary_of(plain).inv_freq / rotary_of(config).inv_freq).double().numpy().astype(np.float32)


def _attention_factor(config: Mapping[str, Any]) -> float:
    """What transformers multiplies this config's cos and sin by (YaRN's and LongRoPE's attention factor)."""
    return float(rotary_of(config).attention_scaling)


def _rope_metadata(writer: Any, config: Mapping[str, Any]) -> None:
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    original = rope.get("original_max_position_embeddings")
    if rope_type == "linear":
        writer.add_rope_scaling_type(_scaling("LINEAR"))
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = round(config["max_position_embeddings"] / float(rope["factor"]))
    elif rope_type == "yarn":
        factor = float(rope["factor"])
        writer.add_rope_scaling_type(_scaling("YARN"))
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
        writer.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))
        # llama.cpp scales YaRN attention by 0.1 ln(s) + 1 itself; the attn_factor key multiplies that.
        attention = _attention_factor(config) / (0.1 * math.log(factor) + 1.0)
        if not math.isclose(attention, 1.0, rel_tol=1e-6):
            writer.add_rope_scaling_attn_factors(float(attention))
    elif rope_type == "longrope":
        writer.add_rope_scaling_type(_scaling("LONGROPE"))
        writer.add_rope_scaling_attn_factors(_attention_factor(config))
    if original:
        writer.add_rope_scaling_orig_ctx_len(int(original))


def rope_parameters_of_gguf(path: Path, rope_theta: float, context: int) -> dict[str, Any] | None:
    """The `rope_parameters` a GGUF's RoPE keys and factor tensors describe (what `_rope_metadata` writes, read back),
    or None for plain RoPE. transformers' GGUF import keeps only the base: without this, `retrofit convert` of a
    LongRoPE, YaRN, linear or Llama 3 GGUF would give a model with plain RoPE.

    A `rope_freqs` tensor (Llama 3, from any converter) holds divisors but not the rule that made them, so it comes
    back as LongRoPE with those divisors for short and long sequences alike and no attention factor: transformers
    then computes the same frequencies at every length."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    kind, factor = _field(reader, f"{arch}.rope.scaling.type"), _field(reader, f"{arch}.rope.scaling.factor")
    original = _field(reader, f"{arch}.rope.scaling.original_context_length") or context
    attention = _field(reader, f"{arch}.rope.scaling.attn_factor")
    factors = {t.name.removesuffix(".weight"): [float(x) for x in t.data] for t in reader.tensors
               if t.name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")}
    base = {"rope_theta": rope_theta}
    if "rope_factors_long" in factors or "rope_freqs" in factors:
        long = factors.get("rope_factors_long", factors.get("rope_freqs"))
        return {**base, "rope_type": "longrope", "factor": context / original, "original_max_position_embeddings":
                original, "long_factor": long, "short_factor": factors.get("rope_factors_short", long),
                "attention_factor": float(attention if attention is not None else 1.0)}
    if kind == "linear" and factor and factor != 1.0:
        return {**base, "rope_type": "linear", "factor": float(factor)}
    if kind == "yarn" and factor:
        yarn = {**base, "rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": original,
                "beta_fast": float(_field(reader, f"{arch}.rope.scaling.yarn_beta_fast") or 32.0),
                "beta_slow": float(_field(reader, f"{arch}.rope.scaling.yarn_beta_slow") or 1.0)}
        if attention is not None:  # llama.cpp multiplies its own 0.1 ln s + 1 by it
            yarn["attention_factor"] = float(attention) * (0.1 * math.log(factor) + 1.0)
        return yarn
    return None


def _field(reader: Any, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _scaling(name: str) -> Any:
    from gguf import RopeScalingType

    return getattr(RopeScalingType, name)


# ------------------------------------------------------------------------------------------------- tokenizer

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_name(pre: Mapping[str, Any] | None) -> str | None:
    """llama.cpp's name for what tokenizer.json's pre-tokenizer does, for the ones whose splitting llama.cpp
    reproduces (its `llm_tokenizer_bpe` regexes): GPT-2's, GPT-2's after one split per digit (SmolLM, StarCoder), and
    Llama 3's."""
    if not pre:
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True) \
            and (steps[0].get("pattern") or {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    return None


@dataclass(frozen=True)
class Vocabulary:
    model: str
    """llama.cpp's tokenizer: `gpt2` (byte-level BPE, with merges and a pre-tokenizer) or `llama` (SentencePiece's
    merges by score over the whole text, with byte fallback)."""
    tokens: list[str]
    types: list[int]
    special: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    merges: list[str] | None = None
    pre: str | None = None
    scores: list[float] | None = None
    add_space_prefix: bool | None = None


def read_vocabulary(directory: Path, config: Mapping[str, Any]) -> Vocabulary:
    """The checkpoint's tokenizer (tokenizer.json, tokenizer_config.json, chat template) in llama.cpp's terms."""
    from gguf import TokenType

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{directory} has no tokenizer.json; a GGUF carries its tokenizer. Save the tokenizer "
                          "into the checkpoint (tokenizer.save_pretrained) and export again.")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    pre = None if sentencepiece else _pre_tokenizer_name(tokenizer.get("pre_tokenizer"))
    space_prefix = _space_prefix(tokenizer) if sentencepiece else None
    if model.get("type") != "BPE" or (pre is None and space_prefix is None):
        raise ExportError(
            f"{path}: export writes byte-level BPE tokenizers that split text as GPT-2, SmolLM or Llama 3 do, and "
            "SentencePiece-style ones (byte fallback, '▁' for spaces, as Llama 2 and Mistral); this one is "
            f"{model.get('type')} with pre-tokenizer {json.dumps(tokenizer.get('pre_tokenizer'))[:200]}, which "
            "llama.cpp would split differently. Use llama.cpp's convert_hf_to_gguf.py for this tokenizer.")
    settings = _tokenizer_settings(directory)
    size = config["vocab_size"]
    largest = max([*model["vocab"].values(), *(t["id"] for t in tokenizer.get("added_tokens") or [])], default=-1)
    if largest >= size:
        raise ExportError(f"{path} has token id {largest} but the model's vocab_size is {size}: this tokenizer belongs "
                          "to another model. Save the model's own tokenizer into the checkpoint and export again.")
    tokens, types = [f"[PAD{i}]" for i in range(size)], [int(TokenType.UNUSED)] * size
    for text, index in model["vocab"].items():
        tokens[index], types[index] = text, int(TokenType.NORMAL)
    for added in tokenizer.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    ids = {text: index for index, text in enumerate(tokens)}
    special = {role: ids[text] for role in ("bos", "eos", "unk", "pad")
               if isinstance(text := _token_text(settings.get(f"{role}_token")), str) and text in ids}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    common = dict(tokens=tokens, special=special, add_bos=_adds_bos(tokenizer, settings),
                  add_eos=bool(settings.get("add_eos_token", False)), chat_template=_chat_template(directory, settings))
    if not sentencepiece:
        return Vocabulary("gpt2", types=types, merges=merges, pre=pre, **common)
    for index, text in enumerate(tokens):  # byte fallback pieces and the unknown piece, as SentencePiece types them
        if _BYTE_PIECE.fullmatch(text):
            types[index] = int(TokenType.BYTE)
    if model.get("unk_token") in ids:
        types[ids[model["unk_token"]]] = int(TokenType.UNKNOWN)
    return Vocabulary("llama", types=types, scores=_merge_scores(merges, ids, size), add_space_prefix=space_prefix,
                      **common)


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _space_prefix(tokenizer: Mapping[str, Any]) -> bool | None:
    """Whether a SentencePiece-style tokenizer puts '▁' before the text (llama.cpp's add_space_prefix), read from the
    normalizer (Llama 2: Prepend '▁', then spaces replaced by '▁') or a Metaspace pre-tokenizer; None when it is
    neither, which llama.cpp's SentencePiece tokenizer would not reproduce."""
    normalizer = tokenizer.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = {step.get("type"): step for step in steps}
    if "Replace" in kinds and (kinds["Replace"].get("content") == "▁"):
        return kinds.get("Prepend", {}).get("prepend") == "▁"
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement", "▁") == "▁":
        return pre.get("prepend_scheme", "always") != "never"
    return None


def _merge_scores(merges: Sequence[str], ids: Mapping[str, int], size: int) -> list[float]:
    """SentencePiece scores that make llama.cpp merge in the tokenizer's merge order: llama.cpp merges the adjacent
    pair whose joined piece scores highest, so each piece scores minus the rank of the first merge that makes it."""
    scores = [0.0] * size
    made: set[int] = set()
    for rank, merge in enumerate(merges):
        piece = ids.get(merge.replace(" ", "", 1))
        if piece is not None and piece not in made:
            made.add(piece)
            scores[piece] = -float(rank + 1)
    return scores


def _tokenizer_settings(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, Mapping) else value


def _adds_bos(tokenizer: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    """tokenizer_config's add_bos_token where it says, else whether the post-processor puts a special token first."""
    if "add_bos_token" in settings:
        return bool(settings["add_bos_token"])
    single = (tokenizer.get("post_processor") or {}).get("single") or []
    return bool(single) and "SpecialToken" in single[0]


def _chat_template(directory: Path, settings: Mapping[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = settings.get("chat_template")
    return template if isinstance(template, str) else None


# ------------------------------------------------------------------------------------------------- writing


def _write(path: Path, name: str, config: Mapping[str, Any], vocabulary: Vocabulary,
           tensors: Sequence[GgufTensor], checkpoint: Checkpoint, dtype: str) -> None:
    """The GGUF at `path`: metadata and every tensor's type and size first, then the tensors one at a time."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name.removesuffix(".gguf"))
    _hyperparameters(writer, config, dtype)
    _rope_metadata(writer, config)
    _tokenizer_metadata(writer, vocabulary)
    for tensor in tensors:
        raw = tensor.qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        shape = tensor.byte_shape if raw else tensor.shape
        numpy_type = np.uint8 if raw else (np.float32 if tensor.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
        writer.add_tensor_info(tensor.name, shape, np.dtype(numpy_type), math.prod(tensor.byte_shape),
                               raw_dtype=tensor.qtype if raw else None)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(math.prod(t.byte_shape) for t in tensors)
        with Progress(total, f"writing {name}", "B", unit_scale=True) as bar:
            for tensor in tensors:
                data = tensor.make([checkpoint.read(source).float().numpy() for source in tensor.sources])
                _append(writer, tensor.encode(data), path)
                bar.update(math.prod(tensor.byte_shape))
    finally:
        writer.close()


def _append(writer: Any, data: np.ndarray, path: Path) -> None:
    try:
        writer.write_tensor_data(data)
    except OSError as e:  # numpy's tofile reports a short write without its errno: a full disk, if there is no room
        if e.errno is None and shutil.disk_usage(path.parent).free < data.nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise


def _hyperparameters(writer: Any, config: Mapping[str, Any], dtype: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("num_local_experts"):
        writer.add_expert_count(config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])


def _tokenizer_metadata(writer: Any, vocabulary: Vocabulary) -> None:
    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    if vocabulary.merges is not None:
        writer.add_token_merges(vocabulary.merges)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    if vocabulary.add_space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.add_space_prefix)
    for role, index in vocabulary.special.items():
        getattr(writer, f"add_{role}_token_id")(index)
    writer.add_add_bos_token(vocabulary.add_bos)
    writer.add_add_eos_token(vocabulary.add_eos)
    if vocabulary.chat_template:
        writer.add_chat_template(vocabulary.chat_template)
