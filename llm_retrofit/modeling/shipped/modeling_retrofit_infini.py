"""Infini-attention (Munkhdalai et al., arXiv 2404.07143) for Llama and Mistral checkpoints.

This file travels inside patched checkpoints, next to config.json, which names it in `auto_map`, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs Infini-attention on a machine that has never
seen llm-retrofit; that is why it imports only the standard library, torch and transformers. config.json keeps
`model_type` llama (or mistral) and gains

    "retrofit_infini": {"segment_length": N, "update": "linear" | "delta"}   (optionally "gate_init": float, and
                                                                              "memory": false for the ablation)

and one weight per layer, `model.layers.{i}.self_attn.memory_gate` of shape (num_attention_heads,), in the model's
dtype. A checkpoint without it still loads, silently, with the gates at `gate_init` (DEFAULT_GATE_INIT if unset).

The input runs in segments of N tokens. Each layer and KV head keeps a compressive memory M (d_key x d_value) and a
normaliser z (d_key), both ALWAYS float32 whatever the model dtype (a bf16 sum of thousands of outer products
overflows or stops growing). A query retrieves A_mem = s(Q) M / (s(Q) z), s = ELU + 1; when a segment is complete its
keys and values are folded in (`memory_update`): M += s(K)^T V ("linear") or M += s(K)^T (V - s(K) M / (s(K) z))
("delta"), and z += sum_t s(K_t). Memory uses Q and K BEFORE RoPE, since a memory entry has no position. Local
attention is ordinary causal softmax attention inside the current segment, with RoPE at the TRUE ABSOLUTE positions:
RoPE scores depend only on distances, which stay below N inside a segment, so this equals restarting positions at
every segment while keeping `generate`'s position bookkeeping (and Mistral's sliding window, applied inside the
segment) unchanged. Each query head h mixes A = g A_mem + (1 - g) A_local with g = sigmoid(memory_gate[h]); it reads
the memory of KV head h // (heads / kv_heads), the grouping of transformers' repeat_kv. Empty memory contributes
nothing: where s(Q) z is zero (the whole first segment) the output is exactly A_local, so on <= N tokens the model is
the stock model at any gate value.

Segments are handled inside each attention layer, which is equivalent to running the whole stack segment by segment
(layer l's memory only ever holds layer l's keys of earlier segments) and lets one forward over L > N tokens compute a
loss with gradients through the whole recurrence (nothing is detached). With gradient checkpointing on, a training
forward with labels runs segment by segment instead, each segment's whole forward (stack, lm_head, loss)
checkpointed and only the float32 memories kept between segments, so training memory is one segment's worth however
long the row (`_segment_checkpointed_loss`); other forwards under checkpointing use transformers' per-layer
checkpointing, which works because without a cache a layer's forward is a pure function of its input. `generate` and any forward with `use_cache` get an `InfiniCache`, whose layers hold the
current segment's keys and values only (at most N - 1 between calls) plus M and z, so memory stays flat on unbounded
input; `get_seq_length` counts every token seen, so positions stay true. Padded batches are refused (positions are
those of one unpadded stream).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaForCausalLM, LlamaModel,
                                                      apply_rotary_pos_emb, eager_attention_forward)
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralForCausalLM, MistralModel

CONFIG_KEY = "retrofit_infini"
FEATURE = "Infini-attention"  # what messages call it
DEFAULT_GATE_INIT = -8.0  # sigmoid(-8) ~ 3e-4: a freshly patched model is the stock model plus a faint memory term
UPDATE_RULES = ("linear", "delta")


# --- the config ------------------------------------------------------------------------------------------------

def read_segmenting(settings: Mapping[str, Any] | None) -> tuple[int, str]:
    """(segment_length, update rule) of config.json's `retrofit_infini` mapping; a clear error names a bad key."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"the config has no `{CONFIG_KEY}` mapping, so there is no Infini-attention to run")
    length, rule = settings.get("segment_length"), settings.get("update", "linear")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"{CONFIG_KEY}.segment_length must be an integer >= 1, got {length!r}")
    if rule not in UPDATE_RULES:
        raise ValueError(f"{CONFIG_KEY}.update must be one of {UPDATE_RULES}, got {rule!r}")
    return length, rule


def segmenting_of(config: Any) -> tuple[int, str]:
    """(segment_length, update rule) of a loaded config (`read_segmenting`)."""
    return read_segmenting(getattr(config, CONFIG_KEY, None))


def memory_on(config: Any) -> bool:
    """False when `retrofit_infini.memory` is false: the ablation that keeps the segments and drops the memory, so
    every segment attends only within itself (what the memory is measured against)."""
    settings = getattr(config, CONFIG_KEY, None) or {}
    value = settings.get("memory", True)
    if not isinstance(value, bool):
        raise ValueError(f"{CONFIG_KEY}.memory must be true or false, got {value!r}")
    return value


def gate_init_of(config: Any) -> float:
    """The value new (or missing) gates start at: `retrofit_infini.gate_init`, else DEFAULT_GATE_INIT."""
    settings = getattr(config, CONFIG_KEY, None) or {}
    return float(settings.get("gate_init", DEFAULT_GATE_INIT))


# --- the memory math (pure functions) ------------------------------------------------------------------------------

def sigma(x: torch.Tensor) -> torch.Tensor:
    """The paper's non-negative feature map ELU + 1, in float32."""
    return F.elu(x.float()) + 1.0


def empty_memory(batch_shape: tuple[int, ...], d_key: int, d_value: int,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A memory that has seen nothing: M = 0 (..., d_key, d_value), z = 0 (..., d_key), float32."""
    return (torch.zeros(*batch_shape, d_key, d_value, dtype=torch.float32, device=device),
            torch.zeros(*batch_shape, d_key, dtype=torch.float32, device=device))


def memory_retrieve(query: torch.Tensor, memory: torch.Tensor,
                    norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s(q) M / (s(q) z) for query rows (..., n, d_key) against M (..., d_key, d_value), z (..., d_key).

    Returns (retrieved (..., n, d_value) float32, present (..., n, 1) bool). Where s(q) z is zero the memory is empty
    for that row: `present` is False and the retrieved value is 0 rather than 0/0, so callers can fall back to what
    they would have had without memory."""
    features = sigma(query)
    denominator = features @ norm.float().unsqueeze(-1)
    present = denominator > 0
    retrieved = (features @ memory.float()) / torch.where(present, denominator, torch.ones_like(denominator))
    return retrieved, present


def memory_update(key: torch.Tensor, value: torch.Tensor, memory: torch.Tensor, norm: torch.Tensor,
                  rule: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one segment's keys (..., n, d_key) and values (..., n, d_value) into (M, z); returns new float32 tensors.

    linear: M + s(K)^T V. delta: M + s(K)^T (V - s(K) M / (s(K) z)), which only writes what M does not already
    retrieve for those keys (with an empty memory the retrieved part is 0, so both rules agree). z + sum_t s(K_t)."""
    if rule not in UPDATE_RULES:
        raise ValueError(f"unknown memory update rule {rule!r}, expected one of {UPDATE_RULES}")
    features = sigma(key)
    target = value.float()
    if rule == "delta":
        target = target - memory_retrieve(key, memory, norm)[0]
    return memory.float() + features.transpose(-1, -2) @ target, norm.float() + features.sum(dim=-2)


def grouped_retrieve(query: torch.Tensor, memory: torch.Tensor,
                     norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """memory_retrieve for (batch, heads, n, d) queries over (batch, kv_heads, d, d_value) memories.

    Query head h reads KV head h // (heads / kv_heads), the order of repeat_kv (0, 0, 1, 1), not that of `repeat`
    (0, 1, 0, 1); the split is a view of the head axis, so nothing is copied per query head."""
    kv_heads = memory.shape[1]
    grouped = query.unflatten(1, (kv_heads, query.shape[1] // kv_heads))
    retrieved, present = memory_retrieve(grouped, memory.unsqueeze(2), norm.unsqueeze(2))
    return retrieved.flatten(1, 2), present.flatten(1, 2)


def mix(local: torch.Tensor, retrieved: torch.Tensor, present: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """sigmoid(gate) A_mem + (1 - sigmoid(gate)) A_local per head, on (batch, heads, n, d) tensors; exactly A_local
    where the memory is empty. Mixed in float32 and returned in `local`'s dtype."""
    weight = torch.sigmoid(gate.float())[None, :, None, None]
    mixed = (weight * retrieved + (1.0 - weight) * local.float()).to(local.dtype)
    return torch.where(present, mixed, local)


# --- the cache --------------------------------------------------------------------------------------------------

class InfiniCacheLayer(DynamicLayer):
    """One layer's state: the current segment's RoPE'd keys and values (for local attention) and pre-RoPE keys (to
    fold into memory), plus the float32 memory M (batch, kv_heads, d, d) and normaliser z (batch, kv_heads, d).

    `get_seq_length` counts every token seen (the model's positions come from it); the held segment never reaches
    N tokens between calls, because a completed segment is folded and cleared at once."""

    is_croppable = False

    def __init__(self, segment_length: int) -> None:
        super().__init__()
        self.segment_length = segment_length
        self.raw_keys: torch.Tensor | None = None
        self.memory: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        self.cumulative_length = 0

    def held(self) -> int:
        """Tokens of the current, incomplete segment held for local attention."""
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def extend(self, keys: torch.Tensor, values: torch.Tensor,
               raw_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a chunk (no longer than the segment's remaining room); returns all local keys and values."""
        if self.held() == 0:
            self.keys, self.values, self.raw_keys = keys, values, raw_keys
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)
            self.raw_keys = torch.cat([self.raw_keys, raw_keys], dim=-2)
        self.is_initialized = True
        self.cumulative_length += keys.shape[-2]
        return self.keys, self.values

    def fold_if_complete(self, rule: str | None) -> None:
        """When the held segment has N tokens: fold its pre-RoPE keys and values into memory (by `rule`; None when the
        memory is off: the segment is just dropped), clear local state."""
        if self.held() < self.segment_length:
            return
        if rule is None:
            self.keys = self.values = self.raw_keys = None
            return
        if self.memory is None:
            batch, kv_heads, _, d_key = self.raw_keys.shape
            self.memory, self.norm = empty_memory((batch, kv_heads), d_key, self.values.shape[-1],
                                                  self.raw_keys.device)
        self.memory, self.norm = memory_update(self.raw_keys, self.values, self.memory, self.norm, rule)
        self.keys = self.values = self.raw_keys = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("InfiniCacheLayer is filled by the Infini attention itself (extend/fold), not by update()")

    def tensors(self) -> list[torch.Tensor]:
        """Everything the layer holds, for measuring its size."""
        return [t for t in (self.keys, self.values, self.raw_keys, self.memory, self.norm) if t is not None]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held() + query_length, 0

    def get_max_length(self) -> int:
        return self.segment_length

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("an InfiniCache cannot be cropped: folded segments cannot be taken out of the memory")

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("keys", "values", "raw_keys", "memory", "norm"):
            tensor = getattr(self, name)
            if tensor is not None and tensor.numel():
                setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.keys = self.values = self.raw_keys = self.memory = self.norm = None
        self.cumulative_length = 0


class InfiniCache(Cache):
    """The cache of an Infini-attention model, one `InfiniCacheLayer` per decoder layer."""

    def __init__(self, config: Any) -> None:
        segment_length, _ = segmenting_of(config)
        super().__init__(layers=[InfiniCacheLayer(segment_length) for _ in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (local segment plus memory, all layers)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())


# --- local attention ---------------------------------------------------------------------------------------------

def local_mask(q_len: int, kv_len: int, window: int | None, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor | None:
    """Additive (1, 1, q_len, kv_len) mask for the last q_len of kv_len in-segment tokens: causal, and inside
    Mistral's sliding `window`; None for a plain square causal block, which sdpa runs with is_causal."""
    if q_len == kv_len and (window is None or window >= kv_len):
        return None
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= query_pos - key_pos < window
    return torch.zeros(q_len, kv_len, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)[None,
                                                                                                                None]


def local_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    dropout: float) -> torch.Tensor:
    """Causal softmax attention of (B, H, n, d) rotated queries over the segment's (B, KV, T, d) keys; (B, H, n, d).

    eager runs as eager, everything else through sdpa (flash kernels would need their own masking)."""
    window = getattr(module.config, "sliding_window", None)
    mask = local_mask(query.shape[2], key.shape[2], window, query.dtype, query.device)
    attend = eager_attention_forward if module.config._attn_implementation == "eager" else sdpa_attention_forward
    out, _ = attend(module, query, key, value, mask, dropout=dropout, scaling=module.scaling)
    return out.transpose(1, 2)


# --- the modules --------------------------------------------------------------------------------------------------

class _InfiniAttention:
    """Attention forward of Infini-attention; mixed in before LlamaAttention/MistralAttention, whose projections it
    uses. `memory_gate` (heads,) is its only new parameter."""

    memory_gate: nn.Parameter

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: Any = None, cache: Cache | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        _, rule = segmenting_of(self.config)
        rule = rule if memory_on(self.config) else None
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        rotated_query, rotated_key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None and not isinstance(cache, InfiniCache):
            raise ValueError(f"Infini-attention needs its own InfiniCache, got a {type(cache).__name__}")
        state = cache.layers[self.layer_idx] if cache is not None else InfiniCacheLayer(segmenting_of(self.config)[0])
        dropout = self.attention_dropout if self.training else 0.0
        outputs, start, length = [], 0, query.shape[2]
        while start < length:  # one chunk per (part of a) segment: never across a segment border
            stop = min(length, start + state.segment_length - state.held())
            piece = slice(start, stop)
            local_key, local_value = state.extend(rotated_key[:, :, piece], value[:, :, piece], key[:, :, piece])
            out = local_attention(self, rotated_query[:, :, piece], local_key, local_value, dropout)
            if state.memory is not None:
                retrieved, present = grouped_retrieve(query[:, :, piece], state.memory, state.norm)
                out = mix(out, retrieved, present, self.memory_gate)
            outputs.append(out)
            state.fold_if_complete(rule)
            start = stop
        out = torch.cat(outputs, dim=2).transpose(1, 2)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None


def _check_unpadded(attention_mask: torch.Tensor | None) -> None:
    """Positions are those of one unpadded stream (0, 1, 2, ...); padding would shift them, so it is refused."""
    if attention_mask is None:
        return
    if attention_mask.dim() != 2 or not bool(attention_mask.all()):
        raise ValueError(f"{FEATURE} does not support padded batches or custom 4-D masks: pass sequences of equal "
                         "length, without padding (a 2-D attention mask of ones, or none)")


_MASK_PLACEHOLDER = torch.empty(1, 1, 0, 0, device="meta")  # never read: the attention builds its own masks


def _init_gate(model: Any, module: nn.Module) -> None:
    """Start a gate the checkpoint lacks at gate_init. from_pretrained initialises the decoder stack (a
    PreTrainedModel of its own) through the stack's `_init_weights`, so both the stack and the causal LM call this."""
    if isinstance(module, _InfiniAttention):
        hf_init.constant_(module.memory_gate, gate_init_of(model.config))


class _InfiniModel:
    """Decoder stack: refuses padding and gives any cached forward an InfiniCache (the stock default, a
    DynamicCache, would keep every token)."""

    def _init_weights(self, module: nn.Module) -> None:
        _init_gate(self, module)
        super()._init_weights(module)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kwargs: Any) -> Any:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        _check_unpadded(attention_mask)
        caching = self.config.use_cache if use_cache is None else use_cache
        if cache is None and caching:
            cache = InfiniCache(self.config)
        elif cache is not None and not isinstance(cache, InfiniCache):
            raise ValueError(f"Infini-attention needs its own InfiniCache, got a {type(cache).__name__}")
        # transformers' causal mask would be built for nothing: a 4-D placeholder counts as prepared and is returned
        return super().forward(input_ids=input_ids, attention_mask=_MASK_PLACEHOLDER, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)


class _InfiniCausalLM:
    """Causal LM with gates in every attention layer, a `generate` that builds its InfiniCache by itself, and a
    training forward checkpointed per segment."""

    # Serving engines that run transformers classes with their own attention (vLLM's and SGLang's Transformers
    # backends) take a class only when it says so (`is_backend_compatible()`); theirs would not run this attention.
    _supports_attention_backend = False

    _keys_to_ignore_on_load_missing = [r"self_attn\.memory_gate"]  # a gate-less checkpoint starts at gate_init

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _convert(self, gate_init_of(config))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        named = {"input_ids": args[0], **kwargs} if len(args) == 1 else kwargs
        if len(args) <= 1 and self._checkpoints_segments(named):
            return self._segment_checkpointed_loss(named["input_ids"], named["labels"],
                                                   named.get("num_items_in_batch"))
        return super().forward(*args, **kwargs)

    def _checkpoints_segments(self, kwargs: dict) -> bool:
        """A training forward with gradient checkpointing, labels and more than one segment of plain input ids: it
        runs segment by segment (`_segment_checkpointed_loss`). Anything else takes the ordinary path."""
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        checkpointing = any(getattr(layer, "gradient_checkpointing", False) for layer in self.model.layers)
        return (self.training and checkpointing and torch.is_grad_enabled()
                and kwargs.get("labels") is not None and isinstance(ids, torch.Tensor)
                and ids.shape[1] > segmenting_of(self.config)[0] and not kwargs.get("use_cache")
                and (mask is None or (mask.dim() == 2 and bool(mask.all())))
                and set(kwargs) <= {"input_ids", "labels", "attention_mask", "use_cache", "num_items_in_batch",
                                    "return_dict"})

    def _segment_checkpointed_loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
                                   num_items_in_batch: Any = None) -> Any:
        """The loss of long rows computed one segment at a time, each segment's whole forward (decoder stack,
        lm_head, cross-entropy) under activation checkpointing. Between segments only the float32 memories and
        normalisers are kept, so training memory is one segment's worth however long the row, and the gradient
        still flows back through every memory into the earlier segments' keys, values and gates. Equal to the
        ordinary forward's loss: the causal-LM shift, -100 ignored, the mean over scored tokens (or a sum over
        `num_items_in_batch`, as transformers' loss takes it under gradient accumulation)."""
        from torch.utils.checkpoint import checkpoint
        from transformers.modeling_outputs import CausalLMOutputWithPast

        length = segmenting_of(self.config)[0]
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
        head_dim = self.model.layers[0].self_attn.head_dim
        states = list(empty_memory((input_ids.shape[0], self.config.num_key_value_heads), head_dim, head_dim,
                                   input_ids.device)) * self.config.num_hidden_layers
        total = None
        for start in range(0, input_ids.shape[1], length):
            piece = slice(start, start + length)
            nll, *states = checkpoint(self._segment_nll, input_ids[:, piece], targets[:, piece], start, *states,
                                      use_reentrant=False)
            total = nll if total is None else total + nll
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        if isinstance(count, torch.Tensor):
            count = count.to(total.device)
        return CausalLMOutputWithPast(loss=total / count)

    def _segment_nll(self, ids: torch.Tensor, targets: torch.Tensor, start: int,
                     *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One segment's summed NLL and the memories after it, from the memories before it: a pure function of its
        inputs, so that the checkpoint can replay it in the backward pass."""
        cache = InfiniCache(self.config)
        for layer, memory, norm in zip(cache.layers, states[0::2], states[1::2]):
            # zero memories are empty ones: they retrieve nothing and fold exactly as a fresh memory does
            layer.memory, layer.norm, layer.cumulative_length = memory, norm, start
        stack = [m for m in self.model.modules() if hasattr(m, "gradient_checkpointing")]
        flags = [m.gradient_checkpointing for m in stack]
        try:  # the segment is checkpointed as a whole; per-layer checkpointing would drop the cache it needs
            for module in stack:
                module.gradient_checkpointing = False
            hidden = self.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
        finally:
            for module, flag in zip(stack, flags):
                module.gradient_checkpointing = flag
        logits = self.lm_head(hidden).float()
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return (nll, *(t for layer in cache.layers for t in (layer.memory, layer.norm)))

    def _init_weights(self, module: nn.Module) -> None:
        _init_gate(self, module)
        super()._init_weights(module)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any,
                                      **kwargs: Any) -> Any:
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(f"{FEATURE} brings its own cache; cache_implementation="
                                 f"{generation_config.cache_implementation!r} is not supported")
            model_kwargs["cache"] = self._new_cache()
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def _new_cache(self) -> Cache:
        return InfiniCache(self.config)


class RetrofitInfiniLlamaAttention(_InfiniAttention, LlamaAttention):
    """LlamaAttention with Infini-attention memory."""


class RetrofitInfiniMistralAttention(_InfiniAttention, MistralAttention):
    """MistralAttention with Infini-attention memory."""


class RetrofitInfiniLlamaModel(_InfiniModel, LlamaModel):
    """LlamaModel with an InfiniCache."""


class RetrofitInfiniMistralModel(_InfiniModel, MistralModel):
    """MistralModel with an InfiniCache."""


class RetrofitInfiniLlamaForCausalLM(_InfiniCausalLM, LlamaForCausalLM):
    """LlamaForCausalLM running Infini-attention per `config.retrofit_infini` (named by auto_map)."""


class RetrofitInfiniMistralForCausalLM(_InfiniCausalLM, MistralForCausalLM):
    """MistralForCausalLM running Infini-attention per `config.retrofit_infini` (named by auto_map)."""


# stock causal LM -> (retrofit causal LM, retrofit decoder stack, retrofit attention)
_FAMILIES: dict[type, tuple[type, type, type]] = {
    LlamaForCausalLM: (RetrofitInfiniLlamaForCausalLM, RetrofitInfiniLlamaModel, RetrofitInfiniLlamaAttention),
    MistralForCausalLM: (RetrofitInfiniMistralForCausalLM, RetrofitInfiniMistralModel, RetrofitInfiniMistralAttention),
}


def _family(model: Any) -> tuple[type, type, type]:
    """The classes to give `model`: only the stock class itself or ours, never a subclass of the stock class (its
    own overrides, say another patch's attention, would be silently dropped by re-classing)."""
    for stock, classes in _FAMILIES.items():
        if type(model) in (stock, classes[0]):
            return classes
    raise TypeError(f"{FEATURE} is for LlamaForCausalLM and MistralForCausalLM only, not {type(model).__name__}")


def _convert(model: nn.Module, gate_init: float) -> None:
    """Re-class the decoder stack and every attention module, giving each attention a gate per query head (on its
    projections' device and dtype) unless it already has one; other weights stay exactly as they are."""
    _, stack, attention = _family(model)
    model.model.__class__ = stack
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.__class__ = attention
        if "memory_gate" not in attn._parameters:
            weight = attn.q_proj.weight
            attn.memory_gate = nn.Parameter(torch.full((model.config.num_attention_heads,), gate_init,
                                                       dtype=weight.dtype, device=weight.device))


def install(model: nn.Module) -> nn.Module:
    """Convert a loaded stock LlamaForCausalLM/MistralForCausalLM, in place, to Infini-attention per
    `model.config.retrofit_infini`, with gates at its `gate_init` (DEFAULT_GATE_INIT if unset); returns the model."""
    segmenting_of(model.config)  # missing or malformed settings fail here, not in the first forward
    causal_lm, _, _ = _family(model)
    model.__class__ = causal_lm
    _convert(model, gate_init_of(model.config))
    return model


__all__ = [
    "CONFIG_KEY", "DEFAULT_GATE_INIT", "InfiniCache", "InfiniCacheLayer", "RetrofitInfiniLlamaForCausalLM",
    "RetrofitInfiniMistralForCausalLM", "empty_memory", "grouped_retrieve", "install", "local_attention",
    "memory_on", "memory_retrieve", "memory_update", "mix", "read_segmenting", "sigma",
]
