"""What a model card says about each record of a checkpoint's history: a title, an explanation, the paper, a limitation.

Keyed by the patch name recorded in `retrofit_history`, so a card can describe the history of a checkpoint whatever
version of llm-retrofit wrote it. A patcher declares its own text (`Patcher.card`, or its docstring's first line);
the few records that are not patches (conversion, finetune, LoRA) are described here; any other name gets a
generic line.
"""

from __future__ import annotations

from typing import Any

from ..spec import PatchCard


# What the history records that is not a patcher: a conversion, a finetune, a merged LoRA. Patchers carry their own
# `card` (spec.PatchCard).
OTHER_RECORDS: dict[str, PatchCard] = {
    "convert": PatchCard(
        "Conversion", "Converted to a safetensors checkpoint (a GGUF file is dequantized on the way).",
        "GGUF file format", "https://github.com/ggml-org/ggml/blob/master/docs/gguf.md",
    ),
    "lora": PatchCard(
        "LoRA", "Low-rank update matrices trained beside the frozen weights (kept as an adapter, or merged).",
        "LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021)", "https://arxiv.org/abs/2106.09685",
    ),
    "finetune": PatchCard(
        "Short finetune", "Trained for a few steps after the patches before it (what trained and on what data is in "
        "the parameters), so the new capacity is used.",
        limitation="A short finetune on a narrow corpus can shift the model toward that corpus.",
    ),
}

# base_model_relation. The Hub knows four: adapter, merge, quantized, finetune. An adapter directory is an
# `adapter`. A chain that only re-encodes the base's weights (dtype casts, format conversion) keeps them up to
# rounding, which is what `quantized` groups (the Hub's model tree lists it beside the base's other precisions);
# claiming `finetune` would say the weights were changed. Every other patch changes weights or architecture (RoPE
# factors, pooled heads, experts, layers, merged LoRA) and the Hub's bucket for a derived model with changed weights
# is `finetune`; an unknown patch gets it too, as the most general claim. `merge` means several parent models
# combined, which no patch does.
GGUF_LIMITATION = "The weights were dequantized from a quantized GGUF file and carry its quantization error."


def patch_info(name: str) -> PatchCard:
    """What the card says about `name`: its patcher's card (or docstring), a row above, or a generic line."""
    from ..patchers import registry

    patcher = registry().get(name)
    if patcher is not None:
        return patcher.card or PatchCard(name, patcher.summary())
    if name in OTHER_RECORDS:
        return OTHER_RECORDS[name]
    return PatchCard(name, f"Applied by llm-retrofit; this version of it has no description of the `{name}` patch.")


def limitation(name: str, params: dict[str, Any]) -> str | None:
    """The limitation a patch with these parameters brings, if any (some hold only for some parameters)."""
    from ..patchers import registry

    if name == "convert":
        return GGUF_LIMITATION if params.get("from") == "gguf" else None
    patcher = registry().get(name)
    return patcher.card_limitation(params) if patcher is not None else patch_info(name).limitation


def record_note(record: dict[str, Any]) -> str | None:
    """What the card adds to a history record's explanation from the record itself (`Patcher.card_note`)."""
    from ..patchers import registry

    patcher = registry().get(str(record.get("patch")))
    return patcher.card_note(record) if patcher is not None else None


def base_model_relation(patch_names: set[str], is_adapter: bool) -> str:
    """The Hub's `base_model_relation` for a chain of patches (see the note above GGUF_LIMITATION)."""
    from ..patchers import registry

    if is_adapter:
        return "adapter"

    def representation_only(name: str) -> bool:
        return name == "convert" or getattr(registry().get(name), "representation_only", False)

    return "quantized" if patch_names and all(map(representation_only, patch_names)) else "finetune"
