"""Deeper models from the layers a model already has.

`expand` is LLaMA-Pro's block expansion (arXiv 2401.02415): after every N original layers, insert a copy of the
layer just before it with its two output projections (attention o_proj and MLP down_proj, and their biases) set to
zero. A decoder layer adds its attention and MLP outputs to the residual stream, so a zeroed copy adds nothing: the
expanded model computes exactly the original function, and finetuning only the new layers (`train: new_layers`)
adds capacity without disturbing what the model knows. The new layers' indices are recorded in the provenance.

`dus` is SOLAR's depth up-scaling (arXiv 2312.15166): two copies of the model, the first without its last m layers,
the second without its first m, stacked (n=32, m=8 gives 48 layers). Not function-preserving; it needs continued
pretraining, which the paper reports recovers quickly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..architectures import layer_name, split_layer_name
from ..errors import PatchError, PatchSpecError
from ..plan import ModelView, TensorPlan, TensorTask
from ..spec import PatchCard, Patcher, register

_OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")
# A Mixtral layer's MLP output: each expert's w2 (its down_proj). Zeroed in a new layer, as down_proj is.
_EXPERT_OUTPUT_PROJECTION = re.compile(r"block_sparse_moe\.experts\.\d+\.w2\.weight")


def _restack(model: ModelView, sources: list[int], zeroed: set[int]) -> TensorPlan:
    """A plan whose layer j is a copy of old layer sources[j]; layers in `zeroed` get zero output projections."""
    per_layer: dict[int, list[tuple[str, str]]] = {}
    tensors: dict[str, TensorTask] = {}
    for name, meta in model.tensors.items():
        located = split_layer_name(name)
        if located is None:
            tensors[name] = TensorTask(meta, (name,))
        else:
            per_layer.setdefault(located[0], []).append((located[1], name))
    for new_index, old_index in enumerate(sources):
        for suffix, old_name in per_layer[old_index]:
            is_output = suffix in _OUTPUT_PROJECTIONS or _EXPERT_OUTPUT_PROJECTION.fullmatch(suffix) is not None
            zero = new_index in zeroed and is_output
            task = TensorTask(model.tensors[old_name], (old_name,), torch.zeros_like if zero else None)
            tensors[layer_name(new_index, suffix)] = task
    config = dict(model.config, num_hidden_layers=len(sources))
    for key, value in model.config.items():  # per-layer settings (e.g. layer_types) follow their layer
        if isinstance(value, list) and len(value) == model.config["num_hidden_layers"] and key != "architectures":
            config[key] = [value[old] for old in sources]
    return TensorPlan(config, tensors)


@register
@dataclass(frozen=True)
class ExpandBlocks(Patcher):
    """LLaMA-Pro block expansion: insert zero-output copies of layers (the model is unchanged until trained)."""

    name: ClassVar[str] = "expand"
    example: ClassVar[str] = "expand:num_new_layers=10"
    card: ClassVar[PatchCard] = PatchCard(
        "Block expansion (LLaMA Pro)", "Copies of decoder layers are inserted with their output projections "
        "zeroed, so the model is unchanged at initialisation and the new blocks can be trained.",
        "LLaMA Pro: Progressive LLaMA with Block Expansion (Wu et al., 2024)", "https://arxiv.org/abs/2401.02415",
        "The inserted blocks cost compute but change nothing until they are trained.",
    )

    num_new_layers: int | None = None
    every: int | None = None

    def __post_init__(self) -> None:
        if (self.num_new_layers is None) == (self.every is None):
            raise PatchSpecError("expand: give exactly one of num_new_layers=P or every=N. Example: expand:every=4")
        for key, meaning in (("num_new_layers", "the layers to add"), ("every", "original layers per added one")):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise PatchSpecError(
                    f"expand: {key}={value} must be a positive integer ({meaning}), e.g. expand:{key}=4"
                )

    def plan(self, model: ModelView) -> TensorPlan:
        layers = model.config["num_hidden_layers"]
        every = self.every or self._every_for(layers)
        if every > layers:
            raise PatchError(f"expand: every={every} is more than the model's {layers} layers; nothing would be added.")
        sources: list[int] = []
        new_layers: set[int] = set()
        for old in range(layers):
            sources.append(old)
            if (old + 1) % every == 0:
                new_layers.add(len(sources))
                sources.append(old)
        plan = _restack(model, sources, new_layers)
        plan.notes = {"new_layers": sorted(new_layers), "layer_sources": sources}
        return plan

    def _every_for(self, layers: int) -> int:
        assert self.num_new_layers is not None
        if layers % self.num_new_layers:
            divisors = [p for p in range(1, layers + 1) if layers % p == 0]
            raise PatchError(
                f"expand: {layers} layers cannot be split into {self.num_new_layers} equal groups; "
                f"use num_new_layers in {divisors} or every=N."
            )
        return layers // self.num_new_layers


@register
@dataclass(frozen=True)
class DepthUpscale(Patcher):
    """SOLAR depth up-scaling: stack layers [0, n-m) and [m, n) (not function-preserving; continue pretraining)."""

    name: ClassVar[str] = "dus"
    example: ClassVar[str] = "dus:m=8"
    card: ClassVar[PatchCard] = PatchCard(
        "Depth up-scaling", "Two copies of the layer stack, overlapping layers removed, joined into a deeper model.",
        "SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective Depth Up-Scaling (Kim et al., 2023)",
        "https://arxiv.org/abs/2312.15166",
        "Quality drops right after depth up-scaling; continued pretraining recovers and improves it.",
    )

    m: int

    def plan(self, model: ModelView) -> TensorPlan:
        layers = model.config["num_hidden_layers"]
        if not 0 < self.m < layers:
            raise PatchError(f"dus: m={self.m} must be between 1 and {layers - 1} (the model has {layers} layers).")
        sources = list(range(layers - self.m)) + list(range(self.m, layers))
        plan = _restack(model, sources, zeroed=set())
        plan.notes = {"layer_sources": sources}
        return plan
