"""The Python API reads its values as `retrofit patch` reads a spec's (one reader, `spec.read_value`), and answers
what it cannot do with our errors: the defects of issue 25, section 2, as a user of `llm_retrofit.api` met them.

The refusals themselves are rows of tests/reliability/test_bad_inputs.py (`API_CASES`); here: what the same values
written as text mean, and what `patch` does with a loaded model and `output=`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import save_tiny, tiny_model
from llm_retrofit import OutputError, PatchSpecError, patch
from llm_retrofit.api import add_infini_memory, pool_kv_heads, set_attention
from llm_retrofit.patchers.gqa import PoolKVHeads


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()  # 4 query heads, 2 KV heads, 3 layers


def test_text_values_mean_what_they_mean_in_a_spec(model: torch.nn.Module) -> None:
    assert set_attention(model, pattern="sliding", window="64").config.sliding_window == 64
    assert set_attention(model, pattern="sliding", window=64).config.sliding_window == 64
    assert add_infini_memory(model, "64", memory="no").config.retrofit_infini["memory"] is False  # not truthiness
    assert add_infini_memory(model, 64, memory=True).config.retrofit_infini["memory"] is True
    assert add_infini_memory(model, 64, gate_init="-6").config.retrofit_infini["gate_init"] == -6.0


def test_a_whole_float_is_an_integer_as_in_a_spec(model: torch.nn.Module) -> None:
    """`pool_kv_heads(model, 1.0)` once reached torch.zeros as a float shape; `gqa:num_key_value_heads=1.0` is 1."""
    assert pool_kv_heads(model, 1.0, method="mean").config.num_key_value_heads == 1
    assert patch(model, "gqa:num_key_value_heads=1.0,method=mean").config.num_key_value_heads == 1
    with pytest.raises(PatchSpecError, match="num_key_value_heads=1.5 is not valid; expected an integer"):
        pool_kv_heads(model, 1.5, method="mean")


def test_a_patcher_built_by_hand_is_read_again(model: torch.nn.Module) -> None:
    by_hand = PoolKVHeads(num_key_value_heads=1.0, method="mean")  # type: ignore[arg-type]
    assert patch(model, by_hand).config.num_key_value_heads == 1
    with pytest.raises(PatchSpecError, match="5 is not a patch; give a spec such as 'dtype:to=bfloat16'"):
        patch(model, 5)  # type: ignore[call-overload]


def test_an_infini_gate_is_finite_and_within_a_trainable_range(model: torch.nn.Module) -> None:
    for bad, message in [(math.nan, "gate_init=nan is not valid; expected a finite number"),
                         (math.inf, "gate_init=inf is not valid; expected a finite number"),
                         (1e300, r"gate_init=1e\+300 is outside \[-30, 30\]"), (-31, r"outside \[-30, 30\]")]:
        with pytest.raises(PatchSpecError, match=message):
            add_infini_memory(model, 64, gate_init=bad)
    patched = add_infini_memory(model, 64, gate_init=-30)
    logits = patched(torch.arange(100)[None]).logits  # two segments: the memory term is used
    assert torch.isfinite(logits).all()


def test_output_with_a_loaded_model_is_refused_not_ignored(model: torch.nn.Module, tmp_path: Path) -> None:
    """A loaded model is patched in memory; `output=` once wrote nothing and said nothing."""
    for write in ({"output": tmp_path / "out"}, {"in_place": True}, {"max_shard_size": "1GB"}):
        with pytest.raises(OutputError, match="writes a checkpoint, but this model is loaded in Python, so patch"
                                              r"\(\) returns the patched model instead"):
            patch(model, "dtype:to=bfloat16", **write)  # type: ignore[call-overload]
        with pytest.raises(OutputError, match="Patch its checkpoint directory to write one"):
            set_attention(model, pattern="sliding", window=64, **write)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_is_still_written_to_output(tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "m")
    out = set_attention(source, pattern="sliding", window="64", output=tmp_path / "out")
    assert out == tmp_path / "out" and '"sliding_window": 64' in (out / "config.json").read_text()
