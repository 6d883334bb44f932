"""The RoPE keys other readers need (top-level `rope_theta`, a `rope_scaling` mirror, a top-level
`original_max_position_embeddings`, vLLM's LongRoPE scales) are derived from `rope_parameters` whenever we write a
config.json, never read back, and change nothing transformers 5 computes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from conftest import read_config, save_tiny, tiny_model
from llm_retrofit import patch
from llm_retrofit.io.checkpoint import restore_dropped_config
from llm_retrofit.io.engine_config import ALIAS_KEYS, MIRROR_KEYS, with_rope_mirrors

THETA = 100000.0  # SmolLM2's base: the value readers that miss it replace with 10000
PAIRS = 8  # head_dim 16 of the tiny model
ROPES: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": THETA},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": THETA},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": THETA},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 256, "beta_fast": 32.0,
             "beta_slow": 1.0, "rope_theta": THETA},
    "llama3": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256, "rope_theta": THETA},
    "longrope": {"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": 256,
                 "long_factor": [1.0 + i / 4 for i in range(PAIRS)], "short_factor": [1.0] * PAIRS,
                 "attention_factor": math.sqrt(1 + 1 / 8), "rope_theta": THETA},  # the paper's: ln 2 / ln 256 = 1/8
    "longrope-attention-1": {"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": 256,
                             "long_factor": [1.0 + i / 4 for i in range(PAIRS)], "short_factor": [1.0] * PAIRS,
                             "attention_factor": 1.0, "rope_theta": THETA},
}


def config_with(rope: str) -> dict[str, Any]:
    length = 256 if rope in ("default", "dynamic") else 512  # dynamic NTK reads the original length there
    return {**tiny_model().config.to_dict(), "max_position_embeddings": length, "rope_parameters": dict(ROPES[rope])}


def test_the_mirror_keys_of_each_rope_type() -> None:
    """Written out by hand from what the readers look for (see engine_config's docstring)."""
    def scaling(rope: str, **extra: Any) -> dict[str, Any]:
        return {**ROPES[rope], "type": ROPES[rope]["rope_type"], **extra}

    expected = {
        "default": {"rope_theta": THETA},
        "linear": {"rope_theta": THETA, "rope_scaling": scaling("linear")},
        "dynamic": {"rope_theta": THETA, "rope_scaling": scaling("dynamic")},
        "yarn": {"rope_theta": THETA, "rope_scaling": scaling("yarn"), "original_max_position_embeddings": 256},
        "llama3": {"rope_theta": THETA, "rope_scaling": scaling("llama3"), "original_max_position_embeddings": 256},
        # The paper's attention factor is what vLLM computes on its own: no scales, and no transformers warning.
        "longrope": {"rope_theta": THETA, "rope_scaling": scaling("longrope"), "original_max_position_embeddings": 256},
        # Any other must be told to vLLM, which reads short_mscale/long_mscale and never attention_factor.
        "longrope-attention-1": {"rope_theta": THETA, "original_max_position_embeddings": 256,
                                 "rope_scaling": scaling("longrope-attention-1", short_mscale=1.0, long_mscale=1.0)},
    }
    for rope, mirrors in expected.items():
        written = with_rope_mirrors(config_with(rope))
        assert {key: written[key] for key in MIRROR_KEYS if key in written} == mirrors, rope
        assert written["rope_parameters"] == ROPES[rope], rope  # the truth is left as it was


def test_stale_mirrors_are_replaced_from_rope_parameters() -> None:
    stale = {**config_with("default"), "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
             "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert {key: with_rope_mirrors(stale).get(key) for key in MIRROR_KEYS} == {
        "rope_theta": THETA, "rope_scaling": None, "original_max_position_embeddings": None}
    # What a transformers 5 load of a mirrored config leaves in rope_parameters is not carried on as truth.
    reloaded = {**config_with("yarn"), "rope_parameters": {**ROPES["yarn"], "type": "yarn"}}
    assert with_rope_mirrors(reloaded)["rope_parameters"] == ROPES["yarn"]
    legacy_type_only = {**config_with("linear"), "rope_parameters": {"type": "linear", "factor": 2.0, "rope_theta": THETA}}
    assert with_rope_mirrors(legacy_type_only)["rope_parameters"] == ROPES["linear"]


def test_a_base_given_only_at_the_top_level_moves_into_rope_parameters(tmp_path: Path) -> None:
    """Not a mirror (we always write the base inside): transformers takes a missing base from the top level."""
    config = {**config_with("linear"), "rope_theta": 500000.0, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    written = with_rope_mirrors(config)
    assert written["rope_parameters"]["rope_theta"] == written["rope_theta"] == 500000.0
    assert _load(written, tmp_path / "a").rope_parameters["rope_theta"] == _load(config, tmp_path / "b").rope_parameters["rope_theta"]


def test_a_transformers_4_config_is_left_as_it_is() -> None:
    legacy = {"model_type": "llama", "rope_theta": THETA, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert with_rope_mirrors(legacy) == legacy


def _load(config: dict[str, Any], directory: Path) -> Any:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return AutoConfig.from_pretrained(directory)


def _rope_of(config: Any) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """transformers' own computation: the init function's (inv_freq, attention scaling) at the original length, and
    the rotary embedding's cos and sin over 4x the original length (dynamic NTK and LongRoPE switch past it)."""
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    rotary = LlamaRotaryEmbedding(config)
    cos, sin = rotary(torch.ones(1, dtype=torch.float32), torch.arange(1024)[None])
    return inv_freq, scaling, cos, sin


@pytest.mark.parametrize("rope", list(ROPES))
def test_transformers_loads_the_mirrored_config_to_the_same_rope(rope: str, tmp_path: Path) -> None:
    plain = _load(config_with(rope), tmp_path / "plain")
    mirrored = _load(with_rope_mirrors(config_with(rope)), tmp_path / "mirrored")
    # transformers 5 lets `rope_scaling` replace `rope_parameters`: the mirror is a copy plus the legacy aliases,
    # which it keeps but does not read.
    aliases = {key: value for key, value in mirrored.rope_parameters.items() if key in ALIAS_KEYS}
    assert {**plain.rope_parameters, **aliases} == mirrored.rope_parameters
    assert aliases.get("type", "default") == ROPES[rope]["rope_type"]
    for ours, theirs in zip(_rope_of(mirrored), _rope_of(plain)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # save_pretrained drops the mirrors (but not a top-level original_max_position_embeddings); what it writes loads
    # to the same RoPE again.
    mirrored.save_pretrained(tmp_path / "resaved")
    resaved = AutoConfig.from_pretrained(tmp_path / "resaved")
    assert resaved.rope_parameters == mirrored.rope_parameters
    for ours, theirs in zip(_rope_of(resaved), _rope_of(plain)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("rope", ["yarn", "longrope-attention-1", "dynamic"])
def test_a_model_with_mirrors_computes_the_same_logits(rope: str, tmp_path: Path) -> None:
    model = tiny_model(max_position_embeddings=config_with(rope)["max_position_embeddings"],
                       rope_parameters=dict(ROPES[rope]))
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "mirrored")
    restore_dropped_config(tmp_path / "mirrored", {})  # what our saves after save_pretrained do
    assert "rope_scaling" in read_config(tmp_path / "mirrored")
    ids = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(0))  # past the original length
    with torch.no_grad():
        plain, mirrored = (AutoModelForCausalLM.from_pretrained(tmp_path / name)(ids).logits
                           for name in ("plain", "mirrored"))
    torch.testing.assert_close(mirrored, plain, rtol=0, atol=0)


def test_a_patch_writes_the_mirrors_and_a_repatch_keeps_none_stale(tmp_path: Path) -> None:
    source = save_tiny(tmp_path / "tiny", rope_parameters={"rope_type": "default", "rope_theta": THETA})
    ntk = patch(source, "ntk:factor=2", output=tmp_path / "ntk")
    theta = read_config(ntk)["rope_parameters"]["rope_theta"]
    assert theta > THETA and read_config(ntk)["rope_theta"] == theta and "rope_scaling" not in read_config(ntk)
    # A patch of the mirrored checkpoint reads rope_parameters, and writes mirrors of its own result.
    yarn = read_config(patch(ntk, "yarn:factor=2", output=tmp_path / "yarn"))
    assert yarn["rope_theta"] == yarn["rope_scaling"]["rope_theta"] == theta
    assert yarn["rope_scaling"] == {**yarn["rope_parameters"], "type": "yarn"}
    assert yarn["original_max_position_embeddings"] == 512  # the length the NTK patch extended to
    # One chain, one plan: the mirrors are of the final config.
    chained = read_config(patch(source, "ntk:factor=2", "yarn:factor=2", output=tmp_path / "chained"))
    assert {key: chained[key] for key in MIRROR_KEYS} == {key: yarn[key] for key in MIRROR_KEYS}
    # A later patch of another kind carries the RoPE, and its mirrors, unchanged.
    cast = read_config(patch(tmp_path / "yarn", "dtype:to=bfloat16", output=tmp_path / "bf16"))
    assert {key: cast[key] for key in (*MIRROR_KEYS, "rope_parameters")} == {
        key: yarn[key] for key in (*MIRROR_KEYS, "rope_parameters")}


def test_the_converted_smollm2_gives_its_base_where_older_readers_look(smollm2: Path) -> None:
    """The motivating case: `retrofit convert` saves through transformers, which writes the base only inside
    rope_parameters; readers of the top-level key would take 10000."""
    config = read_config(smollm2)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": THETA}
    assert config["rope_theta"] == THETA and "rope_scaling" not in config


@pytest.mark.parametrize("training", [{}, {"lora": "lora:r=2,merge=true"}], ids=["full", "merged-lora"])
def test_a_finetune_writes_the_mirrors_that_save_pretrained_leaves_out(training: dict[str, Any], tmp_path: Path) -> None:
    from test_finetune import chars_model, corpus

    from llm_retrofit import finetune

    yarn = patch(chars_model(tmp_path / "base"), "yarn:factor=2", output=tmp_path / "yarn")
    out = finetune(yarn, tmp_path / "out", data=[str(corpus(tmp_path))], steps=1, seq_len=32, **training)
    written, patched = read_config(out.path), read_config(yarn)
    assert {key: written[key] for key in (*MIRROR_KEYS, "rope_parameters")} == {
        key: patched[key] for key in (*MIRROR_KEYS, "rope_parameters")}


def test_a_stale_mirror_changes_nothing_in_memory_either(tmp_path: Path) -> None:
    """transformers would let a leftover top-level original_max_position_embeddings win over the one yarn computes;
    the model patched in memory uses the same RoPE as the checkpoint patched on disk."""
    source = save_tiny(tmp_path / "tiny", rope_parameters={"rope_type": "default", "rope_theta": THETA})
    config = read_config(source)
    (source / "config.json").write_text(json.dumps({**config, "original_max_position_embeddings": 64}))
    on_disk = AutoModelForCausalLM.from_pretrained(patch(source, "yarn:factor=2", output=tmp_path / "yarn"))
    in_memory = patch(AutoModelForCausalLM.from_pretrained(source), "yarn:factor=2")
    assert in_memory.config.rope_parameters == read_config(tmp_path / "yarn")["rope_parameters"]  # no aliases either
    for ours, theirs in zip(_rope_of(in_memory.config), _rope_of(on_disk.config)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
