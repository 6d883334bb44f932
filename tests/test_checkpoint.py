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
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*llama, ministral, mistral, mixtral"):
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


# -- headers that lie about their file (issue 12, 4.8): refused as the safetensors library itself refuses them ------


def rewrite_header(path: Path, change) -> None:
    """Replace a safetensors file's JSON header by `change(header)`, keeping its data bytes."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])


def _offsets(name: str, shift: int = 0, to: str | None = None, value: object = None):
    def change(header: dict) -> None:
        if to is not None:
            header[name]["data_offsets"] = list(header[to]["data_offsets"])
        elif value is not None:
            header[name]["data_offsets"] = value
        else:
            header[name]["data_offsets"] = [o + shift for o in header[name]["data_offsets"]]

    return change


LIES = {
    "overlap": (_offsets("model.layers.0.post_attention_layernorm.weight", to="model.layers.0.input_layernorm.weight"),
                "starts at byte .* inside the bytes of another tensor"),
    "overlap-by-half": (_offsets("model.layers.1.input_layernorm.weight", shift=-128),
                        "inside the bytes of another tensor"),
    "gap": (lambda header: header.pop("model.embed_tokens.weight"),
            r"bytes \d+ to \d+ of its data section belong to no tensor"),
    "trailing-bytes": (lambda header: header.pop("model.norm.weight"),
                       r"its tensors end at byte \d+ of a \d+-byte data"),
    "beyond-the-file": (_offsets("model.norm.weight", shift=10**6), "ends at byte"),
    "size-not-dtype-times-shape": (lambda header: header["model.norm.weight"].update(shape=[32]),
                                   "has 256 bytes, its shape needs 128"),
    "offsets-reversed": (_offsets("model.norm.weight", value=[10, 0]), "offsets .* out of order"),
    "offsets-not-integers": (_offsets("model.norm.weight", value=[0.0, 256.0]), "is malformed"),
}


@pytest.mark.parametrize("lie", LIES)
def test_a_header_that_lies_is_refused_as_safetensors_refuses_it(lie: str, tiny_llama: Path) -> None:
    from safetensors import safe_open

    weights = tiny_llama / "model.safetensors"
    change, problem = LIES[lie]
    rewrite_header(weights, change)
    with pytest.raises(Exception):  # the reference: the safetensors library refuses this file too
        with safe_open(weights, framework="pt") as f:
            [f.get_tensor(name) for name in f.keys()]
    with pytest.raises(CheckpointError, match=f"model.safetensors is not a readable safetensors file: .*{problem}"):
        load_checkpoint(tiny_llama)


def test_a_header_rewritten_honestly_is_still_read(tiny_llama: Path) -> None:
    """The tiling check is of the header, not of how safetensors happens to lay files out: reordered entries pass."""
    rewrite_header(tiny_llama / "model.safetensors", lambda header: dict(reversed(list(header.items()))))
    checkpoint = load_checkpoint(tiny_llama)
    for name, tensor in state_of(tiny_llama).items():
        assert torch.equal(checkpoint.read(name), tensor), name


# -- configs that do not describe the weights (issue 12, 4.3, 4.6, 4.11) ---------------------------------------------


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("num_hidden_layers", None, "has no 'num_hidden_layers'"),
        ("num_hidden_layers", "3", 'num_hidden_layers is "3", but it must be a positive integer'),
        ("num_hidden_layers", 3.0, "num_hidden_layers is 3.0, but it must be a positive integer"),
        ("num_hidden_layers", 0, "num_hidden_layers is 0, but"),
        ("num_hidden_layers", True, "num_hidden_layers is true, but"),
        ("hidden_size", -64, "hidden_size is -64, but"),
        ("num_key_value_heads", "2", 'num_key_value_heads is "2", but'),
    ],
)
def test_config_sizes_must_be_positive_integers(key: str, value: object, problem: str, tiny_llama: Path) -> None:
    edit_config(tiny_llama, **{key: value})
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(tiny_llama)


def test_a_config_holding_nan_is_refused(tiny_llama: Path) -> None:
    edit_config(tiny_llama, rope_parameters={"rope_type": "yarn", "factor": 2.0, "beta_fast": float("nan")})
    assert "NaN" in (tiny_llama / "config.json").read_text()
    with pytest.raises(CheckpointError, match="config.json holds NaN, which is not a JSON number"):
        load_checkpoint(tiny_llama)


def test_a_config_counting_more_layers_than_the_weights_is_incomplete(tiny_llama: Path) -> None:
    edit_config(tiny_llama, num_hidden_layers=5)
    checkpoint = load_checkpoint(tiny_llama)  # still readable: inspect shows what is wrong
    assert checkpoint.missing_tensors()[0] == "model.layers.3.self_attn.q_proj.weight"
    assert checkpoint.incompleteness() == (
        "config.json says num_hidden_layers=5 but the weights hold 3 layer(s), e.g. "
        "'model.layers.3.self_attn.q_proj.weight' is missing"
    )
    with pytest.raises(CheckpointError, match=r"is incomplete: config.json says num_hidden_layers=5 .* Download or"):
        checkpoint.require_complete()


def test_the_check_costs_what_the_weights_hold_not_what_the_config_claims(tiny_llama: Path) -> None:
    import time

    edit_config(tiny_llama, num_hidden_layers=10**9)
    checkpoint = load_checkpoint(tiny_llama)
    start = time.perf_counter()
    missing = checkpoint.missing_tensors()
    assert time.perf_counter() - start < 1.0, "a loop over the claimed layers"
    assert missing == [f"model.layers.3.{suffix}" for suffix in checkpoint.architecture.layer_tensors]


def test_a_missing_tensor_inside_the_layers_is_counted(tiny_llama: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_llama / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, tiny_llama / "model.safetensors", metadata={"format": "pt"})
    assert load_checkpoint(tiny_llama).incompleteness() == (
        "2 tensor(s) that the llama architecture requires are missing, e.g. 'model.layers.1.mlp.down_proj.weight'"
    )


def test_a_complete_checkpoint_passes(tiny_sharded: Path) -> None:
    checkpoint = load_checkpoint(tiny_sharded)
    assert checkpoint.incompleteness() is None
    checkpoint.require_complete()


def test_a_patch_whose_output_would_be_incomplete_is_refused() -> None:
    from llm_retrofit.errors import PatchError
    from llm_retrofit.io.checkpoint import refuse_incomplete_output

    config = tiny_model().config.to_dict()
    tensors = dict(tiny_model().state_dict())
    refuse_incomplete_output(config, tensors)  # complete: nothing to say
    with pytest.raises(PatchError, match=r"would be incomplete \(config.json says num_hidden_layers=4 .*nothing was"):
        refuse_incomplete_output({**config, "num_hidden_layers": 4}, tensors)


@pytest.mark.parametrize(
    ("weight_map", "problem"),
    [
        (["model.norm.weight"], "'weight_map' must map each tensor name to the file holding it"),
        ({"model.norm.weight": 7}, "'weight_map' must map each tensor name to the file holding it"),
        ({"model.norm.weight": "../elsewhere.safetensors"}, "'weight_map' must map each tensor name to the file"),
    ],
)
def test_a_malformed_weight_map_is_refused(weight_map: object, problem: str, tiny_sharded: Path) -> None:
    (tiny_sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=f"is not a valid shard index: its {problem}"):
        load_checkpoint(tiny_sharded)


def test_a_symlink_loop_is_named_as_one_not_sent_to_the_hub(tmp_path: Path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(CheckpointError, match="a is a loop of symbolic links"):
        load_checkpoint(tmp_path / "a")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="dangling is a symbolic link to .*gone, which does not exist"):
        load_checkpoint(tmp_path / "dangling")
