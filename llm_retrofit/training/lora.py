"""LoRA adapters through peft: attach a train-ready adapter, then merge it or save it as an adapter directory.

A LoRA adapter is not a per-tensor rewrite of the base: at initialisation it changes nothing (B = 0), and what it
becomes is decided by training. So `lora` is not a `TensorPlan` patcher (a plan of it would be the identity); it is a
typed spec, parsed like every patch spec (`lora:r=16,alpha=32,merge=false`), that the finetune step uses:

1. `attach(model)` wraps a loaded model with peft (`get_peft_model`) and makes the extra trainables trainable;
2. the finetune trains it;
3. `finish(model, ...)` either merges (`merge_and_unload`: a full checkpoint, recorded as a `lora` patch in the
   history) or saves a peft adapter directory whose `base_model_name_or_path` is the patched base it was trained on,
   so `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)` loads it with vanilla peft.

Extra trainables (LongLoRA, arXiv 2309.12307, trains the embeddings and norms beside the adapter to extend context)
are peft `modules_to_save`: full copies trained and saved with the adapter. With tied embeddings, a trained copy of
`embed_tokens` would silently untie it from `lm_head`; `ensure_weight_tying=True` makes peft keep the two tied.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import PatchSpecError
from ..io.progress import quiet_libraries

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_TARGETS = "q_proj+k_proj+v_proj+o_proj"
PLUS_LISTS = ("target_modules", "trainable")
"""The settings that are `+`-joined lists of module names; a recipe may write them as YAML lists."""
EXTRA_TRAINABLES = {
    "embed_tokens": ["embed_tokens"],
    "norm": ["input_layernorm", "post_attention_layernorm", "norm"],
    "lm_head": ["lm_head"],
}


@dataclass(frozen=True)
class LoraSpec:
    """LoRA through peft: a low-rank adapter on `target_modules`, merged into the weights or saved as an adapter."""

    name: ClassVar[str] = "lora"
    example: ClassVar[str] = "lora:r=16,alpha=32,target_modules=q_proj+v_proj,trainable=embed_tokens+norm,merge=true"

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str = DEFAULT_TARGETS
    """`+`-separated module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or `all-linear`."""
    trainable: str = ""
    """Extra fully trained modules, `+`-separated: embed_tokens, norm, lm_head (LongLoRA trains embed_tokens+norm)."""
    use_dora: bool = False
    use_rslora: bool = False
    merge: bool = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise PatchSpecError(f"lora: r={self.r} must be a positive rank, e.g. r=16.")
        if not 0 <= self.dropout < 1:
            raise PatchSpecError(f"lora: dropout={self.dropout} must be in [0, 1).")
        unknown = [t for t in self.extra_trainables if t not in EXTRA_TRAINABLES]
        if unknown:
            raise PatchSpecError(
                f"lora: trainable={self.trainable!r} names {', '.join(unknown)}; choose from {', '.join(EXTRA_TRAINABLES)}."
            )

    @property
    def extra_trainables(self) -> list[str]:
        return [t for t in self.trainable.split("+") if t]

    @property
    def targets(self) -> list[str] | str:
        return "all-linear" if self.target_modules == "all-linear" else [t for t in self.target_modules.split("+") if t]

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def trained_parameters(self, config: Mapping[str, Any]) -> int:
        """How many parameters this adapter trains on a model with this config.json: r x (in + out) per targeted
        projection, and every parameter of the extra trainables (peft trains a full copy of each)."""
        text = dict(config.get("text_config") or config)
        hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or hidden // heads)
        kv = int(text.get("num_key_value_heads") or heads) * head_dim
        mlp = int(text.get("intermediate_size") or 4 * hidden) * int(text.get("num_local_experts") or 1)
        widths = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
                  "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp),
                  "down_proj": (mlp, hidden)}
        targets = list(widths) if self.targets == "all-linear" else self.targets
        adapter = sum(self.r * sum(widths[t]) for t in targets if t in widths) * layers
        extras = {"embed_tokens": int(text["vocab_size"]) * hidden, "lm_head": int(text["vocab_size"]) * hidden,
                  "norm": (2 * layers + 1) * hidden}
        return adapter + sum(extras[t] for t in self.extra_trainables)

    def peft_config(self, model: PreTrainedModel) -> Any:
        from peft import LoraConfig

        modules_to_save = [m for t in self.extra_trainables for m in EXTRA_TRAINABLES[t]]
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        if tied and "lm_head" in self.extra_trainables:
            raise PatchSpecError("lora: trainable=lm_head on a model with tied embeddings; train embed_tokens instead.")
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.targets,
            modules_to_save=modules_to_save or None,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            ensure_weight_tying=tied and "embed_tokens" in self.extra_trainables,
            task_type="CAUSAL_LM",
        )

    def attach(self, model: PreTrainedModel) -> Any:
        """The model wrapped in a train-ready peft adapter (only the adapter and extra trainables require grad)."""
        from peft import get_peft_model

        try:
            with quiet_libraries():  # peft reads transformers' deprecated `is_gradient_checkpointing` alias
                return get_peft_model(model, self.peft_config(model))
        except ValueError as e:  # peft: target modules not found in the base model, and similar
            raise PatchSpecError(f"lora: peft refused {self.spec()}: {e}") from None

    def spec(self) -> str:
        return "lora:" + ",".join(f"{k}={v}" for k, v in self.params().items())


def parse_lora(spec: str | Mapping[str, Any] | LoraSpec) -> LoraSpec:
    """`"lora:r=8,merge=false"`, `{"r": 8, "merge": False}` or a LoraSpec -> a LoraSpec, each value read by the spec
    language's one reader (`spec.read_fields`), unknown keys refused."""
    from ..spec import parse_fields, read_fields

    if isinstance(spec, LoraSpec):
        return spec
    if isinstance(spec, Mapping):
        return read_fields(LoraSpec, joined_lists(spec))  # type: ignore[no-any-return]
    name, _, arguments = spec.strip().partition(":")
    if name.strip() != "lora":
        raise PatchSpecError(f"{spec!r} is not a lora spec. Example: {LoraSpec.example}")
    return parse_fields(LoraSpec, spec, arguments)  # type: ignore[no-any-return]


def joined_lists(values: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping of lora settings with its lists written as the spec writes them: `target_modules: [q_proj, v_proj]`
    is `q_proj+v_proj` (so is `trainable`)."""
    return {key: "+".join(map(str, value)) if key in PLUS_LISTS and isinstance(value, (list, tuple)) else value
            for key, value in values.items()}


def load_merged_adapter(path: str | os.PathLike[str], dtype: Any = None) -> PreTrainedModel:
    """A peft adapter directory loaded onto its base model and merged into it (for evaluating an adapter).

    The base loads as `load_model` loads a checkpoint: complete, and with its attention pattern or Infini memory run
    through the file the patch shipped (ours only; code that is not ours is a CheckpointError, never the plain
    architecture). peft's AutoPeftModel would load it without that rule, so the base is loaded here and the adapter
    put on it with vanilla peft, as the module docstring says anyone can."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from ..io.checkpoint import load_checkpoint
    from ..modeling.remote_code import runs_our_code

    adapter = PeftConfig.from_pretrained(os.fspath(path))
    base = load_checkpoint(adapter.base_model_name_or_path, adapter.revision)
    base.require_complete()
    trusted = runs_our_code(base.path, base.config)
    with quiet_libraries():
        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype or "auto", trust_remote_code=trusted)
        return PeftModel.from_pretrained(model, os.fspath(path)).merge_and_unload()
