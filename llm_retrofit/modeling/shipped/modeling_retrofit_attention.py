"""Runtime attention patterns for Llama and Mistral checkpoints: StreamingLLM attention sinks and causal block sparsity.

This file travels inside patched checkpoints, next to config.json, which names it in `auto_map`, so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs the pattern on a machine that has never seen
llm-retrofit. That is why it imports only the standard library, torch and transformers. config.json keeps
`model_type` llama (or mistral), so the weights, tokenizer and every other setting stay the stock model's, and gains
`retrofit_attention`, one of:

    {"pattern": "sinks", "sinks": S, "window": W}
    {"pattern": "block_sparse", "block_size": B, "window_blocks": w, "global_blocks": g, "random_blocks": r, "seed": s}

Sinks (StreamingLLM, arXiv 2309.17453): query i sees key j iff j <= i and (j < S or j > i - W). StreamingLLM keeps a
rolling cache of S + W slots and gives RoPE the slot positions, so a window key is at its true distance i - j while a
sink key k is at min(i, S + W - 1) - k. RoPE scores depend only on that distance, so keys stay rotated at their true
positions and each query is rotated twice: at i for the window keys and at min(i, S + W - 1) for the sink keys; one
softmax runs over both sets of scores. With flex_attention that softmax is one fused call: the window scores are
flex's own, and a score_mod swaps in the few sink scores (n x S, computed beforehand with the sink-side query); the
BlockMask skips the key tiles no query sees. Without flex (sdpa, eager, CPU training), rows go a chunk at a time
against the keys they can see. `generate` (and any forward with `use_cache`) gets a `SinkCache` that keeps exactly
the S sink tokens and the last W tokens per layer, so memory stays flat on unbounded streams.

Block sparse (BigBird/Longformer-like, causal): query block qb sees key block kb iff kb <= qb and (qb - kb < w or
kb < g or kb is one of the r random earlier blocks drawn for qb from (seed, qb) alone); inside a visible block the
usual token-level causality holds. Positions are the true ones. `block_visible` is the one definition of the pattern;
`block_mask` compiles it into a flex_attention BlockMask (sparse compute) and `float_mask` into an additive mask for
sdpa and eager (a boolean 4-D mask handed to transformers' eager path would be added to the scores and mask nothing).
Decoding keeps a normal full cache and applies the same pattern to the new query rows.

Neither pattern supports padded batches (a 2-D attention mask with zeros): positions are taken as 0, 1, 2, ... of one
stream, as in StreamingLLM; such a mask raises instead of silently attending to padding. On Mistral the pattern
replaces the sliding window.
"""

from __future__ import annotations

import bisect
import functools
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaForCausalLM, LlamaModel,
                                                      eager_attention_forward, rotate_half)
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralForCausalLM, MistralModel

CONFIG_KEY = "retrofit_attention"
FEATURE = "a retrofit attention pattern"  # what messages call it
QUERY_CHUNK = 256  # sinks attention handles this many query rows at a time: memory O(chunk * (S + W + chunk))
FLEX_TILE = 128  # flex_attention's block size: what its BlockMask skips or computes


# --- the patterns -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sinks:
    """StreamingLLM attention sinks: `sinks` first tokens plus a sliding `window` of recent ones (itself included)."""

    sinks: int
    window: int

    @property
    def cache_size(self) -> int:
        return self.sinks + self.window


@dataclass(frozen=True)
class BlockSparse:
    """Causal block sparsity over blocks of `block_size` tokens (hashable: masks are memoised per pattern)."""

    block_size: int
    window_blocks: int
    global_blocks: int = 0
    random_blocks: int = 0
    seed: int = 0


Pattern = Sinks | BlockSparse


def _whole(spec: Mapping[str, Any], key: str, minimum: int, default: int | None = None) -> int:
    """spec[key] as an int >= minimum; a clear error names the key instead of failing deep inside a forward."""
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{CONFIG_KEY}.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_pattern(spec: Mapping[str, Any] | None) -> Pattern:
    """The pattern described by config.json's `retrofit_attention` mapping."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"the config has no `{CONFIG_KEY}` mapping, so there is no attention pattern to run")
    kind = spec.get("pattern")
    if kind == "sinks":
        return Sinks(sinks=_whole(spec, "sinks", 0), window=_whole(spec, "window", 1))
    if kind == "block_sparse":
        return BlockSparse(block_size=_whole(spec, "block_size", 1), window_blocks=_whole(spec, "window_blocks", 1),
                           global_blocks=_whole(spec, "global_blocks", 0, 0),
                           random_blocks=_whole(spec, "random_blocks", 0, 0), seed=_whole(spec, "seed", 0, 0))
    raise ValueError(f"{CONFIG_KEY}.pattern must be 'sinks' or 'block_sparse', got {kind!r}")


def pattern_of(config: Any) -> Pattern:
    return parse_pattern(getattr(config, CONFIG_KEY, None))


# --- flex_attention, shared by both patterns --------------------------------------------------------------------------

@functools.cache
def _compiled_flex() -> Callable:
    """flex_attention compiled once per process (uncompiled flex materialises the full score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_can_run(query: torch.Tensor) -> bool:
    """flex_attention has no backward on CPU: training there takes the (numerically equal) float-mask path."""
    return not (query.device.type == "cpu" and query.requires_grad and torch.is_grad_enabled())


def _block_mask(mask_mod: Callable, q_len: int, kv_len: int, device: torch.device | str) -> Any:
    """flex BlockMask of `mask_mod` (which must also take broadcasting index tensors), evaluated one row of query
    tiles at a time. torch's create_block_mask evaluates the whole q_len x kv_len grid at once: a 16k-token sinks
    prefill peaked at 3.94 GB that way, 1.78 GB this way."""
    from torch.nn.attention.flex_attention import BlockMask

    tile = FLEX_TILE
    q_tiles, kv_tiles = -(-q_len // tile), -(-kv_len // tile)
    kv_idx = torch.arange(kv_tiles * tile, device=device)[None, :]
    some, every = [], []
    for row in range(q_tiles):
        q_idx = torch.arange(row * tile, min(row * tile + tile, q_len), device=device)[:, None]
        # past the lengths counts as unseen, so edge tiles stay partial: flex then applies mask_mod inside them
        seen = (mask_mod(0, 0, q_idx, kv_idx) & (kv_idx < kv_len)).view(len(q_idx), kv_tiles, tile)
        row_full = q_idx.shape[0] == tile
        some.append(seen.any(-1).any(0))
        every.append(seen.all(-1).all(0) & row_full)
    full = torch.stack(every)
    partial = torch.stack(some) & ~full

    def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # flex wants, per query tile, the count of kv tiles and their indices first in the row
        indices = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return tiles.sum(-1).to(torch.int32)[None, None], indices[None, None]

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=tile, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


# --- sinks: the rule, positions and attention -------------------------------------------------------------------------

def sinks_visible(query_pos: torch.Tensor, key_pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Whether the query at `query_pos` sees the key at `key_pos` (broadcasting): j <= i and (j < S or j > i - W)."""
    return (key_pos <= query_pos) & ((key_pos < sinks) | (key_pos > query_pos - window))


def sink_query_positions(query_pos: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """Where a query is rotated against the sink keys: the last slot of StreamingLLM's S + W cache, once it is full."""
    return query_pos.clamp(max=sinks + window - 1)


def sink_cache_positions(seen: int, sinks: int, window: int) -> torch.Tensor:
    """True positions of the entries a `SinkCache` layer holds after `seen` tokens: the sinks, then the last W."""
    if seen <= sinks + window:
        return torch.arange(seen)
    return torch.cat([torch.arange(sinks), torch.arange(seen - window, seen)])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (batch, heads, n, head_dim) with transformers' (batch, n, head_dim) cos/sin."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _softmax_rows(scores: torch.Tensor, visible: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    probs = F.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1, dtype=torch.float32).to(scores.dtype)
    return F.dropout(probs, p=dropout, training=training) if dropout else probs


def sinks_attention(query: torch.Tensor, sink_query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    query_pos: torch.Tensor, key_pos: torch.Tensor, pattern: Sinks, scaling: float,
                    dropout: float = 0.0, training: bool = False, chunk: int | None = None) -> torch.Tensor:
    """Attention-sink attention; returns (batch, n, heads, head_dim) like transformers' attention functions.

    `query` (batch, heads, n, d) is rotated at `query_pos`, `sink_query` at `sink_query_positions(query_pos)`;
    `key`/`value` (batch, kv_heads, T, d) hold keys rotated at `key_pos` (ascending, CPU). Query heads are grouped
    as transformers' repeat_kv does: kv head h serves query heads h*g .. h*g+g-1. Rows go `chunk` at a time and only
    against the keys they can see, so a long prefill never builds an n x T score matrix.
    """
    chunk = chunk or QUERY_CHUNK
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.view(batch, kv_heads, groups, length, dim)
    qs = sink_query.view(batch, kv_heads, groups, length, dim)
    positions = key_pos.tolist()
    n_sinks = bisect.bisect_left(positions, pattern.sinks)  # sinks are exactly the keys at positions < S

    def rows_of_group(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        # a kv head's query heads stacked as rows: one matmul per kv head reads its keys once, where broadcasting
        # the keys over the group would copy them `groups` times
        return x[..., start:stop, :].reshape(batch, kv_heads, groups * (stop - start), dim)

    outputs = []
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        rows = query_pos[start:stop, None]
        lo = max(n_sinks, bisect.bisect_left(positions, int(rows[0]) - pattern.window + 1))
        hi = bisect.bisect_right(positions, int(rows[-1]))
        scores = torch.cat([rows_of_group(qs, start, stop) @ key[:, :, :n_sinks].transpose(-1, -2),
                            rows_of_group(q, start, stop) @ key[:, :, lo:hi].transpose(-1, -2)], dim=-1)
        visible = sinks_visible(rows, torch.cat([key_pos[:n_sinks], key_pos[lo:hi]])[None, :], pattern.sinks,
                                pattern.window).to(query.device)
        probs = _softmax_rows(scores.view(batch, kv_heads, groups, stop - start, -1) * scaling, visible, dropout,
                              training).flatten(2, 3)
        out = probs[..., :n_sinks] @ value[:, :, :n_sinks] + probs[..., n_sinks:] @ value[:, :, lo:hi]
        outputs.append(out.view(batch, kv_heads, groups, stop - start, dim))
    out = torch.cat(outputs, dim=3).reshape(batch, heads, length, dim)
    return out.transpose(1, 2)


def _sinks_key_positions(past: int, length: int, pattern: Sinks) -> torch.Tensor:
    """True positions of the keys a forward at `past` with `length` new tokens attends over, as `SinkCacheLayer`
    returns them: the cache as it stands once the first new token is in (its oldest window entry, outside every new
    row's window, dropped), then the other new tokens. Without a cache `past` is 0: the tokens' own positions."""
    return torch.cat([sink_cache_positions(past + 1, pattern.sinks, pattern.window),
                      torch.arange(past + 1, past + length)])


@functools.lru_cache(maxsize=4)
def _sinks_block_mask(pattern: Sinks, past: int, length: int, device: torch.device | str = "cpu") -> Any:
    """flex BlockMask of `sinks_visible` for `length` queries at `past`.. over the held and new keys: tiles of keys
    between the sinks and a query's window are skipped."""
    key_pos = _sinks_key_positions(past, length, pattern).to(device)
    last = len(key_pos) - 1

    def visible(batch: Any, head: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        # flex may probe padded indices past the lengths; clamping keeps the lookup in bounds (those are dropped)
        return sinks_visible(q_idx + past, key_pos[kv_idx.clamp(max=last)], pattern.sinks, pattern.window)

    return _block_mask(visible, length, last + 1, device)


def sinks_flex_attention(query: torch.Tensor, sink_query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         past: int, pattern: Sinks, scaling: float) -> torch.Tensor:
    """`sinks_attention` as one compiled flex_attention call (inference; (batch, n, heads, head_dim)).

    flex scores every visible key with `query`; for the sink keys (the first entries, positions < S) a score_mod
    returns instead the scores of `sink_query`, computed beforehand: n x S of them, next to nothing."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    n_sinks = min(pattern.sinks, past + length)  # the cache and the new tokens hold positions 0.. first
    if sink_query is query:  # no query is past the cache's last slot yet: flex's own scores are the sink scores
        n_sinks = 0
    sink_keys = key[:, :, None, :n_sinks, :]
    sink_scores = (sink_query.view(batch, kv_heads, heads // kv_heads, length, dim) @ sink_keys.transpose(-1, -2))
    sink_scores = (sink_scores * scaling).reshape(batch, heads, length, n_sinks)

    def with_sink_scores(score: torch.Tensor, b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> Any:
        sink = sink_scores[b, h, q_idx.clamp(max=length - 1), kv_idx.clamp(max=max(n_sinks - 1, 0))]
        return torch.where(kv_idx < n_sinks, sink, score)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch's compiler stack importing torch.jit
        out = _compiled_flex()(query, key, value, score_mod=with_sink_scores if n_sinks else None,
                               block_mask=_sinks_block_mask(pattern, past, length, query.device), scale=scaling,
                               enable_gqa=kv_heads != heads)
    return out.transpose(1, 2)


class SinkCacheLayer(DynamicLayer):
    """One layer's KV cache holding the S sink tokens and the last W tokens; older window entries are dropped.

    `update` returns the held entries the new rows can see plus the new ones (a long prefill attends over all of
    its own keys) and then keeps only S + W. `get_seq_length` counts every token seen, so generate and the model
    keep true positions, while `get_mask_sizes` reports what is actually held, so no mask grows with the stream.
    """

    is_croppable = False

    def __init__(self, sinks: int, window: int) -> None:
        super().__init__()
        self.sinks, self.window = sinks, window
        self.cumulative_length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys, values = self._attended(self.keys, key_states), self._attended(self.values, value_states)
        self.keys, self.values = self._bounded(keys), self._bounded(values)
        return keys, values

    def _attended(self, held: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if self.held() == self.sinks + self.window:
            # full: the oldest window entry is outside every new row's window. Dropping it here means a decoding
            # step attends over exactly what is kept, so the cache is copied once a step, not twice
            return torch.cat([held[..., :self.sinks, :], held[..., self.sinks + 1:, :], new], dim=-2)
        return torch.cat([held, new], dim=-2)

    def _bounded(self, states: torch.Tensor) -> torch.Tensor:
        if states.shape[-2] <= self.sinks + self.window:
            return states
        # cat copies, so the long prefill's tensor is not kept alive through a view
        return torch.cat([states[..., :self.sinks, :], states[..., -self.window:, :]], dim=-2)

    def held(self) -> int:
        """How many entries the layer holds now (at most S + W)."""
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held() + query_length, 0

    def get_max_length(self) -> int:
        return self.sinks + self.window

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a SinkCache cannot be cropped: the window entries it would have to restore were evicted")


class SinkCache(Cache):
    """The bounded cache of the sinks pattern, one `SinkCacheLayer` per decoder layer."""

    def __init__(self, pattern: Sinks, num_layers: int) -> None:
        super().__init__(layers=[SinkCacheLayer(pattern.sinks, pattern.window) for _ in range(num_layers)])


# --- block sparse: the one rule, compiled two ways --------------------------------------------------------------------

def random_blocks(query_block: int, pattern: BlockSparse) -> list[int]:
    """The random earlier blocks of `query_block`, drawn from (seed, query_block) only, so they do not change as a
    sequence grows. They come from the blocks the window and the global blocks do not already cover."""
    first, last = pattern.global_blocks, query_block - pattern.window_blocks
    candidates = last - first + 1
    if pattern.random_blocks == 0 or candidates <= 0:
        return []
    if candidates <= pattern.random_blocks:
        return list(range(first, last + 1))
    # random.Random seeded with a str is reproducible across platforms and runs (no hash randomisation)
    draw = random.Random(f"retrofit-block-sparse:{pattern.seed}:{query_block}")
    return sorted(first + i for i in draw.sample(range(candidates), pattern.random_blocks))


@functools.lru_cache(maxsize=16)
def _random_table(pattern: BlockSparse, num_blocks: int) -> torch.Tensor:
    """(num_blocks, r) random blocks per query block, -1 where a block has fewer than r candidates."""
    table = torch.full((num_blocks, pattern.random_blocks), -1, dtype=torch.long)
    for query_block in range(num_blocks):
        picked = random_blocks(query_block, pattern)
        table[query_block, :len(picked)] = torch.tensor(picked, dtype=torch.long)
    return table


def block_visible(query_blocks: torch.Tensor, key_blocks: torch.Tensor, pattern: BlockSparse) -> torch.Tensor:
    """The block rule (broadcasting over block-index tensors): kb <= qb and (qb - kb < w or kb < g or kb random)."""
    num_blocks = int(query_blocks.max()) + 1 if query_blocks.numel() else 0
    table = _random_table(pattern, num_blocks).to(query_blocks.device)
    rand = (table[query_blocks] == key_blocks.unsqueeze(-1)).any(-1)
    near = query_blocks - key_blocks < pattern.window_blocks
    return (key_blocks <= query_blocks) & (near | (key_blocks < pattern.global_blocks) | rand)


@functools.lru_cache(maxsize=16)
def _layout(pattern: BlockSparse, num_blocks: int) -> torch.Tensor:
    blocks = torch.arange(num_blocks)
    return block_visible(blocks[:, None], blocks[None, :], pattern)


def mask_mod(pattern: BlockSparse, q_offset: int, kv_len: int, device: torch.device | str | None = None) -> Callable:
    """flex_attention's mask_mod for queries starting at absolute position `q_offset` over `kv_len` keys: token
    causality inside the block layout. Also evaluated on index grids for `float_mask`, so both masks are one rule."""
    size = pattern.block_size
    num_blocks = -(-max(q_offset + 1, kv_len) // size) + 1
    layout = _layout(pattern, num_blocks).to(device)
    last = num_blocks - 1

    def visible(batch: Any, head: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q = q_idx + q_offset
        # flex may probe padded indices past the lengths; clamping keeps the lookup in bounds (those rows are dropped)
        return (kv_idx <= q) & layout[(q // size).clamp(max=last), (kv_idx // size).clamp(max=last)]

    return visible


@functools.lru_cache(maxsize=4)
def float_mask(pattern: BlockSparse, q_len: int, kv_len: int, q_offset: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """(q_len, kv_len) additive mask: 0 where visible, the dtype's minimum elsewhere (for sdpa and eager)."""
    q = torch.arange(q_len, device=device)[:, None]
    kv = torch.arange(kv_len, device=device)[None, :]
    visible = mask_mod(pattern, q_offset, kv_len, device)(0, 0, q, kv)
    return torch.zeros(q_len, kv_len, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)


@functools.lru_cache(maxsize=4)
def block_mask(pattern: BlockSparse, q_len: int, kv_len: int, q_offset: int = 0,
               device: torch.device | str = "cpu") -> Any:
    """flex_attention BlockMask of the pattern: key tiles with nothing visible are skipped, not computed."""
    return _block_mask(mask_mod(pattern, q_offset, kv_len, device), q_len, kv_len, device)


def block_sparse_attention(module: torch.nn.Module, pattern: BlockSparse, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, q_offset: int, dropout: float = 0.0) -> torch.Tensor:
    """The pattern on (batch, heads, n, d) queries at positions q_offset.. over all cached keys; (batch, n, heads, d).

    flex_attention when the model is set to it (rows > 1; a single decoding row is a cheap float-mask row and would
    otherwise recompile flex for every cache length), else sdpa or eager with the additive mask."""
    q_len, kv_len = query.shape[2], key.shape[2]
    implementation = module.config._attn_implementation
    if implementation == "flex_attention" and q_len > 1 and not dropout and _flex_can_run(query):
        with warnings.catch_warnings():
            # torch's compiler stack imports modules that raise DeprecationWarnings of torch's own (torch.jit)
            warnings.simplefilter("ignore", DeprecationWarning)
            mask = block_mask(pattern, q_len, kv_len, q_offset, query.device)
            out = _compiled_flex()(query, key, value, block_mask=mask, scale=module.scaling,
                                   enable_gqa=module.num_key_value_groups > 1)
        return out.transpose(1, 2)
    mask = float_mask(pattern, q_len, kv_len, q_offset, query.dtype, query.device)[None, None]
    attend = eager_attention_forward if implementation == "eager" else sdpa_attention_forward
    out, _ = attend(module, query, key, value, mask, dropout=dropout, scaling=module.scaling)
    return out


# --- the modules ------------------------------------------------------------------------------------------------------

def _check_unpadded(attention_mask: torch.Tensor | None) -> None:
    """Positions are those of one unpadded stream (0, 1, 2, ...); padding would shift them, so it is refused."""
    if attention_mask is None:
        return
    if attention_mask.dim() != 2 or not bool(attention_mask.all()):
        raise ValueError(f"{FEATURE} does not support padded batches or custom 4-D masks: pass sequences of equal "
                         "length, without padding (a 2-D attention mask of ones, or none)")


_MASK_PLACEHOLDER = torch.empty(1, 1, 0, 0, device="meta")  # never read: the attention below ignores its mask


class _PatternAttention:
    """Attention forward of both patterns; mixed in before LlamaAttention/MistralAttention, whose weights it uses."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: Any = None, cache: Cache | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        pattern = pattern_of(self.config)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # not rotated yet: sinks rotate twice
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        key = _rotate(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        dropout = self.attention_dropout if self.training else 0.0
        if isinstance(pattern, Sinks):
            out = self._sinks(pattern, query, cos, sin, key, value, past, kwargs, dropout)
        else:
            out = block_sparse_attention(self, pattern, _rotate(query, cos, sin), key, value, past, dropout)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None

    def _sinks(self, pattern: Sinks, query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, past: int, kwargs: dict[str, Any], dropout: float) -> torch.Tensor:
        length = query.shape[2]
        rotated = _rotate(query, cos, sin)
        sink_embeddings = kwargs.get("sink_position_embeddings")
        sink_query = rotated if sink_embeddings is None else _rotate(query, *sink_embeddings)
        # one decoding row is cheap either way, and flex would recompile for every cache length
        if (self.config._attn_implementation == "flex_attention" and length > 1 and not dropout
                and _flex_can_run(query)):
            return sinks_flex_attention(rotated, sink_query, key, value, past, pattern, self.scaling)
        query_pos = torch.arange(past, past + length)
        return sinks_attention(rotated, sink_query, key, value, query_pos, _sinks_key_positions(past, length, pattern),
                               pattern, self.scaling, dropout, self.training)


class _PatternModel:
    """Decoder stack: refuses padding, gives the sinks pattern its bounded cache and the sink-side query rotation
    (one rotary call per forward, shared by all layers), and a plain full cache to block sparsity (on Mistral the
    default cache would cut keys to the sliding window)."""

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, **kwargs: Any) -> Any:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        _check_unpadded(attention_mask)
        pattern = pattern_of(self.config)
        caching = self.config.use_cache if use_cache is None else use_cache
        if isinstance(pattern, Sinks):
            if cache is None and caching:
                cache = SinkCache(pattern, self.config.num_hidden_layers)
            elif cache is not None and not isinstance(cache, SinkCache):
                raise ValueError(f"the sinks pattern needs its own SinkCache, got a {type(cache).__name__}")
            if inputs_embeds is None:
                inputs_embeds, input_ids = self.embed_tokens(input_ids), None
            past = cache.get_seq_length() if cache is not None else 0
            length = inputs_embeds.shape[1]
            if past + length > pattern.cache_size:  # before that, every query sits at its own position
                sink_pos = sink_query_positions(torch.arange(past, past + length, device=inputs_embeds.device),
                                                pattern.sinks, pattern.window)
                kwargs["sink_position_embeddings"] = self.rotary_emb(inputs_embeds, position_ids=sink_pos[None])
        elif cache is None and caching:
            cache = DynamicCache()
        # The patterns build their own masks, so transformers' causal mask (a float q x T for eager, a BlockMask
        # for flex, made through a deprecated create_block_mask flag that warns) would be made for nothing: a 4-D
        # placeholder counts as "already prepared" and create_causal_mask returns it untouched.
        return super().forward(input_ids=input_ids, attention_mask=_MASK_PLACEHOLDER, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)


class _PatternCausalLM:
    """Causal LM whose `generate` builds the pattern's cache by itself."""

    # Serving engines that run transformers classes with their own attention (vLLM's and SGLang's Transformers
    # backends) take a class only when it says so (`is_backend_compatible()`); theirs would not run this attention.
    _supports_attention_backend = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        _swap_modules(self)

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
        """The pattern's own cache: the bounded SinkCache for sinks, a plain full cache for block sparsity."""
        pattern = pattern_of(self.config)
        return SinkCache(pattern, self.config.num_hidden_layers) if isinstance(pattern, Sinks) else DynamicCache()


class RetrofitLlamaAttention(_PatternAttention, LlamaAttention):
    """LlamaAttention running the configured pattern."""


class RetrofitMistralAttention(_PatternAttention, MistralAttention):
    """MistralAttention running the configured pattern."""


class RetrofitLlamaModel(_PatternModel, LlamaModel):
    """LlamaModel with the pattern's cache."""


class RetrofitMistralModel(_PatternModel, MistralModel):
    """MistralModel with the pattern's cache."""


class RetrofitLlamaForCausalLM(_PatternCausalLM, LlamaForCausalLM):
    """LlamaForCausalLM with the attention pattern of `config.retrofit_attention` (named by auto_map)."""


class RetrofitMistralForCausalLM(_PatternCausalLM, MistralForCausalLM):
    """MistralForCausalLM with the attention pattern of `config.retrofit_attention` (named by auto_map)."""


# stock causal LM -> (retrofit causal LM, retrofit decoder stack, retrofit attention)
_FAMILIES: dict[type, tuple[type, type, type]] = {
    LlamaForCausalLM: (RetrofitLlamaForCausalLM, RetrofitLlamaModel, RetrofitLlamaAttention),
    MistralForCausalLM: (RetrofitMistralForCausalLM, RetrofitMistralModel, RetrofitMistralAttention),
}


def _family(model: Any) -> tuple[type, type, type]:
    """The classes to give `model`: only the stock class itself or ours, never a subclass of the stock class (its
    own overrides, say another patch's attention, would be silently dropped by re-classing)."""
    for stock, classes in _FAMILIES.items():
        if type(model) in (stock, classes[0]):
            return classes
    raise TypeError(f"{FEATURE} is for LlamaForCausalLM and MistralForCausalLM only, not {type(model).__name__}")


def _swap_modules(model: torch.nn.Module) -> None:
    """Re-class the decoder stack and every attention module; the subclasses add no parameters, so weights, device
    and dtype stay exactly as they are."""
    _, stack, attention = _family(model)
    model.model.__class__ = stack
    for layer in model.model.layers:
        layer.self_attn.__class__ = attention


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Switch a loaded stock LlamaForCausalLM/MistralForCausalLM, in place, to the pattern in
    `model.config.retrofit_attention`; returns the model."""
    pattern_of(model.config)  # a missing or malformed pattern fails here, not in the first forward
    causal_lm, _, _ = _family(model)
    model.__class__ = causal_lm
    _swap_modules(model)
    return model


__all__ = [
    "BlockSparse", "RetrofitLlamaForCausalLM", "RetrofitMistralForCausalLM", "SinkCache", "SinkCacheLayer", "Sinks",
    "block_mask", "block_sparse_attention", "block_visible", "float_mask", "install", "mask_mod", "parse_pattern",
    "random_blocks", "sink_cache_positions", "sink_query_positions", "sinks_attention", "sinks_visible",
]
