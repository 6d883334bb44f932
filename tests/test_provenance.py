"""The weights fingerprint of the history: a config-only patch reuses the one recorded for unchanged files.

A config-only patch links the weight files instead of rewriting them, so it should read none of them; it takes the
fingerprint from the stamp the previous patch left, but only while every weight file is provably the stamped one
(same inode, size, mtime and header). Anything else is read and hashed again.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import read_config
from llm_retrofit import load_checkpoint, patch
from llm_retrofit.io.checkpoint import SafetensorsFile
from llm_retrofit.io.inspect import describe, render
from llm_retrofit.io.provenance import HISTORY_KEY, STAMP_KEY, Fingerprinter

MINUTE_NS = 60 * 10**9


def age(directory: Path) -> Path:
    """Give every file of `directory` an mtime a minute in the past.

    Files modified in the last 2 s are never stamped (they could change again within the same timestamp tick), and a
    fixture was written milliseconds ago; a downloaded checkpoint is older than that.
    """
    for path in directory.iterdir():
        info = path.stat()
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns - MINUTE_NS))
    return directory


def full_read_fingerprint(path: Path) -> str:
    """The fingerprint computed the slow way, by reading and hashing every tensor."""
    checkpoint = load_checkpoint(path)
    return Fingerprinter(checkpoint.tensors, checkpoint.read_raw).result()


def last_record(path: Path) -> dict:
    return read_config(path)[HISTORY_KEY][-1]


@pytest.fixture
def tensor_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the tensors whose bytes are read from a safetensors file, by anyone, from now on."""
    reads: list[str] = []
    read_raw = SafetensorsFile.read_raw

    def counted(self: SafetensorsFile, name: str):  # type: ignore[no-untyped-def]
        reads.append(name)
        return read_raw(self, name)

    monkeypatch.setattr(SafetensorsFile, "read_raw", counted)
    return reads


@pytest.fixture
def stamped(tiny_sharded: Path, tmp_path: Path) -> Path:
    """A config-only patch of an (old enough) sharded checkpoint: its last record stamps its weight files."""
    output = patch(age(tiny_sharded), "yarn:factor=2", output=tmp_path / "stamped")
    assert STAMP_KEY in last_record(output)
    return output


def test_the_first_patch_of_a_fresh_checkpoint_fingerprints_by_reading(
    tiny_sharded: Path, tmp_path: Path, tensor_reads: list[str]
) -> None:
    tensors = load_checkpoint(tiny_sharded).tensors
    output = patch(age(tiny_sharded), "yarn:factor=2", output=tmp_path / "out")
    assert sorted(set(tensor_reads)) == sorted(tensors)  # nothing recorded: every tensor read
    tensor_reads.clear()
    assert last_record(output)["source_weights_xxh3"] == full_read_fingerprint(tiny_sharded)


def test_a_config_only_patch_of_a_stamped_checkpoint_reads_no_tensor_data(
    stamped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = full_read_fingerprint(stamped)

    def forbidden(self: SafetensorsFile, name: str) -> None:
        raise AssertionError(f"read the data of {name} of {self.path}")

    monkeypatch.setattr(SafetensorsFile, "read_raw", forbidden)
    output = patch(stamped, "dtype:to=float32", output=tmp_path / "again")  # float32 -> float32: config only
    record = last_record(output)
    assert record["source_weights_xxh3"] == expected
    # Its own output's files are the same links, so it is stamped in turn, with the same fingerprint.
    assert record[STAMP_KEY]["xxh3"] == expected


def test_a_config_only_patch_in_place_reuses_the_stamp_too(stamped: Path, tensor_reads: list[str]) -> None:
    expected = last_record(stamped)[STAMP_KEY]["xxh3"]
    patch(stamped, "dtype:to=float32", in_place=True)
    assert tensor_reads == []
    assert last_record(stamped)["source_weights_xxh3"] == expected
    assert last_record(stamped)[STAMP_KEY]["xxh3"] == expected


def test_a_weight_file_whose_bytes_changed_is_read_again(
    stamped: Path, tmp_path: Path, tensor_reads: list[str]
) -> None:
    shard = stamped / "model-00002-of-00017.safetensors"
    assert shard.is_file(), "the fixture's shard layout changed; pick another shard"
    extent = next(iter(SafetensorsFile(shard).extents.values()))
    before = shard.stat()
    with open(shard, "r+b") as f:  # same size, new bytes: a write through the file system sets the mtime
        f.seek(extent.start)
        data = f.read(16)
        f.seek(extent.start)
        f.write(bytes(b ^ 0xFF for b in data))
    assert shard.stat().st_size == before.st_size and shard.stat().st_mtime_ns != before.st_mtime_ns

    output = patch(stamped, "dtype:to=float32", output=tmp_path / "again")
    assert tensor_reads  # read again
    recorded = last_record(output)["source_weights_xxh3"]
    assert recorded != last_record(stamped)[STAMP_KEY]["xxh3"]
    assert recorded == full_read_fingerprint(stamped)


def test_a_weight_file_with_a_new_header_is_read_again_even_with_its_size_and_mtime_kept(
    tiny_llama: Path, tmp_path: Path, tensor_reads: list[str]
) -> None:
    """Two same-shaped tensors swap their data: only the header changes, and size and mtime are put back."""
    stamped = patch(age(tiny_llama), "yarn:factor=2", output=tmp_path / "stamped")
    shard = stamped / "model.safetensors"
    before = shard.stat()
    with open(shard, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        gate, up = header["model.layers.0.mlp.gate_proj.weight"], header["model.layers.0.mlp.up_proj.weight"]
        assert gate["shape"] == up["shape"] and gate["dtype"] == up["dtype"]
        gate["data_offsets"], up["data_offsets"] = up["data_offsets"], gate["data_offsets"]
        new = json.dumps(header, separators=(",", ":")).encode()
        assert len(new) <= length
        f.seek(8)
        f.write(new.ljust(length))  # safetensors pads its header with spaces
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = shard.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)

    tensor_reads.clear()
    output = patch(stamped, "dtype:to=float32", output=tmp_path / "again")
    assert tensor_reads  # read again
    recorded = last_record(output)["source_weights_xxh3"]
    assert recorded != last_record(stamped)[STAMP_KEY]["xxh3"]
    assert recorded == full_read_fingerprint(stamped)


def test_a_copy_is_another_file_and_is_read_again(stamped: Path, tmp_path: Path, tensor_reads: list[str]) -> None:
    """`cp -a` keeps size, mtime and header but not the inode: read once, since the stamp cannot vouch for it."""
    copy = shutil.copytree(stamped, tmp_path / "copy")  # copy2 keeps the mtimes
    output = patch(copy, "dtype:to=float32", output=tmp_path / "again")
    assert tensor_reads
    assert last_record(output)["source_weights_xxh3"] == last_record(stamped)[STAMP_KEY]["xxh3"]


def test_a_changed_shard_index_is_read_again(stamped: Path, tmp_path: Path, tensor_reads: list[str]) -> None:
    """The index says which tensors there are and where: it is part of the identity, like the headers."""
    index_path = stamped / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["edited_by"] = "hand"
    index_path.unlink()  # a link shared with the source: replace it, never write through it
    index_path.write_text(json.dumps(index))
    output = patch(stamped, "dtype:to=float32", output=tmp_path / "again")
    assert tensor_reads
    assert last_record(output)["source_weights_xxh3"] == last_record(stamped)[STAMP_KEY]["xxh3"]


def test_weights_written_moments_ago_are_not_stamped(tiny_sharded: Path, tmp_path: Path) -> None:
    """Within the same timestamp tick, a file can change again without its mtime changing."""
    for path in tiny_sharded.iterdir():
        os.utime(path)  # now
    output = patch(tiny_sharded, "yarn:factor=2", output=tmp_path / "out")
    assert STAMP_KEY not in last_record(output)


def test_rewritten_weights_are_not_stamped_and_only_the_last_record_has_a_stamp(
    stamped: Path, tmp_path: Path, tensor_reads: list[str]
) -> None:
    rewritten = age(patch(stamped, "dtype:to=bfloat16", output=tmp_path / "bf16"))
    history = read_config(rewritten)[HISTORY_KEY]
    assert [STAMP_KEY in record for record in history] == [False, False]
    # The rewrite's source was stamped, so its own fingerprint was reused; the executor still read what it cast.
    assert history[-1]["source_weights_xxh3"] == last_record(stamped)[STAMP_KEY]["xxh3"]
    tensor_reads.clear()
    output = patch(rewritten, "dtype:to=bfloat16", output=tmp_path / "again", force=True)  # config only now
    assert tensor_reads
    assert last_record(output)["source_weights_xxh3"] == full_read_fingerprint(rewritten)


def test_a_stamped_history_reads_as_before_in_inspect(stamped: Path) -> None:
    description = describe(load_checkpoint(stamped))
    assert [record["patch"] for record in description["history"]] == ["yarn"]
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render(description))
    assert last_record(stamped)["source_weights_xxh3"][:16] in console.export_text()


def test_the_identity_is_taken_before_the_fingerprint_so_a_change_during_the_patch_is_not_stamped(
    stamped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a weight file changes while it is being read, the fingerprint may be of neither state: no stamp."""
    shard = stamped / "model-00001-of-00017.safetensors"
    os.utime(shard, ns=(time.time_ns() - MINUTE_NS, time.time_ns() - 2 * MINUTE_NS))  # "changed", and not racy
    read_raw = SafetensorsFile.read_raw

    def touching(self: SafetensorsFile, name: str):  # type: ignore[no-untyped-def]
        os.utime(shard, ns=(time.time_ns() - MINUTE_NS, time.time_ns() - 3 * MINUTE_NS))
        return read_raw(self, name)

    monkeypatch.setattr(SafetensorsFile, "read_raw", touching)
    output = patch(stamped, "dtype:to=float32", output=tmp_path / "again")
    assert STAMP_KEY not in last_record(output)


def test_a_finetune_of_a_stamped_checkpoint_reuses_its_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finetune after a config-only patch (the long-context recipe's order) records the stamped fingerprint
    instead of reading the weights once more for it; transformers' own load does not go through our reader."""
    from conftest import char_tokenizer, save_tiny
    from llm_retrofit.training.finetune import finetune

    base = save_tiny(tmp_path / "base", max_position_embeddings=512)
    char_tokenizer().save_pretrained(base)
    extended = patch(age(base), "yarn:factor=2", output=tmp_path / "extended")
    expected = last_record(extended)[STAMP_KEY]["xxh3"]

    def forbidden(self: SafetensorsFile, name: str) -> None:
        raise AssertionError(f"read the data of {name} of {self.path} for the fingerprint")

    monkeypatch.setattr(SafetensorsFile, "read_raw", forbidden)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = finetune(extended, tmp_path / "tuned", data=[str(corpus)], steps=1, seq_len=32)
    assert last_record(out.path)["source_weights_xxh3"] == expected
