"""The RoPE keys other readers of config.json look for, written beside transformers 5's `rope_parameters`.

transformers 5 keeps everything about RoPE in `rope_parameters`, and so does everything we write. Other readers
look elsewhere (docs/checkpoints.md#rope-keys-for-other-readers cites where):
- a top-level `rope_theta`: transformers 4 and the engines that read configs through it (older vLLM, SGLang) take
  the base from there and fall back to 10000 when it is absent (SmolLM2's is 100000);
- a `rope_scaling` dict with the scaled types, whose type older readers find under `"type"` rather than
  `"rope_type"`;
- a top-level `original_max_position_embeddings` (vLLM's LongRoPE, and Phi-3-style readers);
- vLLM's LongRoPE takes its attention scaling from `short_mscale`/`long_mscale`, computing its own default from
  the two lengths when they are absent, and never reads `attention_factor`.

These mirrors are derived from `rope_parameters` every time a config.json is written, and stale ones are removed;
nothing of ours reads them back. transformers 5 itself lets `rope_scaling` replace `rope_parameters` when loading,
and a top-level `original_max_position_embeddings` replace the nested one, so each mirror carries exactly the values
of `rope_parameters`: whichever a reader takes, it computes the same RoPE (tests/test_engine_config.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MIRROR_KEYS = ("rope_theta", "rope_scaling", "original_max_position_embeddings")
"""Top-level keys that only mirror `rope_parameters` in what we write."""

ALIAS_KEYS = ("type", "short_mscale", "long_mscale")
"""Keys of our `rope_scaling` mirror that `rope_parameters` does not hold: a transformers 5 load of the mirror
leaves them in its `rope_parameters` (it ignores them), so they are dropped from there before deriving again."""


def with_rope_mirrors(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with the RoPE mirrors derived from its `rope_parameters`, and no stale ones.

    A config without a flat `rope_parameters` (a transformers 4 config, where `rope_scaling` and `rope_theta` are
    the truth, or one with RoPE per layer type) is returned as it is.
    """
    mirrored = without_rope_mirrors(config)
    canonical = mirrored.get("rope_parameters")
    if not _is_flat(canonical):
        return mirrored
    rope_type = canonical.get("rope_type", "default")
    if "rope_theta" in canonical:
        mirrored["rope_theta"] = canonical["rope_theta"]
    if rope_type != "default":
        mirrored["rope_scaling"] = {**canonical, "type": rope_type, **_vllm_longrope_scales(config, canonical)}
        if "original_max_position_embeddings" in canonical:
            mirrored["original_max_position_embeddings"] = canonical["original_max_position_embeddings"]
    return mirrored


def without_rope_mirrors(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with `rope_parameters` alone saying what the RoPE is: what a model is built from in memory, where a
    mirror could only add the aliases a transformers load keeps (or, stale, override the truth)."""
    parameters = config.get("rope_parameters")
    if not _is_flat(parameters):
        return dict(config)
    kept = {key: value for key, value in config.items() if key not in MIRROR_KEYS}
    kept["rope_parameters"] = {key: value for key, value in parameters.items() if key not in ALIAS_KEYS}
    if "rope_type" not in parameters and "type" in parameters:  # as transformers reads a legacy-only type
        kept["rope_parameters"]["rope_type"] = parameters["type"]
    if "rope_theta" not in parameters and config.get("rope_theta") is not None:
        # Not a mirror of ours (we always write the base inside): transformers takes a missing base from here.
        kept["rope_parameters"]["rope_theta"] = config["rope_theta"]
    return kept


def _is_flat(parameters: Any) -> bool:
    """One RoPE for every layer (not a dict per layer type, whose values are dicts)."""
    return isinstance(parameters, Mapping) and not any(isinstance(v, Mapping) for v in parameters.values())


def _vllm_longrope_scales(config: Mapping[str, Any], parameters: Mapping[str, Any]) -> dict[str, float]:
    """`short_mscale`/`long_mscale` where vLLM's LongRoPE would otherwise scale attention differently from
    transformers, which applies one factor (`attention_factor`, or its default) at every length.

    Only then: transformers warns of keys its longrope validation does not know, so the usual case (the default
    factor, which vLLM computes alike from max_position_embeddings / original_max_position_embeddings) carries none.
    """
    if parameters.get("rope_type") != "longrope" or "original_max_position_embeddings" not in parameters:
        return {}
    original = parameters["original_max_position_embeddings"]
    used = parameters.get("attention_factor")
    if used is None:
        used = longrope_attention_factor(parameters.get("factor") or config["max_position_embeddings"] / original, original)
    vllm_default = longrope_attention_factor(config["max_position_embeddings"] / original, original)
    return {} if math.isclose(used, vllm_default, rel_tol=1e-9) else {"short_mscale": used, "long_mscale": used}


def longrope_attention_factor(scale: float, original_length: int) -> float:
    """The LongRoPE paper's attention factor sqrt(1 + ln s / ln L), which transformers and vLLM both use when none
    is given (here, below the RoPE maths of modeling/rope.py, because config writing needs it too)."""
    return math.sqrt(1 + math.log(scale) / math.log(original_length)) if scale > 1 else 1.0


def write_config(directory: Path, config: Mapping[str, Any]) -> None:
    """Write `directory/config.json`: the one place our checkpoints' configs are written, mirrors included."""
    text = json.dumps(with_rope_mirrors(config), indent=2, sort_keys=True) + "\n"
    (directory / "config.json").write_text(text)
