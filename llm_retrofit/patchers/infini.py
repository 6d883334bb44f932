"""Infini-attention (Munkhdalai et al. 2024, arXiv 2404.07143): a compressive memory per KV head beside local attention.

The input runs in segments of `segment_length` tokens. Within a segment, attention is the model's own (causal,
RoPE). Across segments, each KV head keeps a matrix memory of the keys and values it has seen (pre-RoPE, ELU+1
features, float32 whatever the model's dtype), and each query head mixes what it retrieves from its KV head's
memory (repeat_kv order) with its local attention through a learned gate sigmoid(beta). So the cache is bounded by
one segment plus one d x d memory per KV head, however long the input.

The patch adds one gate tensor per layer (`self_attn.memory_gate`, one beta per query head) and ships the modeling
file that computes all of this (`modeling/shipped/modeling_retrofit_infini.py`, named by `auto_map`), which loads
with `trust_remote_code=True` where llm-retrofit is not installed. At init the gates are very negative
(`gate_init`, sigmoid(-8) = 3.4e-4): on inputs of at most one segment the model is the original exactly (an empty
memory contributes nothing), and past it, it is the original's segment-local attention plus a memory term that
starts near zero. The gates must then be trained (with their own learning rate: see docs/patchers/infini.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from ..architectures import layer_name, split_layer_name
from ..errors import PatchError, PatchSpecError
from ..io.checkpoint import TensorMeta
from ..modeling import shipped
from ..plan import ModelView, TensorPlan, TensorTask
from ..spec import PatchCard, Patcher, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SHIPPED_MODULE = "modeling_retrofit_infini"
SETTINGS_KEY = "retrofit_infini"
GATE = "self_attn.memory_gate"
GATE_INIT_LIMIT = 30.0
"""The largest |gate_init|: sigmoid(-30) = 9.4e-14, so beyond it the gate is shut (or open) and its gradient, the
sigmoid's slope, vanishes; a value past every dtype's range (1e300) could not even be stored."""


@register
@dataclass(frozen=True)
class AddInfiniMemory(Patcher):
    """Infini-attention: a compressive memory per KV head across segments, mixed in by a trainable gate per head."""

    name: ClassVar[str] = "infini"
    example: ClassVar[str] = "infini:segment_length=2048,update=delta"
    card: ClassVar[PatchCard] = PatchCard(
        "Infini-attention memory",
        "Attention runs in segments; a compressive memory per key/value head carries what earlier segments held, "
        "mixed with local attention by a learned gate per head.",
        "Leave No Context Behind: Efficient Infinite Context Transformers with Infini-attention (Munkhdalai et al., "
        "2024)", "https://arxiv.org/abs/2404.07143",
        "Until its gates are trained the model attends only within a segment; the memory's benefit depends on that "
        "training (see the evaluation).",
    )

    segment_length: int
    update: Literal["linear", "delta"] = "delta"
    gate_init: float = -8.0
    memory: bool = True  # false: segments without memory, each attends only within itself (the ablation)

    def __post_init__(self) -> None:
        if self.segment_length < 2:
            raise PatchSpecError(f"infini: segment_length={self.segment_length} must be at least 2 tokens, e.g. "
                                 f"{self.example}.")
        if not -GATE_INIT_LIMIT <= self.gate_init <= GATE_INIT_LIMIT:  # nan is refused by the value reader
            raise PatchSpecError(f"infini: gate_init={self.gate_init:g} is outside [-{GATE_INIT_LIMIT:g}, "
                                 f"{GATE_INIT_LIMIT:g}]: the gate sigmoid(gate_init) is 0 or 1 there, to within "
                                 "1e-13, and never trains; use a value such as gate_init=-8 (the default, 3.4e-4).")

    def plan(self, model: ModelView) -> TensorPlan:
        config = model.config
        if config.get("model_type") not in ("llama", "mistral"):
            raise PatchError(f"infini: Infini-attention is shipped for Llama and Mistral models, not "
                             f"{config.get('model_type')}.")
        if "auto_map" in config:
            raise PatchError(f"infini: this model already loads custom code ({config['auto_map']}, from the source or "
                             "an earlier patch); Infini-attention would replace it. Apply one of them "
                             "(attention:pattern=dense removes an attention pattern).")
        if config.get("sliding_window"):
            raise PatchError("infini: this model has a sliding window; Infini-attention's segments replace it. "
                             "Apply attention:pattern=dense first.")
        heads = config["num_attention_heads"]
        dtype = model.tensors[model.architecture.embed].dtype  # the gates are stored like the other weights
        tensors = {name: TensorTask(meta, (name,)) for name, meta in model.tensors.items()}
        for layer in sorted({split_layer_name(n)[0] for n in model.tensors if split_layer_name(n)}):  # type: ignore[index]
            tensors[layer_name(layer, GATE)] = TensorTask(TensorMeta(dtype, (heads,)), (), self._gate(heads, dtype))
        model_class = "RetrofitInfiniMistralForCausalLM" if config["model_type"] == "mistral" else \
            "RetrofitInfiniLlamaForCausalLM"
        settings = {"segment_length": self.segment_length, "update": self.update, "gate_init": self.gate_init,
                    "memory": self.memory}
        plan = TensorPlan(shipped.config_for(config, SHIPPED_MODULE, model_class, SETTINGS_KEY, settings), tensors)
        plan.files = shipped.files(SHIPPED_MODULE)
        plan.installs = [_install]
        return plan

    def _gate(self, heads: int, dtype: torch.dtype):  # noqa: ANN202
        value = self.gate_init
        return lambda: torch.full((heads,), value, dtype=dtype)



def _install(model: PreTrainedModel) -> PreTrainedModel:
    """For `apply_to_model`: the rebuilt model gets the Infini classes (its gates come from config's gate_init)."""
    return shipped.install(SHIPPED_MODULE, model)
