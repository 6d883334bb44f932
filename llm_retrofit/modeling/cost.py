"""What a forward or training pass of a model costs on this machine, from a probe of about a second.

A recipe prints the time it expects before it starts (`recipes` adds up the passes of its steps); this module prices
one pass. A pass over L tokens costs a part linear in L (the weights' matrix products, norms and activations: the
same work for every token) and a part quadratic in L (causal attention: every token against all before it). Both are
measured here, on one decoder layer of the model's own shape with random weights, in the arithmetic the run will use
(float32, or bfloat16 autocast where the hardware has bf16 units, as `precision.inference_autocast` decides):

- linear: the layer's forward over `LINEAR_PROBE` tokens, minus its attention at that length;
- quadratic: causal `scaled_dot_product_attention` at `ATTENTION_PROBE` tokens with the model's heads;
- the LM head: counted at the linear part's rate per multiply-add (2 x hidden x vocab FLOPs a token).

Checked against whole SmolLM2-135M passes on an AVX2-only AMD EPYC (float32, 1 thread, CPU seconds so that the
shared machine did not skew it): the probe gave 16, 39 and 111 s for forwards of 2048, 4096 and 8192 tokens, which
took 18.3, 41.1 and 121.8 s. A LoRA step at 16384 tokens (gradient checkpointing, LongLoRA's groups) took about
700 s, and `train_step` with the costs fitted to those three forwards gives 716 s. The figure is the machine's speed while the probe runs: a machine busy with other
work runs slower, and its probe says so.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

LINEAR_PROBE = 512
"""Tokens of the probe layer's forward: enough for the matrix products to run at full speed, short enough that
attention is a few percent of it (and is subtracted)."""
_NOT_SHAPE = {"architectures", "auto_map", "quantization_config", "layer_types", "use_cache"}
"""config.json keys the probe layer leaves out: which classes and code load the checkpoint, and per-layer lists."""
ATTENTION_PROBE = 2048
"""Tokens of the probe attention: long enough that the quadratic term dominates the kernel's fixed costs."""

TRAIN_STEP_FORWARDS = 3.0
"""A training step costs about three forwards: the forward, and a backward that computes gradients of the
activations and of the trained weights (each about a forward's work; LoRA skips most weight gradients but its
frozen weights still pass activation gradients back). Gradient checkpointing adds a fourth: the recomputed forward."""


@dataclass(frozen=True)
class PassCost:
    """Seconds of one pass of a model on this machine, as `linear x L + attention x L^2` for L tokens."""

    linear: float
    """Seconds per token of the whole model's token-wise work (every layer, and the LM head)."""
    attention: float
    """Seconds per token^2 of the whole model's causal attention (every layer)."""
    arithmetic: str
    """What the probe ran in: `float32` or `bfloat16 autocast` (and the device)."""

    def forward(self, length: int) -> float:
        return self.linear * length + self.attention * length * length

    def train_step(self, length: int, *, checkpointing: bool, attention_group: int | None = None) -> float:
        """One optimizer micro-step over `length` tokens; with `attention_group`, attention runs within groups of
        that many tokens (LongLoRA's shifted sparse attention), so its quadratic part is per group."""
        group = min(attention_group or length, length)
        one_forward = self.linear * length + self.attention * group * length
        return one_forward * (TRAIN_STEP_FORWARDS + (1 if checkpointing else 0))


@dataclass(frozen=True)
class Pass:
    """One pass a step will run: `tokens` long, through a model of `config`'s shape, forward or training.

    `cost` prices it in seconds, `memory` in bytes."""

    tokens: int
    config: Mapping[str, Any] = field(compare=False, hash=False)
    training: bool = False
    checkpointing: bool = False
    attention_group: int | None = None
    rows: int = 1
    """Sequences run together in one batch (a training micro-batch): the time is priced per sequence, the memory
    per batch."""
    adapter_params: int | None = None
    """Training an adapter of this many parameters (LoRA) on a frozen base; None: every weight trains."""
    streamed: int = 0
    """A calibration: this many tokens, in sequences of `tokens`, carried through the model one layer at a time."""

    def seconds(self, cost: PassCost) -> float:
        if self.streamed:
            return cost.forward(self.tokens) * self.streamed / self.tokens
        if self.training:
            return cost.train_step(self.tokens, checkpointing=self.checkpointing, attention_group=self.attention_group)
        return cost.forward(self.tokens)


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class Shape:
    """A model's parameter counts and widths, from its config.json (text part)."""

    hidden: int
    intermediate: int
    layers: int
    attention_width: int
    """(query heads + 2 x KV heads) x head_dim: the features q_proj, k_proj and v_proj make per token."""
    vocab: int
    layer_params: int
    """One decoder layer's parameters (every expert of an MoE layer: all are held)."""
    other_params: int
    """The embedding, an untied LM head and the final norm."""
    dtype_bytes: int
    heads: int
    head_dim: int
    active_experts: int
    """Experts a token runs through (1 for a dense model): what a pass computes, where memory holds them all."""

    @property
    def params(self) -> int:
        return self.layer_params * self.layers + self.other_params

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> Shape:
        text = dict(config.get("text_config") or config)
        hidden, layers = int(text["hidden_size"]), int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or hidden // heads)
        intermediate = int(text.get("intermediate_size") or 4 * hidden)
        experts = int(text.get("num_local_experts") or 1)
        vocab = int(text["vocab_size"])
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
        layer = attention + 3 * hidden * intermediate * experts + (hidden * experts if experts > 1 else 0) + 2 * hidden
        other = vocab * hidden * (1 if text.get("tie_word_embeddings") else 2) + hidden
        dtype = str(text.get("dtype") or text.get("torch_dtype") or "float32").removeprefix("torch.")
        return cls(hidden, intermediate, layers, (heads + 2 * kv_heads) * head_dim, vocab, layer, other,
                   _DTYPE_BYTES.get(dtype, 4), heads, head_dim, int(text.get("num_experts_per_tok") or 1))


class Pricer:
    """Prices passes on this machine, in the arithmetic its runs use there (bf16 autocast where the hardware has
    bf16 units, float32 elsewhere), probing each model shape once (`measure`)."""

    def __init__(self) -> None:
        from .precision import default_device, native_bf16

        self.device = default_device()
        self.autocast = torch.bfloat16 if native_bf16(torch.device(self.device)) else None
        self.costs: dict[tuple[int, ...], PassCost] = {}

    def seconds(self, passes: Sequence[Pass]) -> float:
        total = 0.0
        for one in passes:
            key = tuple(_shape(one.config).values())
            if key not in self.costs:
                self.costs[key] = measure(one.config, self.autocast, self.device)
            total += one.seconds(self.costs[key])
        return total

    @property
    def arithmetic(self) -> str:
        return f"{'bfloat16 autocast' if self.autocast else 'float32'} on {self.device}"


def measure(config: Mapping[str, Any], autocast: torch.dtype | None = None, device: str = "cpu") -> PassCost:
    """The `PassCost` of a model with this config.json on `device`, measured now (about a second for a small
    model, a few seconds for a 7B one)."""
    from transformers import AutoConfig, AutoModel

    shape = _shape(config)
    kept = {key: value for key, value in config.items() if key not in _NOT_SHAPE}
    probe_config = AutoConfig.for_model(**{**kept, "num_hidden_layers": 1, "vocab_size": 256})
    with torch.device(device):
        layer_model = AutoModel.from_config(probe_config, attn_implementation="sdpa", dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (1, LINEAR_PROBE), device=device)
    query = torch.randn(1, shape["heads"], ATTENTION_PROBE, shape["head_dim"], device=device)
    context = torch.autocast(device_type=torch.device(device).type, dtype=autocast) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), context:
        layer = _seconds(lambda: layer_model(input_ids=ids), device)
        attention = _seconds(lambda: F.scaled_dot_product_attention(query, query, query, is_causal=True), device)
    per_square = attention / ATTENTION_PROBE**2
    per_token = max(layer - per_square * LINEAR_PROBE**2, layer / 2) / LINEAR_PROBE
    head_share = shape["hidden"] * shape["vocab"] / max(shape["layer_params"], 1)
    what = f"{'bfloat16 autocast' if autocast else 'float32'} on {device}"
    return PassCost(per_token * (shape["layers"] + head_share), per_square * shape["layers"], what)


def _shape(config: Mapping[str, Any]) -> dict[str, int]:
    """What the probe needs of a model's shape (`Shape`, which reads config.json for both pricings)."""
    shape = Shape.of(config)
    attention = shape.hidden * shape.attention_width + shape.heads * shape.head_dim * shape.hidden
    computed = attention + 3 * shape.hidden * shape.intermediate * shape.active_experts
    return {"hidden": shape.hidden, "layers": shape.layers, "heads": shape.heads, "head_dim": shape.head_dim,
            "vocab": shape.vocab, "layer_params": computed}


def _seconds(run: Callable[[], Any], device: str, repeats: int = 3) -> float:
    """The fastest of `repeats` runs after one warm-up: the machine's speed, not its hiccups. On a GPU each run is
    waited for (its kernels run after the call returns)."""
    def timed() -> None:
        run()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    timed()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        timed()
        best = min(best, time.perf_counter() - started)
    return best
