"""Streaming safetensors output: shards whose layout is fixed before the first byte is written.

The safetensors library can only save a dict of tensors that are all in memory. A plan knows the dtype and shape of
every output tensor in advance, so each shard's header can be written first and the tensors appended one by one as
they are computed; peak memory is one tensor, not one shard. The format is small (an 8-byte little-endian header
length, a JSON header padded to 8 bytes, the raw tensor bytes) and the files are checked by safetensors' own reader in
the tests.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import torch

from .checkpoint import SAFE_INDEX, SAFE_SINGLE, SAFETENSORS_NAMES, SafetensorsFile, TensorMeta
from ..errors import OutputError, output_error

DEFAULT_MAX_SHARD_SIZE = "5GB"


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(size: int | str) -> int:
    """Bytes in 123, "5GB" or "500MiB" (transformers' parser has the same units, but importing transformers is slow)."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        unit = match.group(2).upper() if match else ""
        value = int(float(match.group(1)) * _UNITS[unit or "B"]) if match and (unit or "B") in _UNITS else 0
    if value <= 0:
        raise OutputError(f"shard size {size!r} is not a size; write it like 2GB, 500MB or 5GiB.")
    return value


def layout_shards(tensors: Mapping[str, TensorMeta], max_shard_bytes: int) -> dict[str, list[str]]:
    """Output file name -> tensor names, filling shards in order; a tensor larger than the limit gets its own."""
    groups: list[list[str]] = [[]]
    filled = 0
    for name, meta in tensors.items():
        if groups[-1] and filled + meta.nbytes > max_shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += meta.nbytes
    if len(groups) == 1:
        return {SAFE_SINGLE: groups[0]}
    total = len(groups)
    return {f"model-{i:05d}-of-{total:05d}.safetensors": group for i, group in enumerate(groups, 1)}


def write_index(directory: Path, layout: Mapping[str, list[str]], tensors: Mapping[str, TensorMeta]) -> None:
    if list(layout) == [SAFE_SINGLE]:
        return
    index = {
        "metadata": {"total_size": sum(meta.nbytes for meta in tensors.values())},
        "weight_map": {name: file_name for file_name, names in layout.items() for name in names},
    }
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


class SafetensorsWriter:
    """Writes one safetensors file: the header at open, then each tensor's bytes in the header's order."""

    def __init__(self, path: Path, tensors: Mapping[str, TensorMeta]):
        self.path = path
        self._pending = deque(tensors.items())
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, meta in self._pending:
            header[name] = {
                "dtype": SAFETENSORS_NAMES[meta.dtype],
                "shape": list(meta.shape),
                "data_offsets": [offset, offset + meta.nbytes],
            }
            offset += meta.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(self._fd, len(encoded).to_bytes(8, "little") + encoded)
        except BaseException:  # a full disk, say: `with` never entered, so __exit__ would not close it
            os.close(self._fd)
            raise

    def _next(self, name: str) -> TensorMeta:
        expected, meta = self._pending.popleft()
        if expected != name:
            raise RuntimeError(f"{self.path}: wrote {name!r} where the header expects {expected!r}")
        return meta

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append a tensor; its dtype and shape are the ones the header promised (TensorTask.run checks that)."""
        if self._next(name).numel:
            raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            _write_all(self._fd, memoryview(raw.numpy()))

    def copy_raw(self, name: str, source: SafetensorsFile, source_name: str) -> None:
        """Append a tensor's bytes straight from another safetensors file, without decoding them (kernel copy)."""
        self._next(name)
        extent = source.extents[source_name]
        with open(source.path, "rb") as src:
            offset, remaining = extent.start, extent.end - extent.start
            while remaining:
                try:
                    copied = os.copy_file_range(src.fileno(), self._fd, remaining, offset)
                except OSError:  # some file systems refuse; fall back to an ordinary read and write
                    src.seek(offset)
                    copied = _write_all(self._fd, src.read(min(remaining, 64 << 20)))
                if copied == 0:
                    raise OutputError(f"{source.path} ended while copying {source_name!r}; it was truncated meanwhile.")
                offset += copied
                remaining -= copied

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        os.close(self._fd)
        if exc_type is None and self._pending:
            raise RuntimeError(f"{self.path}: {len(self._pending)} tensors were never written")


def _write_all(fd: int, data: bytes | memoryview) -> int:
    view = memoryview(data).cast("B")
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])
    return written


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise OutputError unless a file can be written at `path` (missing parent directories are created when the file
    is written), before any work is done to produce it. It is tried, not inferred from permission bits, which tell
    nothing for root, a read-only mount or /proc: a file is created and removed in the nearest existing directory
    (where the file, written as a new file renamed into place, will go). A device or pipe (/dev/stdout) passes."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; name a file inside it instead.")
    if path.exists() and not path.is_file():
        return
    directory = path.parent
    while not directory.exists() and not directory.is_symlink() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise OutputError(f"cannot write {path}: {directory} is not a directory; choose another location.")
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".retrofit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise output_error(path, e) from None
