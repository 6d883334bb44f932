"""The RoPE family: each method's per-frequency factors match its published formula, and the patched config is
what transformers' own RoPE code turns into exactly those frequencies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import read_config, save_tiny
from llm_retrofit import PatchError, PatchSpecError, extend_context, patch
from llm_retrofit.modeling.rope import RopeShape, longrope_attention_factor, ntk_factors, pi_factors, yarn_factors

TINY_FACTORS = Path(__file__).parent / "data" / "tiny_longrope_factors.json"
SHAPE = RopeShape(dim=8, base=10000.0, original_length=4096)  # 4 frequency pairs, small enough to check by hand


def test_pi_divides_every_frequency() -> None:
    assert pi_factors(SHAPE, 4.0) == [4.0, 4.0, 4.0, 4.0]


def test_ntk_raises_the_base() -> None:
    # base' = base * s^(d/(d-2)) gives lambda_i = s^(2i/(d-2)) = 4^(i/3)
    assert ntk_factors(SHAPE, 4.0) == pytest.approx([1.0, 4 ** (1 / 3), 4 ** (2 / 3), 4.0])


def test_yarn_ramps_between_extrapolation_and_interpolation() -> None:
    # Pairs rotating >= 32 times over 4096 tokens (i <= 1) are kept; those rotating <= once (i >= 3) are divided by
    # s; pair 2 is half way: 1 / (0.5 + 0.5 / 4) = 1.6. (Bounds: floor(1.309) = 1 and ceil(2.814) = 3.)
    assert yarn_factors(SHAPE, 4.0) == pytest.approx([1.0, 1.0, 1.6, 4.0])


def test_longrope_attention_factor() -> None:
    assert longrope_attention_factor(2.0, 8192) == pytest.approx(math.sqrt(1 + math.log(2) / math.log(8192)))
    assert longrope_attention_factor(1.0, 8192) == 1.0


def inv_freq(path: Path, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """The frequencies transformers itself computes from a checkpoint's config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.from_pretrained(path)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        base, dim = config.rope_parameters["rope_theta"], config.head_dim
        return 1.0 / base ** (torch.arange(0, dim, 2).float() / dim), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize(
    ("spec", "factors"),
    [
        ("linear:factor=4", lambda shape: pi_factors(shape, 4.0)),
        ("ntk:factor=4", lambda shape: ntk_factors(shape, 4.0)),
        ("yarn:factor=4", lambda shape: yarn_factors(shape, 4.0)),
    ],
)
def test_transformers_computes_the_same_frequencies(spec: str, factors, tiny_llama: Path, tmp_path: Path) -> None:
    shape = RopeShape.of(read_config(tiny_llama))
    output = patch(tiny_llama, spec, output=tmp_path / "out")
    original, _ = inv_freq(tiny_llama)
    patched, _ = inv_freq(output)
    torch.testing.assert_close(patched, original / torch.tensor(factors(shape)), rtol=1e-5, atol=0)
    assert read_config(output)["max_position_embeddings"] == 4 * 256


def llama3_reference(inv_freq: torch.Tensor, factor: float, low: float, high: float, original: int) -> torch.Tensor:
    """Meta's own `apply_scaling` (llama-models, models/llama3/reference_impl/model.py), transcribed: wavelengths
    shorter than original/high are kept, longer than original/low divided by the factor, a linear ramp between."""
    scaled = []
    for freq in inv_freq.tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            scaled.append(freq)
        elif wavelength > original / low:
            scaled.append(freq / factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            scaled.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(scaled)


def test_llama3_frequencies_are_metas_formula_as_transformers_computes_them(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, "llama3:factor=4,low_freq_factor=1,high_freq_factor=8", output=tmp_path / "out")
    original, _ = inv_freq(tiny_llama)
    patched, scaling = inv_freq(output)
    expected = llama3_reference(original, factor=4.0, low=1.0, high=8.0, original=256)
    # With wavelengths 2 pi 10000^(i/8) against 256/8 = 32 and 256: pairs 0-1 kept, 2-3 on the ramp, 4-7 divided by
    # 4. Every branch of the formula is exercised, so a swapped low/high or a missing ramp would show.
    ratio = (original / expected).tolist()
    assert ratio[:2] == [1.0, 1.0] and all(1.0 < r < 4.0 for r in ratio[2:4]) and ratio[4:] == pytest.approx([4.0] * 4)
    torch.testing.assert_close(patched, expected, rtol=1e-6, atol=0)  # float32 rounding of the same arithmetic
    assert scaling == 1.0  # llama3 scales no attention
    assert read_config(output)["max_position_embeddings"] == 4 * 256


def test_rope_patches_rewrite_no_weights(tiny_llama: Path, tmp_path: Path) -> None:
    import os

    output = patch(tiny_llama, "yarn:target_length=1024", output=tmp_path / "out")
    assert os.stat(output / "model.safetensors").st_ino == os.stat(tiny_llama / "model.safetensors").st_ino
    assert read_config(output)["rope_parameters"]["original_max_position_embeddings"] == 256


def logits(path: Path, length: int) -> torch.Tensor:
    ids = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits


def test_dynamic_ntk_changes_nothing_below_the_original_length(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, "dynamic:factor=4", output=tmp_path / "out")
    assert read_config(output)["max_position_embeddings"] == 256  # transformers reads it as the original length
    assert torch.equal(logits(output, 200), logits(tiny_llama, 200))
    assert not torch.equal(logits(output, 300), logits(tiny_llama, 300))


def test_longrope_with_unit_short_factors_keeps_short_contexts(tiny_llama: Path, tmp_path: Path) -> None:
    """Short factors of 1.0 are the original frequencies; transformers applies the attention factor at every length,
    so the promise holds with attention_factor=1 (the searched short factors compensate otherwise)."""
    output = patch(tiny_llama, f"longrope:factors={TINY_FACTORS},attention_factor=1.0", output=tmp_path / "out")
    config = read_config(output)
    assert config["max_position_embeddings"] == 512 and config["rope_parameters"]["rope_type"] == "longrope"
    assert torch.equal(logits(output, 200), logits(tiny_llama, 200))
    # Past 256 tokens transformers switches to the long factors: the frequencies are theta_i / lambda_i.
    original, _ = inv_freq(tiny_llama)
    long, scaling = inv_freq(output, seq_len=300)
    long_factor = json.loads(TINY_FACTORS.read_text())["long_factor"]
    torch.testing.assert_close(long, original / torch.tensor(long_factor), rtol=1e-6, atol=0)
    assert scaling == 1.0


def test_longrope_default_attention_factor_is_the_papers(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, f"longrope:factors={TINY_FACTORS}", output=tmp_path / "out")
    assert read_config(output)["rope_parameters"]["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(2) / math.log(256)))


def test_extend_context_on_a_loaded_model(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    extended = extend_context(model, target_length=1024, method="yarn")
    assert extended.config.max_position_embeddings == 1024
    assert extended.config.rope_parameters["rope_type"] == "yarn"


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("yarn:target_length=128", PatchError, "must be longer than the current 256"),
        ("linear:factor=0.5", PatchError, "must be longer"),
        ("yarn", PatchSpecError, "exactly one of factor=S or target_length=N"),
        ("longrope", PatchSpecError, "needs factors=FILE"),
    ],
)
def test_impossible_extensions_are_refused(spec: str, error: type, message: str, tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(error, match=message):
        patch(tiny_llama, spec, output=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"long_factor": [1.0] * 7}, "has 7 values but this model's RoPE has 8 frequency pairs"),
        ({"long_factor": [1.0, 2.0, 1.5, 2, 2, 2, 2, 2]}, "must be non-decreasing"),
        ({"long_factor": [0.5] * 8}, "numbers >= 1"),
        ({"short": []}, "no 'long_factor'"),
    ],
)
def test_bad_factor_files_are_named(content: dict, message: str, tiny_llama: Path, tmp_path: Path) -> None:
    factors = tmp_path / "factors.json"
    factors.write_text(json.dumps({"target_length": 512, **content}))
    with pytest.raises(PatchSpecError, match=message):
        patch(tiny_llama, f"longrope:factors={factors}", output=tmp_path / "x")


def test_an_already_extended_model_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    once = patch(tiny_llama, "yarn:factor=2", output=tmp_path / "once")
    with pytest.raises(PatchError, match="already uses 'yarn' RoPE scaling"):
        patch(once, "linear:factor=2", output=tmp_path / "twice")


def test_a_model_without_rope_is_refused(tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "norope")
    config = json.loads((source / "config.json").read_text())
    del config["rope_parameters"]
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(PatchError, match="no RoPE"):
        patch(source, "yarn:factor=2", output=tmp_path / "x")
