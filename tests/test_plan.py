"""The tensor plan and its two executors: the same patch gives the same model however it is applied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_same_tensors, read_config, snapshot, state_of
from llm_retrofit import OutputError, PatchError, load_checkpoint, patch
from llm_retrofit.io.checkpoint import SafetensorsFile
from llm_retrofit.patchers.dtype import CastDtype
from llm_retrofit.plan import ModelView, PlanSummary, build_plan, model_view

def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(path)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


def test_dtype_patch_equals_transformers_own_cast(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)  # transformers' own cast
    patched = AutoModelForCausalLM.from_pretrained(output)
    assert patched.dtype == torch.bfloat16
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, original(ids).logits)


def test_dry_run_writes_nothing_and_describes_the_plan(tiny_llama: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    checkpoint = load_checkpoint(tiny_llama)
    view = ModelView(checkpoint.config, checkpoint.tensors)
    summary = PlanSummary.of(build_plan(view, [CastDtype(to=torch.bfloat16)]), view)
    assert snapshot(tmp_path) == before
    assert summary.config_changes == {"dtype": ("float32", "bfloat16")}
    assert len(summary.changed) == len(checkpoint.tensors) and not summary.added and not summary.removed
    assert summary.bytes_to_write == sum(m.nbytes for m in checkpoint.tensors.values()) // 2
    assert "weights to write: " in summary.render()


def test_config_only_plan_reuses_the_weight_files(tiny_sharded: Path, tmp_path: Path) -> None:
    """Casting float32 weights to float32 changes only config.json; shards are hard links, not rewrites."""
    output = patch(tiny_sharded, "dtype:to=float32", output=tmp_path / "out")
    for shard in tiny_sharded.glob("model-*.safetensors"):
        assert os.stat(shard).st_ino == os.stat(output / shard.name).st_ino
    assert (output / "model.safetensors.index.json").is_file()
    assert_same_tensors(state_of(output), state_of(tiny_sharded))


def test_plans_compose_into_one_pass(tiny_llama: Path, tmp_path: Path) -> None:
    chained = patch(tiny_llama, "dtype:to=bfloat16", "dtype:to=float16", output=tmp_path / "chained")
    step = patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "step1")
    step = patch(step, "dtype:to=float16", output=tmp_path / "step2")
    assert_same_tensors(state_of(chained), state_of(step))
    assert [r["patch"] for r in read_config(chained)["retrofit_history"]] == ["dtype", "dtype"]


def test_provenance_records_the_patch(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "out")
    (record,) = read_config(output)["retrofit_history"]
    assert record["patch"] == "dtype" and record["params"] == {"to": "bfloat16"}
    assert record["source"] == str(tiny_llama)
    assert len(record["source_weights_xxh3"]) == 32
    assert {"llm_retrofit", "transformers", "torch"} <= record["versions"].keys()


def test_the_same_patch_twice_is_refused_unless_forced(tiny_llama: Path, tmp_path: Path) -> None:
    once = patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "once")
    with pytest.raises(PatchError, match="already applied.*--force"):
        patch(once, "dtype:to=bfloat16", output=tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    patch(once, "dtype:to=bfloat16", output=tmp_path / "twice", force=True)
    assert len(read_config(tmp_path / "twice")["retrofit_history"]) == 2


def _failing_cast(calls_before_failure: int):
    calls = {"n": 0}
    original = CastDtype._cast

    def cast(self: CastDtype, tensor: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > calls_before_failure:
            raise RuntimeError("simulated failure halfway through the weights")
        return original(self, tensor)

    return cast


@pytest.mark.parametrize("in_place", [False, True])
def test_a_failure_halfway_leaves_the_source_untouched_and_no_partial_output(
    tiny_sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool
) -> None:
    before = snapshot(tiny_sharded)
    monkeypatch.setattr(CastDtype, "_cast", _failing_cast(calls_before_failure=10))
    output = None if in_place else tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated failure"):
        patch(tiny_sharded, "dtype:to=bfloat16", output=output, in_place=in_place)
    assert snapshot(tiny_sharded) == before
    assert output is None or not output.exists()
    assert [p.name for p in tiny_sharded.parent.iterdir() if "retrofit" in p.name] == []


def test_an_existing_output_directory_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists and is not empty"):
        patch(tiny_llama, "dtype:to=bfloat16", output=occupied)
    assert (occupied / "keep.txt").read_text() == "mine"


def test_output_must_differ_from_the_source(tiny_llama: Path) -> None:
    with pytest.raises(OutputError, match="use --in-place"):
        patch(tiny_llama, "dtype:to=bfloat16", output=tiny_llama)


def test_auxiliary_files_travel_with_the_weights(tiny_llama: Path, tmp_path: Path) -> None:
    (tiny_llama / "tokenizer.json").write_text("{}")
    (tiny_llama / "pytorch_model.bin").write_bytes(b"stale weights in another format")
    output = patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "out")
    assert (output / "tokenizer.json").read_text() == "{}"
    assert (output / "generation_config.json").is_file()
    assert not (output / "pytorch_model.bin").exists()


def test_files_of_a_hub_snapshot_arrive_as_files_not_dangling_links(tiny_llama: Path, tmp_path: Path) -> None:
    """A Hub snapshot holds relative symlinks into the cache's blobs; they must be followed, not linked."""
    blobs = tiny_llama.parent / "blobs"
    blobs.mkdir()
    for name in ("model.safetensors", "generation_config.json"):
        (tiny_llama / name).rename(blobs / name)
        (tiny_llama / name).symlink_to(Path("..") / "blobs" / name)
    output = patch(tiny_llama, "dtype:to=float32", output=tmp_path / "out")  # config-only: weights are linked
    for name in ("model.safetensors", "generation_config.json"):
        assert not (output / name).is_symlink() and (output / name).read_bytes() == (blobs / name).read_bytes()


def test_max_shard_size_reshards(tiny_llama: Path, tmp_path: Path) -> None:
    output = patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "out", max_shard_size="20KB")
    shards = sorted(output.glob("model-*.safetensors"))
    assert len(shards) > 3
    for shard in shards:
        extents = SafetensorsFile(shard).extents
        data_bytes = sum(e.end - e.start for e in extents.values())
        assert data_bytes <= 20_000 or len(extents) == 1, "only a tensor larger than the limit may overflow a shard"
    assert_same_tensors(state_of(output), state_of(patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "one")))


@pytest.mark.parametrize("made", ["loaded from a bfloat16 checkpoint", "cast in memory with .to(bfloat16)"])
@pytest.mark.parametrize("spec", ["expand:every=3", "moe:num_experts=2,top_k=1,noise=0.01", "yarn:factor=2"])
def test_a_bfloat16_model_patched_in_memory_stays_bfloat16_and_equals_the_streamed_patch(
    tiny_llama: Path, tmp_path: Path, made: str, spec: str
) -> None:
    bf16 = patch(tiny_llama, "dtype:to=bfloat16", output=tmp_path / "bf16")
    if made.startswith("loaded"):
        model = AutoModelForCausalLM.from_pretrained(bf16)
    else:  # transformers leaves config.dtype at float32 here: the tensors, not the config, say what the model is
        model = AutoModelForCausalLM.from_pretrained(tiny_llama).to(torch.bfloat16)
    assert model.dtype == torch.bfloat16

    in_memory = patch(model, spec)
    streamed = patch(bf16, spec, output=tmp_path / "streamed")
    assert {p.dtype for p in in_memory.state_dict().values()} == {torch.bfloat16}
    assert in_memory.config.dtype == torch.bfloat16 and read_config(streamed)["dtype"] == "bfloat16"
    # Exactly: both casts are torch's round-to-nearest-even, and the patch computes the same on the same bf16 tensors.
    assert_same_tensors(state_of(streamed), model_view(in_memory)[1])
    assert model.dtype == torch.bfloat16, "the input model is left as it was"
