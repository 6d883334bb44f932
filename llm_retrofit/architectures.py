"""The model families llm-retrofit rewrites, described as data.

An `Architecture` knows the tensor names of one family (as templates with a `{layer}` field) and which config keys
hold its shape. Patchers build their plans from these templates instead of spelling tensor names themselves, and
`retrofit inspect` uses them to tell a complete checkpoint from one with missing tensors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedArchitectureError

_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    class_name: str
    layer_tensors: tuple[str, ...]
    """Per-layer tensor names relative to `model.layers.{layer}.`; always present."""
    attention_bias_tensors: tuple[str, ...] = ()
    """Per-layer tensors present only when `config.attention_bias` is true."""
    mlp_bias_tensors: tuple[str, ...] = ()
    """Per-layer tensors present only when `config.mlp_bias` is true."""

    embed = "model.embed_tokens.weight"
    final_norm = "model.norm.weight"
    lm_head = "lm_head.weight"

    def layer_tensor_names(self, layer: int, config: Mapping[str, Any]) -> list[str]:
        names = []
        for template in self.layer_tensors:
            experts = range(config.get("num_local_experts", 0)) if "{expert}" in template else [None]
            names += [template.format(expert=e) for e in experts]
        if config.get("attention_bias"):
            names += self.attention_bias_tensors
        if config.get("mlp_bias"):
            names += self.mlp_bias_tensors
        return [layer_name(layer, name) for name in names]

    def expected_tensors(self, config: Mapping[str, Any]) -> Iterator[str]:
        """Every tensor a complete checkpoint of this shape stores, in the order transformers saves them."""
        yield self.embed
        for layer in range(config["num_hidden_layers"]):
            yield from self.layer_tensor_names(layer, config)
        yield self.final_norm
        if not config.get("tie_word_embeddings", False):
            yield self.lm_head


def _dense(model_type: str, class_name: str) -> Architecture:
    return Architecture(
        model_type=model_type,
        class_name=class_name,
        layer_tensors=tuple(f"{m}.weight" for m in _ATTENTION + _DENSE_MLP) + _NORMS,
        attention_bias_tensors=tuple(f"{m}.bias" for m in _ATTENTION[:3]) + ("self_attn.o_proj.bias",),
        mlp_bias_tensors=tuple(f"{m}.bias" for m in _DENSE_MLP),
    )


ARCHITECTURES: dict[str, Architecture] = {
    "llama": _dense("llama", "LlamaForCausalLM"),
    "mistral": _dense("mistral", "MistralForCausalLM"),
    # Llama/Mistral with per-layer sliding or full attention (`layer_types`): what a hybrid sliding window becomes.
    "ministral": _dense("ministral", "MinistralForCausalLM"),
    # Output of MoE upcycling, in the on-disk layout: one w1 (gate), w3 (up), w2 (down) per expert. transformers 5
    # fuses the experts in memory (mlp.experts.gate_up_proj / down_proj) but saves and loads this layout, as do
    # transformers 4, vLLM and llama.cpp; and it lets upcycling copy each dense matrix byte for byte.
    "mixtral": Architecture(
        model_type="mixtral",
        class_name="MixtralForCausalLM",
        layer_tensors=tuple(f"{m}.weight" for m in _ATTENTION)
        + ("block_sparse_moe.gate.weight",)
        + tuple(f"block_sparse_moe.experts.{{expert}}.{w}.weight" for w in ("w1", "w2", "w3"))
        + _NORMS,
    ),
}


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def split_layer_name(name: str) -> tuple[int, str] | None:
    """`model.layers.12.mlp.up_proj.weight` -> (12, "mlp.up_proj.weight"); None for tensors outside the layers."""
    match = _LAYER_NAME.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def layer_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


def architecture_of(config: Mapping[str, Any]) -> Architecture:
    """The `Architecture` for a config.json mapping, or an error that lists the supported ones."""
    model_type = config.get("model_type")
    try:
        return ARCHITECTURES[model_type]  # type: ignore[index]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported; llm-retrofit rewrites {supported} checkpoints. "
            "Convert the model to one of these families first, or open an issue asking for it."
        ) from None
