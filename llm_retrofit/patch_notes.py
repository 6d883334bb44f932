"""What a model card says about each kind of patch: a title, a one-line explanation, the paper, a limitation.

Keyed by the patch name recorded in `retrofit_history`, so a card can describe the history of a checkpoint whatever
version of llm-retrofit wrote it. A patch that is not listed is described by its patcher's docstring when this
version has that patcher, else by a generic line. A new patcher adds its row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PatchInfo:
    """What the card says about one kind of patch."""

    title: str
    explanation: str
    reference: str | None = None  # the paper (or, for a file format, its specification)
    url: str | None = None
    limitation: str | None = None


# One line per patch the project has or plans (issue list in DESIGN.md); a name not here gets a generic line.
PATCHES: dict[str, PatchInfo] = {
    "convert": PatchInfo(
        "Conversion", "Converted to a safetensors checkpoint (a GGUF file is dequantized on the way).",
        "GGUF file format", "https://github.com/ggml-org/ggml/blob/master/docs/gguf.md",
    ),
    "dtype": PatchInfo(
        "Precision cast", "Floating-point weights re-encoded in another dtype; bfloat16 keeps float32's exponent "
        "range with a 7-bit mantissa.",
        "A Study of BFLOAT16 for Deep Learning Training (Kalamkar et al., 2019)", "https://arxiv.org/abs/1905.12322",
        "Casting to a narrower type rounds every weight; compare the evaluation with the source before relying on "
        "it.",
    ),
    "linear": PatchInfo(
        "Position Interpolation", "RoPE positions are divided by the scaling factor, so the longer context maps "
        "onto the position range the model was trained on.",
        "Extending Context Window of Large Language Models via Positional Interpolation (Chen et al., 2023)",
        "https://arxiv.org/abs/2306.15595",
        "Position Interpolation needs a short finetune at the new length; short-context quality drops slightly.",
    ),
    "ntk": PatchInfo(
        "NTK-aware RoPE scaling", "The RoPE base is raised so that high frequencies are kept and low frequencies "
        "are interpolated.",
        "YaRN: Efficient Context Window Extension of Large Language Models (Peng et al., 2023), NTK-aware "
        "interpolation", "https://arxiv.org/abs/2309.00071",
        "NTK-aware scaling without finetuning holds up to about twice the trained length; beyond that perplexity "
        "rises quickly.",
    ),
    "dynamic": PatchInfo(
        "Dynamic NTK scaling", "NTK-aware scaling whose factor grows with the current sequence length, so short "
        "inputs are computed exactly as before.",
        "YaRN: Efficient Context Window Extension of Large Language Models (Peng et al., 2023), Dynamic NTK",
        "https://arxiv.org/abs/2309.00071",
        "Dynamic scaling picks the rotary frequencies from the sequence length: keys cached early in a generation "
        "were rotated with other frequencies than later queries use.",
    ),
    "yarn": PatchInfo(
        "YaRN", "NTK-by-parts interpolation of the RoPE frequencies plus an attention temperature; extends the "
        "context with little or no finetuning.",
        "YaRN: Efficient Context Window Extension of Large Language Models (Peng et al., 2023)",
        "https://arxiv.org/abs/2309.00071",
    ),
    "llama3": PatchInfo(
        "Llama 3 RoPE scaling", "Frequency-dependent RoPE scaling of Llama 3.1: high frequencies kept, low "
        "frequencies divided by the factor, a smooth ramp between.",
        "The Llama 3 Herd of Models (Grattafiori et al., 2024)", "https://arxiv.org/abs/2407.21783",
    ),
    "longrope": PatchInfo(
        "LongRoPE", "Per-dimension RoPE rescaling factors found by evolutionary search, one set for short and one "
        "for long inputs.",
        "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens (Ding et al., 2024)",
        "https://arxiv.org/abs/2402.13753",
        "LongRoPE switches from the short to the long factors once a forward pass is longer than "
        "`original_max_position_embeddings`. In generation the KV cache of a shorter prompt was computed with the "
        "short factors and is reused after the switch, so text generated past the threshold differs from what a "
        "single long forward pass gives; re-encode the prompt when that matters.",
    ),
    "moe": PatchInfo(
        "Sparse upcycling to mixture-of-experts", "Each MLP is copied into several experts behind a new router "
        "(Mixtral architecture); at initialisation it computes what the dense model computed.",
        "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints (Komatsuzaki et al., 2022)",
        "https://arxiv.org/abs/2212.05055",
        "Until it is finetuned the experts are identical and the router untrained: more parameters and compute, "
        "no better quality.",
    ),
    "expand": PatchInfo(
        "Block expansion (LLaMA Pro)", "Copies of decoder layers are inserted with their output projections "
        "zeroed, so the model is unchanged at initialisation and the new blocks can be trained.",
        "LLaMA Pro: Progressive LLaMA with Block Expansion (Wu et al., 2024)", "https://arxiv.org/abs/2401.02415",
        "The inserted blocks cost compute but change nothing until they are trained.",
    ),
    "dus": PatchInfo(
        "Depth up-scaling", "Two copies of the layer stack, overlapping layers removed, joined into a deeper model.",
        "SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective Depth Up-Scaling (Kim et al., 2023)",
        "https://arxiv.org/abs/2312.15166",
        "Quality drops right after depth up-scaling; continued pretraining recovers and improves it.",
    ),
    "gqa": PatchInfo(
        "Grouped-query attention", "Key and value heads are pooled into fewer groups, shrinking the KV cache by "
        "the group size.",
        "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints (Ainslie et al., 2023)",
        "https://arxiv.org/abs/2305.13245",
        "Pooling KV heads without uptraining loses some quality; the paper recovers it with about 5% of the "
        "pretraining compute.",
    ),
    "lora": PatchInfo(
        "LoRA", "Low-rank update matrices trained beside the frozen weights (kept as an adapter, or merged).",
        "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021)", "https://arxiv.org/abs/2106.09685",
    ),
    "finetune": PatchInfo(
        "Short finetune", "Trained for a few steps after the patches before it (what trained and on what data is in "
        "the parameters), so the new capacity is used.",
        limitation="A short finetune on a narrow corpus can shift the model toward that corpus.",
    ),
    "infini": PatchInfo(
        "Infini-attention", "A compressive memory added to attention, for unbounded context in bounded memory.",
        "Leave No Context Behind: Efficient Infinite Context Transformers with Infini-attention "
        "(Munkhdalai et al., 2024)", "https://arxiv.org/abs/2404.07143",
    ),
}

# base_model_relation. The Hub knows four: adapter, merge, quantized, finetune. An adapter directory is an
# `adapter`. A chain that only re-encodes the base's weights (dtype casts, format conversion) keeps them up to
# rounding, which is what `quantized` groups (the Hub's model tree lists it beside the base's other precisions);
# claiming `finetune` would say the weights were changed. Every other patch changes weights or architecture (RoPE
# factors, pooled heads, experts, layers, merged LoRA) and the Hub's bucket for a derived model with changed weights
# is `finetune`; an unknown patch gets it too, as the most general claim. `merge` means several parent models
# combined, which no patch does.
REPRESENTATION_ONLY = {"dtype", "convert"}
NARROW_DTYPES = {"bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"}
GGUF_LIMITATION = "The weights were dequantized from a quantized GGUF file and carry its quantization error."


def patch_info(name: str) -> PatchInfo:
    """The row for `name`; for a patch not listed, its patcher's one-line summary, or a generic line."""
    from .patchers import registry

    if name in PATCHES:
        return PATCHES[name]
    patcher = registry().get(name)
    if patcher is not None:
        return PatchInfo(name, patcher.summary())
    return PatchInfo(name, f"Applied by llm-retrofit; this version of it has no description of the `{name}` patch.")


def limitation(name: str, params: dict[str, Any]) -> str | None:
    """The limitation a patch with these parameters brings, if any (some hold only for some parameters)."""
    if name == "dtype" and params.get("to") not in NARROW_DTYPES:
        return None  # casting up (or to the same width) loses nothing
    if name == "convert":
        return GGUF_LIMITATION if params.get("from") == "gguf" else None
    return patch_info(name).limitation


def base_model_relation(patch_names: set[str], is_adapter: bool) -> str:
    """The Hub's `base_model_relation` for a chain of patches (see the note above REPRESENTATION_ONLY)."""
    if is_adapter:
        return "adapter"
    return "quantized" if patch_names and patch_names <= REPRESENTATION_ONLY else "finetune"
