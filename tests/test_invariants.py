"""Invariants every patch keeps, checked for every row of PATCHES and CHAINS on every checkpoint layout.

A new patcher adds its rows here (a spec, and the layouts it applies to) and gets all of these tests:
- streamed over the checkpoint == applied to the loaded model (tensors exactly, same source fingerprint);
- in place == to a new directory (tensors, config, file names; nothing left behind);
- the result loads in vanilla transformers and runs;
- --dry-run predicts exactly what is written;
- with `keeps_function`, the patched model computes what the source computes.

A row of CHAINS is several patches given at once (`--patch a --patch b`), which the executors run as one composed
plan (`TensorPlan.then`). It gets every check above, and one more: the chain's output == the patches applied one
after the other in separate runs (each reading the previous run's output from disk).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_same_tensors, read_config, state_of
from llm_retrofit import load_checkpoint, patch
from llm_retrofit.io.provenance import STAMP_KEY
from llm_retrofit.patchers import parse_spec
from llm_retrofit.plan import ModelView, PlanSummary, build_plan, model_view

ALL_LAYOUTS = ("tiny_llama", "tiny_mistral", "tiny_sharded", "tiny_bin")
LONGROPE = f"longrope:factors={Path(__file__).parent / 'data' / 'tiny_longrope_factors.json'}"


class Row(NamedTuple):
    specs: tuple[str, ...]  # one patch, or a chain applied as one plan
    layouts: tuple[str, ...]
    keeps_function: bool = False  # the result computes exactly what the source computes (until trained)


def row(spec: str | tuple[str, ...], layouts: tuple[str, ...], keeps_function: bool = False) -> Row:
    return Row((spec,) if isinstance(spec, str) else spec, layouts, keeps_function)


PATCHES: list[Row] = [
    row("dtype:to=bfloat16", ALL_LAYOUTS),
    row("dtype:to=float16", ALL_LAYOUTS),
    row("dtype:to=float32", ("tiny_llama",), keeps_function=True),  # config-only on a float32 model
    row("moe:num_experts=4,top_k=2", (*ALL_LAYOUTS, "tiny_tied"), keeps_function=True),  # tied: the head is untied
    row("moe:num_experts=3,top_k=1,noise=0.01,drop=0.3,router=uniform", ("tiny_llama", "tiny_mistral")),
    row("moe:num_experts=4,top_k=2,split=true,partition=cluster", ("tiny_llama",)),
    row("expand:num_new_layers=3", ALL_LAYOUTS, keeps_function=True),
    row("dus:m=1", ("tiny_llama", "tiny_mistral")),
    row("gqa:num_key_value_heads=1,method=mean", ALL_LAYOUTS),  # fit needs a tokenizer: tests/test_gqa.py
    # Context extension: config-only plans.
    row("linear:factor=2", ("tiny_llama", "tiny_sharded")),
    row("ntk:factor=2", ("tiny_llama",)),
    row("dynamic:factor=2", ("tiny_mistral",)),
    row("yarn:target_length=1024", ALL_LAYOUTS),
    row("llama3:factor=4", ("tiny_llama",)),
    row(LONGROPE, ("tiny_llama", "tiny_bin")),
]

# Patches of different kinds in one plan: each later patch plans on the model the earlier ones make (a Mixtral, more
# layers, another dtype, a RoPE config), and its tasks are fed the earlier tasks' outputs.
CHAINS: list[Row] = [
    row(
        ("dtype:to=bfloat16", "moe:num_experts=4,top_k=2,split=true,partition=cluster"), ("tiny_llama", "tiny_sharded")
    ),
    row(("expand:every=3", "moe:num_experts=2,top_k=1"), ("tiny_llama", "tiny_bin"), keeps_function=True),
    row(("expand:every=3", "moe:num_experts=3,top_k=1,noise=0.01,drop=0.3"), ("tiny_mistral",)),
    row(("moe:num_experts=2,top_k=1", "expand:num_new_layers=3"), ("tiny_llama", "tiny_mistral", "tiny_tied"),
        keeps_function=True),
    row(("moe:num_experts=4,top_k=2", "dtype:to=bfloat16"), ("tiny_mistral",)),
    row(("gqa:num_key_value_heads=1,method=first", "dtype:to=bfloat16"), ("tiny_llama", "tiny_sharded")),
    row(("yarn:target_length=1024", "expand:num_new_layers=3", "dtype:to=float16"), ("tiny_llama", "tiny_sharded")),
    row(("dus:m=1", "expand:every=2"), ("tiny_llama",)),
    row((LONGROPE, "moe:num_experts=2,top_k=2,split=true"), ("tiny_llama",)),
]


def name(specs: tuple[str, ...]) -> str:
    return " -> ".join(spec.replace(str(Path(__file__).parent) + "/", "") for spec in specs)


def cases(rows: list[Row], only_function_keeping: bool = False) -> list:
    return [
        pytest.param(r.specs, layout, id=f"{name(r.specs)}-{layout}")
        for r in rows
        if r.keeps_function or not only_function_keeping
        for layout in r.layouts
    ]


CASES = cases(PATCHES + CHAINS)


def without_time(config: dict) -> dict:
    return {**config, "retrofit_history": [{**r, "time": None} for r in config.get("retrofit_history", [])]}


RUN_FACTS = ("time", "versions", "source", "source_weights_xxh3", STAMP_KEY)


def without_run(record: dict) -> dict:
    """A history record without what differs between runs of the same patch: when, by which versions, from where (and
    the stamp of the weight files a run left on disk, which a model in memory has none of)."""
    return {k: v for k, v in record.items() if k not in RUN_FACTS}


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize(("specs", "layout"), CASES)
def test_streamed_equals_loaded_model(
    specs: tuple[str, ...], layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source: Path = request.getfixturevalue(layout)
    streamed = patch(source, *specs, output=tmp_path / "streamed")
    in_memory = patch(AutoModelForCausalLM.from_pretrained(source), *specs)

    # Compared in the on-disk layout (transformers fuses Mixtral's experts in memory; model_view reverts that).
    assert_same_tensors(state_of(streamed), model_view(in_memory)[1])
    streamed_records = read_config(streamed)["retrofit_history"]
    memory_records = in_memory.config.retrofit_history
    assert len(streamed_records) == len(memory_records) == len(specs)
    for on_disk, in_python in zip(streamed_records, memory_records):
        assert on_disk["source_weights_xxh3"] == in_python["source_weights_xxh3"]
        assert without_run(on_disk) == without_run(in_python)


@pytest.mark.parametrize(("specs", "layout"), cases(CHAINS))
def test_chained_patches_equal_patches_applied_one_after_another(
    specs: tuple[str, ...], layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source: Path = request.getfixturevalue(layout)
    chained = patch(source, *specs, output=tmp_path / "chained")
    step = source
    for index, spec in enumerate(specs):
        step = patch(step, spec, output=tmp_path / f"step{index}")

    # Exactly: each patch computes the same function of the same input tensors, whether they come from the earlier
    # task in memory or from the earlier run's files.
    assert_same_tensors(state_of(chained), state_of(step))
    chained_config, step_config = read_config(chained), read_config(step)
    assert {k: v for k, v in chained_config.items() if k != "retrofit_history"} == {
        k: v for k, v in step_config.items() if k != "retrofit_history"
    }
    # The same records (patch, params, notes such as new_layers); the chain's all name the original source.
    assert [without_run(r) for r in chained_config["retrofit_history"]] == [
        without_run(r) for r in step_config["retrofit_history"]
    ]
    assert {r["source"] for r in chained_config["retrofit_history"]} == {str(source)}


@pytest.mark.parametrize(("specs", "layout"), cases(PATCHES + CHAINS, only_function_keeping=True))
def test_function_preserving_patches_compute_what_the_source_computes(
    specs: tuple[str, ...], layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source: Path = request.getfixturevalue(layout)
    output = patch(source, *specs, output=tmp_path / "out")
    # A zeroed output projection adds exactly 0; identical experts weighted by renormalised router probabilities give
    # the dense MLP times a sum of weights that is 1 up to float32 rounding: 1e-5 on logits of magnitude ~1.
    torch.testing.assert_close(
        logits_of(AutoModelForCausalLM.from_pretrained(output)),
        logits_of(AutoModelForCausalLM.from_pretrained(source)),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize(("specs", "layout"), CASES)
def test_in_place_equals_to_directory(
    specs: tuple[str, ...], layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source: Path = request.getfixturevalue(layout)
    to_directory = patch(source, *specs, output=tmp_path / "copy")
    in_place = patch(source, *specs, in_place=True)
    assert in_place == source.resolve()
    assert_same_tensors(state_of(in_place), state_of(to_directory))
    assert without_time(read_config(in_place)) == without_time(read_config(to_directory))
    assert sorted(p.name for p in in_place.iterdir()) == sorted(p.name for p in to_directory.iterdir())
    assert [p.name for p in source.parent.iterdir() if "retrofit" in p.name] == [], "staging left behind"


@pytest.mark.parametrize(("specs", "layout"), CASES)
def test_result_loads_in_vanilla_transformers(
    specs: tuple[str, ...], layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    output = patch(request.getfixturevalue(layout), *specs, output=tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(output)
    with torch.no_grad():
        logits = model(torch.arange(12).unsqueeze(0)).logits
    assert logits.shape == (1, 12, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("specs", "layout"), CASES)
def test_dry_run_predicts_what_is_written(
    specs: tuple[str, ...], layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source: Path = request.getfixturevalue(layout)
    checkpoint = load_checkpoint(source)
    view = ModelView(checkpoint.config, checkpoint.tensors)
    summary = PlanSummary.of(build_plan(view, [parse_spec(spec) for spec in specs]), view)

    output = patch(source, *specs, output=tmp_path / "out")
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
