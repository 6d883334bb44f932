"""Context extension by rescaling RoPE frequencies: PI, NTK, dynamic NTK, YaRN, Llama 3 and LongRoPE.

RoPE rotates dimension pair i (i = 0 .. d/2-1) at frequency theta_i = base^(-2i/d). Every method here rescales those
frequencies; written as one factor per pair, theta_i' = theta_i / lambda_i:
- PI (`linear`, Chen et al. 2023): lambda_i = s for all i (positions divided by s);
- NTK-aware (`ntk`): a larger base, base' = base * s^(d/(d-2)), i.e. lambda_i = s^(2i/(d-2)): high frequencies
  (local order) are kept, the lowest is interpolated by s;
- dynamic NTK (`dynamic`): NTK with s recomputed from the current length, only beyond the original context;
- YaRN (`yarn`, Peng et al. 2023): interpolate low frequencies, keep high ones, ramp between by wavelength
  (beta_fast=32, beta_slow=1), and scale attention by 0.1 ln(s) + 1;
- Llama 3 (`llama3`): the same idea with a ramp between wavelengths L/4 and L;
- LongRoPE (`longrope`, Ding et al. 2024, arXiv 2402.13753): one searched lambda_i per pair (non-decreasing in i),
  a `long_factor` used past the original length and a `short_factor` below it, attention scaled by
  sqrt(1 + ln s / ln L). The factors come from `retrofit search-rope` (`factors=FILE`).

All of these are config-only patches: transformers reads `rope_parameters` (checked against its
modeling_rope_utils.py), so no weight file is rewritten and the result loads in plain transformers. The NTK patch is
expressed as a new `rope_theta` with the default rope type, which every RoPE implementation understands.

transformers' dynamic NTK treats `max_position_embeddings` as the original length and extends past it on the fly, so
`dynamic` leaves it unchanged; the other methods set it to the new length.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import PatchError, PatchSpecError
from ..io.engine_config import MIRROR_KEYS
from ..modeling.cost import Pass
from ..modeling.rope import RopeShape, longrope_attention_factor, pi_factors
from ..plan import ModelView, TensorPlan
from ..spec import PatchCard, Patcher, register

if TYPE_CHECKING:
    from ..modeling.rope_search import SearchSettings


# ------------------------------------------------------------------------------------------------- patchers


@dataclass(frozen=True)
class _ContextExtension(Patcher):
    """Shared by the RoPE patchers: the new length as a factor or a target length."""

    factor: float | None = None
    target_length: int | None = None

    def __post_init__(self) -> None:
        if (self.factor is None) == (self.target_length is None):
            raise PatchSpecError(f"{self.name}: give exactly one of factor=S or target_length=N. Example: {self.example}")
        if self.factor is not None and not math.isfinite(self.factor):
            raise PatchSpecError(f"{self.name}: factor={self.factor} must be a finite number > 1, e.g. {self.example}")
        if self.target_length is not None and self.target_length < 1:
            raise PatchSpecError(f"{self.name}: target_length={self.target_length} must be a positive token count.")

    def scale_for(self, shape: RopeShape) -> float:
        if self.factor is not None:
            scale = float(self.factor)
        else:
            scale = self.target_length / shape.original_length  # type: ignore[operator]
        if scale <= 1.0:
            raise PatchError(
                f"{self.name}: the new context ({round(scale * shape.original_length)} tokens) must be longer than the "
                f"current {shape.original_length}; pass a factor > 1 or a larger target_length."
            )
        return scale

    def extended(self, model: ModelView, rope_parameters: dict[str, Any], length: int | None = None) -> TensorPlan:
        shape = RopeShape.of(model.config)
        config = {k: v for k, v in model.config.items() if k not in MIRROR_KEYS}  # stale now; see engine_config
        config["rope_parameters"] = {"rope_theta": shape.base, **rope_parameters}
        if length is not None:
            config["max_position_embeddings"] = length
        return TensorPlan.identity(ModelView(config, model.tensors))

    def new_length(self, shape: RopeShape) -> int:
        return round(shape.original_length * self.scale_for(shape))

    keeps_length: ClassVar[bool] = False
    """True where transformers must keep reading max_position_embeddings as the original length (dynamic NTK)."""

    def rope_parameters(self, shape: RopeShape) -> dict[str, Any]:
        """The method's `rope_parameters` entries (rope_theta is added, and may be overridden)."""
        raise NotImplementedError

    def plan(self, model: ModelView) -> TensorPlan:
        shape = RopeShape.of(model.config)
        length = None if self.keeps_length else self.new_length(shape)
        return self.extended(model, self.rope_parameters(shape), length)


@register
@dataclass(frozen=True)
class LinearRope(_ContextExtension):
    """Position interpolation (PI): every RoPE frequency divided by the factor."""

    name: ClassVar[str] = "linear"
    example: ClassVar[str] = "linear:factor=2"
    card: ClassVar[PatchCard] = PatchCard(
        "Position Interpolation", "RoPE positions are divided by the scaling factor, so the longer context maps "
        "onto the position range the model was trained on.",
        "Extending Context Window of Large Language Models via Positional Interpolation (Chen et al., 2023)",
        "https://arxiv.org/abs/2306.15595",
        "Position Interpolation needs a short finetune at the new length; short-context quality drops slightly.",
    )

    def rope_parameters(self, shape: RopeShape) -> dict[str, Any]:
        return {"rope_type": "linear", "factor": self.scale_for(shape)}


@register
@dataclass(frozen=True)
class NtkRope(_ContextExtension):
    """NTK-aware scaling: a larger RoPE base, so low frequencies stretch and high ones stay."""

    name: ClassVar[str] = "ntk"
    example: ClassVar[str] = "ntk:factor=2"
    card: ClassVar[PatchCard] = PatchCard(
        "NTK-aware RoPE scaling", "The RoPE base is raised so that high frequencies are kept and low frequencies "
        "are interpolated.",
        "YaRN: Efficient Context Window Extension of Large Language Models (Peng et al., 2023), NTK-aware "
        "interpolation", "https://arxiv.org/abs/2309.00071",
        "NTK-aware scaling without finetuning holds up to about twice the trained length; beyond that perplexity "
        "rises quickly.",
    )

    def rope_parameters(self, shape: RopeShape) -> dict[str, Any]:
        return {"rope_type": "default", "rope_theta": shape.base * self.scale_for(shape) ** (shape.dim / (shape.dim - 2))}


@register
@dataclass(frozen=True)
class DynamicRope(_ContextExtension):
    """Dynamic NTK: NTK scaling recomputed from the sequence length, only past the original context."""

    name: ClassVar[str] = "dynamic"
    example: ClassVar[str] = "dynamic:factor=2"
    card: ClassVar[PatchCard] = PatchCard(
        "Dynamic NTK scaling", "NTK-aware scaling whose factor grows with the current sequence length, so short "
        "inputs are computed exactly as before.",
        "YaRN: Efficient Context Window Extension of Large Language Models (Peng et al., 2023), Dynamic NTK",
        "https://arxiv.org/abs/2309.00071",
        "Dynamic scaling picks the rotary frequencies from the sequence length: keys cached early in a generation "
        "were rotated with other frequencies than later queries use.",
    )

    keeps_length: ClassVar[bool] = True  # transformers' dynamic NTK reads max_position_embeddings as the original

    def rope_parameters(self, shape: RopeShape) -> dict[str, Any]:
        return {"rope_type": "dynamic", "factor": self.scale_for(shape)}


@register
@dataclass(frozen=True)
class YarnRope(_ContextExtension):
    """YaRN: interpolate low frequencies, keep high ones, ramp between; attention scaled by 0.1 ln(s) + 1."""

    name: ClassVar[str] = "yarn"
    example: ClassVar[str] = "yarn:factor=2"
    card: ClassVar[PatchCard] = PatchCard(
        "YaRN", "NTK-by-parts interpolation of the RoPE frequencies plus an attention temperature; extends the "
        "context with little or no finetuning.",
        "YaRN: Efficient Context Window Extension of Large Language Models (Peng et al., 2023)",
        "https://arxiv.org/abs/2309.00071",
    )

    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.beta_fast) and 0 < self.beta_slow < self.beta_fast):
            raise PatchSpecError(
                f"yarn: beta_fast={self.beta_fast}, beta_slow={self.beta_slow} must be finite with 0 < beta_slow < "
                "beta_fast (rotations per original context that bound the ramp; the paper uses 32 and 1)."
            )

    def rope_parameters(self, shape: RopeShape) -> dict[str, Any]:
        return {
            "rope_type": "yarn",
            "factor": self.scale_for(shape),
            "original_max_position_embeddings": shape.original_length,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
        }


@register
@dataclass(frozen=True)
class Llama3Rope(_ContextExtension):
    """Llama 3.1 scaling: frequencies below L/low_freq_factor interpolated, above L/high_freq_factor kept."""

    name: ClassVar[str] = "llama3"
    example: ClassVar[str] = "llama3:factor=8"
    card: ClassVar[PatchCard] = PatchCard(
        "Llama 3 RoPE scaling", "Frequency-dependent RoPE scaling of Llama 3.1: high frequencies kept, low "
        "frequencies divided by the factor, a smooth ramp between.",
        "The Llama 3 Herd of Models (Grattafiori et al., 2024)", "https://arxiv.org/abs/2407.21783",
    )

    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.high_freq_factor) and 0 < self.low_freq_factor < self.high_freq_factor):
            raise PatchSpecError(
                f"llama3: low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor} must be "
                "finite with 0 < low_freq_factor < high_freq_factor (wavelengths above L/low_freq_factor are "
                "interpolated, below L/high_freq_factor kept; Llama 3.1 uses 1 and 4)."
            )

    def rope_parameters(self, shape: RopeShape) -> dict[str, Any]:
        return {
            "rope_type": "llama3",
            "factor": self.scale_for(shape),
            "low_freq_factor": self.low_freq_factor,
            "high_freq_factor": self.high_freq_factor,
            "original_max_position_embeddings": shape.original_length,
        }


@register
@dataclass(frozen=True)
class LongRope(_ContextExtension):
    """LongRoPE: searched per-frequency factors (factors=FILE from `retrofit search-rope`), long and short."""

    name: ClassVar[str] = "longrope"
    example: ClassVar[str] = "longrope:factors=factors.json"
    card: ClassVar[PatchCard] = PatchCard(
        "LongRoPE", "Per-dimension RoPE rescaling factors found by evolutionary search, one set for short and one "
        "for long inputs.",
        "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens (Ding et al., 2024)",
        "https://arxiv.org/abs/2402.13753",
        "LongRoPE switches from the short to the long factors once a forward pass is longer than "
        "`original_max_position_embeddings`. In generation the KV cache of a shorter prompt was computed with the "
        "short factors and is reused after the switch, so text generated past the threshold differs from what a "
        "single long forward pass gives; re-encode the prompt when that matters.",
    )

    factors: Path | None = None
    data: str | None = None
    max_docs: int = 1
    attention_factor: float | None = None
    population: int | None = None
    """Search budget with data=DOCS: candidates kept per generation (each generation makes as many children)."""
    iterations: int | None = None
    segments: int | None = None
    """With data=DOCS: pieces of each candidate's pass, so that a hopeless one stops early. None: 4 on a GPU, 1 on a
    CPU, where the KV-cached pieces' masked attention made a 16k candidate of SmolLM2 cost 65 s against 37 s."""

    def __post_init__(self) -> None:
        if (self.factors is None) == (self.data is None):
            raise PatchSpecError(
                "longrope: needs factors=FILE (the JSON written by `retrofit search-rope`) or data=DOCS with "
                "target_length=N to run the search now (slow: see `retrofit search-rope --help`)."
            )
        if self.factor is not None and self.target_length is not None:
            raise PatchSpecError("longrope: give at most one of factor=S or target_length=N (the factors file has one).")
        if self.data is not None and self.factor is None and self.target_length is None:
            raise PatchSpecError("longrope: data=DOCS searches factors for a length; add target_length=N.")
        if self.data is None and (self.population, self.iterations, self.segments) != (None, None, None):
            raise PatchSpecError("longrope: population, iterations and segments set the search's budget; they need "
                                 "data=DOCS.")
        if self.segments is not None and self.segments < 1:
            raise PatchSpecError(f"longrope: segments={self.segments} must be at least 1 (1: one pass per candidate).")
        if self.factor is not None and not math.isfinite(self.factor):
            raise PatchSpecError(f"longrope: factor={self.factor} must be a finite number > 1.")
        attention = self.attention_factor
        if attention is not None and not (math.isfinite(attention) and attention > 0):
            raise PatchSpecError(
                f"longrope: attention_factor={self.attention_factor} must be a finite number > 0 (1 leaves attention "
                "as it is)."
            )
        if self.max_docs < 1:
            raise PatchSpecError(f"longrope: max_docs={self.max_docs} must be at least 1 (documents the search reads).")

    def check(self, model: ModelView) -> None:
        if self.data is not None:  # the search's length: refused before the model is loaded to search
            self.new_length(RopeShape.of(model.config))

    def plan(self, model: ModelView) -> TensorPlan:
        self.check(model)
        shape = RopeShape.of(model.config)
        searched = read_factors(self.factors, shape) if self.factors else self._search(model, shape)
        return self._plan_with(model, shape, searched)

    def shape_plan(self, model: ModelView) -> TensorPlan:
        """The config a search would write, with PI's factors standing in for the ones it finds: the same rope type,
        lengths and short/long switch, so the same passes for whatever runs the model after it."""
        shape = RopeShape.of(model.config)
        if self.factors:
            return self._plan_with(model, shape, read_factors(self.factors, shape))
        length = self.new_length(shape)
        return self._plan_with(model, shape, {"long_factor": pi_factors(shape, length / shape.original_length)})

    def _plan_with(self, model: ModelView, shape: RopeShape, searched: dict[str, Any]) -> TensorPlan:
        length = self.target_length or (round(shape.original_length * self.factor) if self.factor else searched.get("target_length"))
        if length is None:
            raise PatchSpecError(f"longrope: {self.factors} names no target_length; pass target_length=N.")
        scale = length / shape.original_length
        if scale <= 1.0:
            raise PatchError(f"longrope: target length {length} must exceed the original {shape.original_length}.")
        parameters = {
            "rope_type": "longrope",
            "factor": scale,
            "original_max_position_embeddings": shape.original_length,
            "long_factor": searched["long_factor"],
            "short_factor": searched.get("short_factor") or [1.0] * shape.pairs,
            "attention_factor": self.attention_factor
            or searched.get("attention_factor")
            or longrope_attention_factor(scale, shape.original_length),
        }
        return self.extended(model, parameters, length)


    def loads_model(self) -> bool:
        return self.data is not None

    def _search(self, model: ModelView, shape: RopeShape) -> dict[str, Any]:
        """Run the factor search on the first `max_docs` documents of `data` (default budget unless given)."""
        from ..evaluation.documents import load_documents
        from ..evaluation.perplexity import tokenize
        from ..modeling.devices import input_device
        from ..modeling.rope_search import FactorEvaluator, search

        network, tokenizer = _search_model(model)
        length = self.new_length(shape)
        ids, _ = tokenize(tokenizer, load_documents([self.data], max_docs=self.max_docs))  # type: ignore[list-item]
        settings = self.search_settings(length, input_device(network).type)  # a placed model's first weight: meta
        evaluator = FactorEvaluator(network, ids, shape, length, settings.segments,
                                    attention_factor=self.attention_factor)
        best = search(evaluator, settings).population[0]
        return {"target_length": length, "long_factor": best.factors}

    def search_settings(self, length: int, device_type: str) -> SearchSettings:
        """The search this patch runs for `length` on a device of `device_type` (its budget, or the default)."""
        from ..modeling.rope_search import SearchSettings

        segments = self.segments or (4 if device_type == "cuda" else 1)
        budget: dict[str, Any] = {"iterations": self.iterations} if self.iterations is not None else {}
        if self.population is not None:  # as many children as survivors, half mutations and half crossovers
            budget |= {"population": self.population, "parents": min(4, self.population),
                       "mutations": self.population // 2, "crossovers": self.population - self.population // 2}
        return SearchSettings(target_length=length, attention_factor=self.attention_factor, segments=segments,
                              **budget)

    def passes(self, config: Mapping[str, Any]) -> list[Pass]:
        """With data=DOCS, one pass of the target length per candidate and document (the most the search runs)."""
        if self.data is None:
            return []
        length = self.new_length(RopeShape.of(dict(config)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return [Pass(length, config)] * (self.search_settings(length, device).candidates * self.max_docs)


def _search_model(view: ModelView) -> tuple[Any, Any]:
    """The model the search runs, and its tokenizer: a checkpoint is loaded as `retrofit eval` loads it (in its own
    dtype, whole on the GPU or CPU when it fits, else placed by accelerate); a loaded model is used as it is."""
    from transformers import AutoTokenizer

    from ..evaluation.perplexity import load_model
    from ..io.progress import quiet_libraries

    if view.origin is None:
        raise PatchError("longrope: data=DOCS (a factor search) runs the model to compute its result; make it the "
                         "first patch of the chain.")
    if isinstance(view.origin, Path):
        return load_model(view.origin)
    with quiet_libraries():
        return view.origin, AutoTokenizer.from_pretrained(view.origin.name_or_path)


def read_factors(path: Path, shape: RopeShape) -> dict[str, Any]:
    """A factors JSON (`long_factor`, optional `short_factor`, `target_length`), checked against the model."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PatchSpecError(f"longrope: cannot read factors file {path}: {e}. Write it with `retrofit search-rope`.") from None
    if not isinstance(data, dict) or "long_factor" not in data:
        raise PatchSpecError(f"longrope: {path} has no 'long_factor' list; write it with `retrofit search-rope`.")
    for key in ("long_factor", "short_factor"):
        factors = data.get(key)
        if factors is None:
            continue
        if not isinstance(factors, list) or len(factors) != shape.pairs:
            count = len(factors) if isinstance(factors, list) else "no"
            raise PatchSpecError(
                f"longrope: {key} in {path} has {count} values but this model's RoPE has {shape.pairs} frequency pairs "
                f"(head_dim {shape.dim} / 2); the factors were searched for another model."
            )
        if any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 1.0 <= f < math.inf for f in factors):
            raise PatchSpecError(
                f"longrope: {key} in {path} must hold finite numbers >= 1 (1 keeps a frequency as it is)."
            )
        if key == "long_factor" and any(b < a for a, b in zip(factors, factors[1:])):
            raise PatchSpecError(
                f"longrope: long_factor in {path} must be non-decreasing (low frequencies are interpolated at least as "
                "much as high ones); this file was not written by the search."
            )
    length, attention = data.get("target_length"), data.get("attention_factor")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise PatchSpecError(f"longrope: target_length in {path} must be a positive integer (tokens), not {length!r}.")
    if attention is not None and (isinstance(attention, bool) or not isinstance(attention, (int, float))
                                  or not 0 < attention < math.inf):
        raise PatchSpecError(f"longrope: attention_factor in {path} must be a finite number > 0, not {attention!r}.")
    return data
