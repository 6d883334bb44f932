"""The `finetune` step: `FinetuneSettings` (with `lora:` a `LoraSpec`, `distill:` a `DistillSpec`) and `finetune()`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ...modeling.cost import Pass
from ..schema import Recipe, Step, Unknown, read_settings
from ..values import _lora_values, finetune_settings
from .base import PlannedStep, Planning, RunState, StepKind, StepOutcome, at, has_unknown, size_text

if TYPE_CHECKING:
    from ...plan import ModelView
    from ...training.finetune import FinetuneSettings


class FinetuneStep(StepKind):
    kind: ClassVar[str] = "finetune"
    memory_advice: ClassVar[str] = ("set gradient_checkpointing: true, train a LoRA adapter (lora: {r: 16}) instead "
                                     "of every weight, lower seq_len or batch_size, or shard a full finetune over "
                                     "several GPUs (docs/scale.md)")
    writes_directory: ClassVar[bool] = True
    makes_model: ClassVar[bool] = True

    def check(self, recipe: Recipe, step: Step, params: dict[str, Any], push_repo: str | None) -> None:
        """Each value (and each `lora:` value) read as its field says, then the settings together, with the values
        known only when run stood in for (`_finetune_stand_ins`); a teacher that must exist already, found."""
        from ...training.finetune import FinetuneSettings
        from ...training.lora import LoraSpec

        for key, value in params.items():
            if key == "lora" and not isinstance(value, (str, Unknown, type(None))):  # a spec text is read whole
                for name, item in at(recipe, step, lambda: _lora_values(value), key).items():
                    at(recipe, step, lambda: read_settings(LoraSpec, {name: item}, prefix="lora."), key, name)
            else:
                at(recipe, step, lambda: read_settings(FinetuneSettings, {key: value}), key)
        complete = not has_unknown(params)
        at(recipe, step, lambda: finetune_settings(params if complete else _finetune_stand_ins(params)))
        distill = params.get("distill")
        # A missing teacher is refused before the first step; one that is an earlier step's output exists once it ran.
        if distill is not None and not has_unknown(distill) and "${steps." not in str(step.params.get("distill")):
            from ...training.distill import check_teacher, parse_distill

            at(recipe, step, lambda: check_teacher(parse_distill(distill).teacher), "distill")

    def plan(self, item: PlannedStep, planning: Planning) -> None:
        if item.unknown:
            return
        settings = finetune_settings(item.params)
        steps, per_step = settings.total_steps(), settings.tokens_per_step()
        item.notes.append(f"{steps} steps x {per_step} tokens = {steps * per_step} tokens per process")
        if planning.view is not None:
            item.bytes_written = _finetune_bytes(settings, planning.view)
            adapter = " (adapter)" if settings.lora and not settings.lora.merge else ""
            item.notes.append(f"writes {size_text(item.bytes_written)}{adapter}")
        else:
            item.notes.append("writes a model the size of the one before it")

    def passes(self, step: Step, params: dict[str, Any], shape: ModelView, base: ModelView) -> list[Pass]:
        """A training pass per sequence of every micro-step (and the teacher's forward of it, when distilling)."""
        from ...modeling.shifted_sparse_attention import group_size

        settings = finetune_settings(params)
        group = group_size(settings.seq_len) if settings.s2_attn else None
        sequences = settings.total_steps() * settings.grad_accum * settings.batch_size
        adapter = settings.lora.trained_parameters(shape.config) if settings.lora is not None else None
        one = Pass(settings.seq_len, _as_held(shape.config, settings), training=True, rows=settings.batch_size,
                   checkpointing=settings.gradient_checkpointing, attention_group=group, adapter_params=adapter)
        teacher = [Pass(settings.seq_len, shape.config)] if settings.distill is not None else []
        return [one, *teacher] * sequences

    def describe(self, step: Step, params: dict[str, Any]) -> str:
        settings = finetune_settings(params)
        steps = settings.total_steps()
        return (f"{steps} step{'s' if steps != 1 else ''} x {settings.tokens_per_step()} tokens at seq_len "
                f"{settings.seq_len}" + (" (LoRA)" if settings.lora else ""))

    def run(self, step: Step, params: dict[str, Any], state: RunState, directory: Path) -> StepOutcome:
        from ...training.finetune import finetune

        result = finetune(state.model, directory, finetune_settings(params), base=state.base)  # distill's `teacher: base`
        return StepOutcome(result.to_json() | {"output": str(result.path)}, model=str(result.path))


def _as_held(config: Mapping[str, Any], settings: FinetuneSettings) -> dict[str, Any]:
    """`config` with the dtype the finetune holds its frozen weights in (training/dtypes.py): the stored one under
    bf16 autocast, float32 where it computes in float32 (an AVX2 CPU, `bf16: false`)."""
    import torch

    from ...training.dtypes import held_dtype
    from ...training.finetune import mixed_precision

    stored = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch."))
    held = held_dtype(stored, mixed_precision(settings.bf16))
    return dict(config) | {"dtype": str(held).removeprefix("torch.")}


def _finetune_stand_ins(params: dict[str, Any]) -> dict[str, Any]:
    """A finetune step's known values for checking them together before the run, without those known only then.

    What FinetuneSettings checks together is one budget (steps or tokens), s2_attn with a seq_len in 4 even groups,
    and lora without train. An unknown budget stands in as 1 (it is given, so "steps and tokens" is still refused);
    any other unknown value is left out, so its default stands in: seq_len 1024 suits s2_attn, no lora and train
    `all` conflict with nothing. So no error here can come from a stand-in; the real values are checked when known.
    """
    known: dict[str, Any] = {}
    for key, value in params.items():
        if key in ("steps", "tokens") and isinstance(value, Unknown):
            known[key] = 1
        elif isinstance(value, list):
            items = [v for v in value if not has_unknown(v)]
            if items:
                known[key] = items
        elif not has_unknown(value):
            known[key] = value
    return known


def _finetune_bytes(settings: FinetuneSettings, view: ModelView) -> int:
    """What the finetune writes: the whole model, or (an adapter not merged) the LoRA matrices of the targeted
    linear layers in float32 and the extra trainables (peft's `modules_to_save`: whole copies)."""
    from ...training.lora import EXTRA_TRAINABLES

    full = sum(meta.nbytes for meta in view.tensors.values())
    if settings.lora is None or settings.lora.merge:
        return full
    lora = settings.lora
    targets = lora.targets
    total = 0
    for name, meta in view.tensors.items():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
        if len(meta.shape) == 2 and (targets == "all-linear" and "lm_head" not in name or module in targets):
            total += lora.r * (meta.shape[0] + meta.shape[1]) * 4
    saved = {module for trainable in lora.extra_trainables for module in EXTRA_TRAINABLES[trainable]}
    total += sum(meta.nbytes for name, meta in view.tensors.items() if _module_of(name) in saved)
    return total


def _module_of(tensor: str) -> str:
    """`model.layers.0.input_layernorm.weight` -> `input_layernorm`; `lm_head.weight` -> `lm_head` (the name peft's
    `modules_to_save` matches)."""
    parts = tensor.split(".")
    return parts[-2] if len(parts) >= 2 else tensor
