"""RoPE frequency maths: what a model's RoPE is, and the per-pair factors of each context-extension method.

RoPE rotates dimension pair i (i = 0 .. d/2-1) at frequency theta_i = base^(-2i/d). Every extension method rescales
those frequencies; written as one factor per pair, theta_i' = theta_i / lambda_i. The patchers (`patchers/rope.py`)
turn these into `rope_parameters`; the LongRoPE search (`rope_search.py`) seeds its population with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PatchError
from ..io.engine_config import longrope_attention_factor as longrope_attention_factor  # one formula, shared with config writing


@dataclass(frozen=True)
class RopeShape:
    """What the RoPE of a model is: rotary dimension, base, and the context length it was trained for."""

    dim: int
    base: float
    original_length: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> RopeShape:
        parameters = config.get("rope_parameters") or {}
        base = parameters.get("rope_theta", config.get("rope_theta"))
        if base is None:
            raise PatchError("this model's config has no RoPE (no rope_parameters.rope_theta); it cannot be extended.")
        rope_type = parameters.get("rope_type", "default")
        if rope_type != "default" or config.get("rope_scaling"):
            raise PatchError(
                f"this model already uses {rope_type!r} RoPE scaling; apply context extension to the original model."
            )
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return cls(dim=head_dim, base=float(base), original_length=int(config["max_position_embeddings"]))

    @property
    def pairs(self) -> int:
        return self.dim // 2


# ----------------------------------------------------------------------------- per-pair factors of each method


def pi_factors(shape: RopeShape, scale: float) -> list[float]:
    return [scale] * shape.pairs


def ntk_factors(shape: RopeShape, scale: float) -> list[float]:
    return [scale ** (2 * i / (shape.dim - 2)) for i in range(shape.pairs)]


def yarn_factors(shape: RopeShape, scale: float, beta_fast: float = 32.0, beta_slow: float = 1.0) -> list[float]:
    """lambda_i of YaRN: s for pairs that rotate fewer than beta_slow times over the original context, 1 for pairs
    that rotate more than beta_fast times, linear in between (as transformers computes it, truncated bounds)."""

    def pair_for_rotations(rotations: float) -> float:
        return shape.dim * math.log(shape.original_length / (rotations * 2 * math.pi)) / (2 * math.log(shape.base))

    low = max(math.floor(pair_for_rotations(beta_fast)), 0)
    high = min(math.ceil(pair_for_rotations(beta_slow)), shape.dim - 1)
    high = high + 0.001 if high == low else high
    factors = []
    for i in range(shape.pairs):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: extrapolate (keep), 1: interpolate by s
        factors.append(1.0 / ((1 - ramp) + ramp / scale))
    return factors


def rope_length_classes(model: torch.nn.Module, lengths: Sequence[int]) -> list[list[int]]:
    """`lengths` grouped so that, within a group, position p gets the same rotary angles whatever the length.

    Asked of the model itself rather than read off rope type names: transformers' dynamic NTK (every length past the
    original context its own angles) and LongRoPE (short factors up to the original context, long ones past it: two
    groups) depend on the length; every other rope type gives one group. Each rotary module (a module with an
    `inv_freq` buffer) is run at each length, and the angles of a length's positions compared with those of its
    group's longest length. A length-dependent RoPE changes them by far more than the tolerance, which only absorbs
    rounding. Groups are listed longest first, each longest first.
    """
    lengths = sorted({int(n) for n in lengths})
    rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    angles: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for n in lengths:  # shortest first: transformers' dynamic NTK keeps its grown frequencies between calls
            found = []
            for rotary in rotaries:
                probe = torch.zeros(1, dtype=torch.float32, device=rotary.inv_freq.device)
                found.append(rotary(probe, torch.arange(n, device=rotary.inv_freq.device)[None])[0][0])
            angles[n] = found
    groups: list[list[int]] = []
    for n in reversed(lengths):
        for group in groups:
            if all(torch.allclose(a[:n], b, rtol=0, atol=1e-6) for a, b in zip(angles[group[0]], angles[n])):
                group.append(n)
                break
        else:
            groups.append([n])
    return groups


def rotary_of(config: Mapping[str, Any]) -> torch.nn.Module:
    """transformers' rotary embedding of a model with this config.json, without the model: what `rope_length_classes`
    asks when a recipe prices its evaluations before any model is loaded (Llama, Mistral and Mixtral share it), and
    the frequencies `retrofit export` writes. Built from `rope_parameters` alone: transformers would let a
    `rope_scaling` mirror win, which for a config edited in memory (another RoPE in `rope_parameters`) is stale."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ..io.engine_config import without_rope_mirrors

    kept = {key: value for key, value in without_rope_mirrors(config).items()
            if key not in ("architectures", "auto_map")}
    return LlamaRotaryEmbedding(config=AutoConfig.for_model(**kept).get_text_config())


def rope_depends_on_length(model: torch.nn.Module, lengths: Sequence[int]) -> bool:
    """Whether the model's rotary embedding gives position p other angles in sequences of different lengths."""
    return len(rope_length_classes(model, lengths)) > 1
