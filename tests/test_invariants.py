"""Invariants every patch keeps, checked for every row of PATCHES on every checkpoint layout.

A new patcher adds its rows here (a spec, and the layouts it applies to) and gets all of these tests:
- streamed over the checkpoint == applied to the loaded model (tensors exactly, same source fingerprint);
- in place == to a new directory (tensors, config, file names; nothing left behind);
- the result loads in vanilla transformers and runs;
- --dry-run predicts exactly what is written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_same_tensors, read_config, state_of
from llm_retrofit import load_checkpoint, patch
from llm_retrofit.patchers import parse_spec
from llm_retrofit.plan import ModelView, PlanSummary, build_plan, model_view

ALL_LAYOUTS = ("tiny_llama", "tiny_mistral", "tiny_sharded", "tiny_bin")

PATCHES: list[tuple[str, tuple[str, ...]]] = [
    ("dtype:to=bfloat16", ALL_LAYOUTS),
    ("dtype:to=float16", ALL_LAYOUTS),
    ("dtype:to=float32", ("tiny_llama",)),  # config-only on a float32 model
    ("moe:num_experts=4,top_k=2", ALL_LAYOUTS),
    ("moe:num_experts=3,top_k=1,noise=0.01,drop=0.3,router=uniform", ("tiny_llama", "tiny_mistral")),
    ("moe:num_experts=4,top_k=2,split=true,partition=cluster", ("tiny_llama",)),
    ("expand:num_new_layers=3", ALL_LAYOUTS),
    ("dus:m=1", ("tiny_llama", "tiny_mistral")),
    # Context extension: config-only plans.
    ("linear:factor=2", ("tiny_llama", "tiny_sharded")),
    ("ntk:factor=2", ("tiny_llama",)),
    ("dynamic:factor=2", ("tiny_mistral",)),
    ("yarn:target_length=1024", ALL_LAYOUTS),
    ("llama3:factor=4", ("tiny_llama",)),
    (f"longrope:factors={Path(__file__).parent / 'data' / 'tiny_longrope_factors.json'}", ("tiny_llama", "tiny_bin")),
]

CASES = [pytest.param(spec, layout, id=f"{spec}-{layout}") for spec, layouts in PATCHES for layout in layouts]


def without_time(config: dict) -> dict:
    return {**config, "retrofit_history": [{**r, "time": None} for r in config.get("retrofit_history", [])]}


@pytest.mark.parametrize(("spec", "layout"), CASES)
def test_streamed_equals_loaded_model(spec: str, layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    source: Path = request.getfixturevalue(layout)
    streamed = patch(source, spec, output=tmp_path / "streamed")
    in_memory = patch(AutoModelForCausalLM.from_pretrained(source), spec)

    # Compared in the on-disk layout (transformers fuses Mixtral's experts in memory; model_view reverts that).
    assert_same_tensors(state_of(streamed), model_view(in_memory)[1])
    streamed_record = read_config(streamed)["retrofit_history"][-1]
    memory_record = in_memory.config.retrofit_history[-1]
    assert streamed_record["source_weights_xxh3"] == memory_record["source_weights_xxh3"]
    assert streamed_record["params"] == memory_record["params"]


@pytest.mark.parametrize(("spec", "layout"), CASES)
def test_in_place_equals_to_directory(spec: str, layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    source: Path = request.getfixturevalue(layout)
    to_directory = patch(source, spec, output=tmp_path / "copy")
    in_place = patch(source, spec, in_place=True)
    assert in_place == source.resolve()
    assert_same_tensors(state_of(in_place), state_of(to_directory))
    assert without_time(read_config(in_place)) == without_time(read_config(to_directory))
    assert sorted(p.name for p in in_place.iterdir()) == sorted(p.name for p in to_directory.iterdir())
    assert [p.name for p in source.parent.iterdir() if "retrofit" in p.name] == [], "staging left behind"


@pytest.mark.parametrize(("spec", "layout"), CASES)
def test_result_loads_in_vanilla_transformers(spec: str, layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    output = patch(request.getfixturevalue(layout), spec, output=tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        logits = model(torch.arange(12).unsqueeze(0)).logits
    assert logits.shape == (1, 12, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("spec", "layout"), CASES)
def test_dry_run_predicts_what_is_written(spec: str, layout: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    source: Path = request.getfixturevalue(layout)
    checkpoint = load_checkpoint(source)
    view = ModelView(checkpoint.config, checkpoint.tensors)
    summary = PlanSummary.of(build_plan(view, [parse_spec(spec)]), view)

    output = patch(source, spec, output=tmp_path / "out")
    written = load_checkpoint(output)
    assert set(summary.added) == written.tensors.keys() - checkpoint.tensors.keys()
    assert set(summary.removed) == checkpoint.tensors.keys() - written.tensors.keys()
    config = {k: v for k, v in read_config(output).items() if k != "retrofit_history"}
    for key, (_, new) in summary.config_changes.items():
        assert config.get(key) == new
    if summary.rewrites_weights:
        assert summary.bytes_to_write == sum(meta.nbytes for meta in written.tensors.values())
    else:
        assert all(f in {p.name for p in source.iterdir()} for f in written.weight_files)
