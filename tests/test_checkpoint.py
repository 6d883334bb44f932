"""Reading checkpoints: every layout transformers writes, lazily, and a clear error for every kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import save_tiny, state_of, tiny_model
from llm_retrofit import CheckpointError, UnsupportedArchitectureError, load_checkpoint
from llm_retrofit.io.checkpoint import SafetensorsFile


def test_single_file_checkpoint_lists_every_tensor_without_reading_data(tiny_llama: Path) -> None:
    checkpoint = load_checkpoint(tiny_llama)
    expected = state_of(tiny_llama)
    assert checkpoint.tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert checkpoint.tensors[name].shape == tuple(tensor.shape)
        assert checkpoint.tensors[name].dtype == tensor.dtype
    assert checkpoint.missing_tensors() == []


@pytest.mark.parametrize("layout", ["tiny_llama", "tiny_sharded", "tiny_bin", "tiny_mistral"])
def test_read_returns_exactly_the_stored_tensor(layout: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(layout)
    checkpoint = load_checkpoint(path)
    reference = tiny_model("mistral" if "mistral" in layout else "llama", **(
        {"sliding_window": 64} if "mistral" in layout else {})).state_dict()
    for name in checkpoint.tensors:
        assert torch.equal(checkpoint.read(name), reference[name]), name


def test_sharded_checkpoint_reports_its_shards(tiny_sharded: Path) -> None:
    checkpoint = load_checkpoint(tiny_sharded)
    assert len(checkpoint.weight_files) >= 3
    assert checkpoint.is_safetensors


def test_tied_embeddings_are_not_reported_missing(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "tied", tie_word_embeddings=True)
    checkpoint = load_checkpoint(path)
    assert "lm_head.weight" not in checkpoint.tensors
    assert checkpoint.missing_tensors() == []


def test_truncated_safetensors_is_named_with_the_fix(tiny_llama: Path) -> None:
    weights = tiny_llama / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(truncated|ends at byte).*again"):
        load_checkpoint(tiny_llama)


def test_garbage_header_is_named_with_the_fix(tiny_llama: Path) -> None:
    weights = tiny_llama / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"not json at!"
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header is not JSON"):
        load_checkpoint(tiny_llama)


def test_empty_weight_file_is_reported(tiny_llama: Path) -> None:
    (tiny_llama / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only 0 bytes"):
        load_checkpoint(tiny_llama)


def test_missing_shard_is_named(tiny_sharded: Path) -> None:
    victim = sorted(tiny_sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name} named in the index .* is missing"):
        load_checkpoint(tiny_sharded)


def test_missing_config_is_named(tiny_llama: Path) -> None:
    (tiny_llama / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_checkpoint(tiny_llama)


def test_corrupt_bin_is_named(tiny_bin: Path) -> None:
    (tiny_bin / "pytorch_model.bin").write_bytes(b"\x80\x04 definitely not a state dict")
    with pytest.raises(CheckpointError, match="could not be read as PyTorch weights"):
        load_checkpoint(tiny_bin)


def test_unsupported_architecture_lists_the_supported_ones(tiny_llama: Path) -> None:
    config = json.loads((tiny_llama / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tiny_llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*llama, mistral, mixtral"):
        load_checkpoint(tiny_llama)


def test_a_path_that_does_not_exist_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_gguf_file_points_to_convert(smollm2_gguf: Path) -> None:
    with pytest.raises(CheckpointError, match="retrofit convert"):
        load_checkpoint(smollm2_gguf)


def test_hub_repo_id_offline_and_uncached_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="not a local directory.*cannot be reached"):
        load_checkpoint("someone/some-model")


def test_hub_repo_id_resolves_through_the_huggingface_hub_cache(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same code path real users take (snapshot_download); offline it is served from the local cache."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--someone--tiny" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_llama.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    checkpoint = load_checkpoint("someone/tiny")
    assert checkpoint.path == snapshot.resolve()
    assert checkpoint.source == "someone/tiny"
    assert checkpoint.tensors.keys() == state_of(tiny_llama).keys()


def test_a_tensor_read_stays_valid_after_its_file_is_replaced(tiny_llama: Path) -> None:
    """Reads map a private copy-on-write view: an in-place rewrite replacing the file cannot change it."""
    file = SafetensorsFile(tiny_llama / "model.safetensors")
    tensor = file.read_raw("model.embed_tokens.weight")
    copy = tensor.clone()
    (tiny_llama / "model.safetensors").unlink()
    assert torch.equal(tensor, copy)
