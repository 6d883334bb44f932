"""What was done to a checkpoint: one record per applied patch, kept in config.json under `retrofit_history`.

Keeping the history in the config (rather than a side file) means it survives `save_pretrained` of a loaded model
and travels with every copy of the checkpoint. Each record names the patch and its parameters, the versions that
applied it, the time, and a fingerprint of the source weights.

The fingerprint is an XXH3-128 hash over every tensor's name, dtype, shape and the XXH3-128 hash of its bytes, in name
order: it does not depend on sharding or file format, and is the same for a checkpoint on disk and the same weights
loaded in Python. It identifies weights; it is not a security checksum. XXH3 because it is much faster than SHA-256
or BLAKE3 (measured in docs/ARCHITECTURE.md): with SHA-256 the fingerprint alone took longer than patching. The
tensors are hashed as the executor reads them, on a second thread, so it costs no extra read.

A patch that changes only the config links the weight files instead of rewriting them, and should read none of them
(for a 70B checkpoint, 140 GB to change a few lines of JSON). So its last record also carries a stamp (`STAMP_KEY`):
the fingerprint of the weights it left, and a cheap identity of each weight file it is valid for. The next patch of
that checkpoint takes the fingerprint from the stamp instead of reading, if every weight file and index still has
the stamped identity; `WeightFiles` says what that identity is and what it does and does not guarantee.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from xxhash import xxh3_128

from .._version import __version__
from .checkpoint import MAX_HEADER_BYTES, Checkpoint, TensorMeta

log = logging.getLogger(__name__)

HISTORY_KEY = "retrofit_history"
STAMP_KEY = "weights_on_disk"
"""Key of the stamp in the last history record: {"xxh3": fingerprint, "files": {file name: identity}}."""
# A file modified this recently could be modified again within the same timestamp tick (a few ms on ext4, 2 s on
# FAT and exFAT) without its mtime changing, after we looked at it: such a file is not stamped (git's "racy" files).
_RACY_NS = 2_000_000_000


class Fingerprinter:
    """Hashes each tensor once, when the executor happens to read it, on a background thread.

    `result()` hashes whatever was never read (tensors copied as raw bytes, or dropped) and combines the lot.
    """

    def __init__(
        self, tensors: dict[str, TensorMeta], read_raw: Callable[[str], torch.Tensor], known: str | None = None
    ):
        """`known`: the fingerprint, already established (`WeightFiles.recorded_fingerprint`); nothing is hashed."""
        self.tensors = tensors
        self.read_raw = read_raw
        self.known = known
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fingerprint")
        self._digests: dict[str, concurrent.futures.Future[bytes]] = {}

    def observe(self, name: str, raw: torch.Tensor) -> None:
        if self.known is None and name in self.tensors and name not in self._digests:
            self._digests[name] = self._pool.submit(_digest, raw)

    def result(self) -> str:
        if self.known is not None:
            self._pool.shutdown(wait=False)
            return self.known
        try:
            for name in self.tensors.keys() - self._digests.keys():
                self._digests[name] = self._pool.submit(lambda n=name: _digest(self.read_raw(n)))
            combined = xxh3_128()
            for name in sorted(self.tensors):
                meta = self.tensors[name]
                combined.update(f"{name}|{meta.dtype}|{list(meta.shape)}|".encode())
                combined.update(self._digests[name].result())
            return combined.hexdigest()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _digest(raw: torch.Tensor) -> bytes:
    return xxh3_128(memoryview(raw.numpy())).digest()


class WeightFiles:
    """The weight files of a checkpoint and their shard index, identified cheaply, without reading the weights.

    A file's identity is its device and inode (which file), its size and mtime in nanoseconds (which state of it), and
    the XXH3-128 of its safetensors header (for an index, of the whole index): a few stat fields and a header read.
    It is taken with fstat of the open file, so the stat and the header belong to the same file. If every file has
    the identity a stamp recorded, the stamped fingerprint is theirs:
    - every write to a file through the file system sets its mtime to the current time, and a file replaced by
      another (a new download, `cp` over it, `rsync`, `save_pretrained`) is a write or a new inode;
    - a hard link is the same inode, so the output of a config-only patch, whose weight files are links to the
      source's, has the source's identity, and its stamp is valid for both;
    - a copy (`cp -a`, another machine, a link that fell back to a copy) is a new inode on maybe another device, so
      it is read again once: safe, never wrong;
    - the ctime would also catch a restored mtime, but making a hard link changes it, and every config-only patch
      makes one, so it is not used.
    What the identity cannot see: a file changed in place whose mtime is then set back to the stamped nanosecond
    (`touch -r`, `os.utime`, a tool that restores times) while its header stays the same, i.e. only tensor data
    changed; a clock set back to before the stamped mtime; corruption beneath the file system (bit rot). The
    fingerprint identifies weights, it is not an integrity check; `touch` the weight files to have it recomputed. A
    file modified less than 2 s before it would be stamped is not stamped (see `_RACY_NS`). Only safetensors
    checkpoints are identified: a pickled `.bin` has no header that says where its tensors lie.
    """

    def __init__(self, checkpoint: Checkpoint):
        self.directory = checkpoint.path
        # Every index, not only the one the weights were read through: a change to any is a cheap reason to recompute.
        indexes = sorted(p.name for p in self.directory.glob("*.index.json"))
        self.names = [*checkpoint.weight_files, *indexes]
        self.identities = self._identify()  # before anything is read or linked

    def _identify(self) -> dict[str, dict[str, Any]] | None:
        identities = {}
        for name in self.names:
            identity = _identity(self.directory / name)
            if identity is None:
                return None
            identities[name] = identity
        return identities

    def recorded_fingerprint(self, history: Sequence[Mapping[str, Any]]) -> str | None:
        """The fingerprint the last record stamped, if these files are the ones it was stamped for; else None."""
        stamp = history[-1].get(STAMP_KEY) if history and isinstance(history[-1], Mapping) else None
        if not isinstance(stamp, Mapping) or not isinstance(stamp.get("xxh3"), str) or self.identities is None:
            return None
        recorded = stamp.get("files")
        if recorded != self.identities:
            recorded = recorded if isinstance(recorded, Mapping) else {}
            changed = [n for n in sorted({*self.identities, *recorded}) if self.identities.get(n) != recorded.get(n)]
            log.debug("recomputing the weights fingerprint of %s: %s changed since it was recorded",
                      self.directory, ", ".join(changed))
            return None
        log.debug("reusing the weights fingerprint recorded for %s: its weight files are unchanged", self.directory)
        return stamp["xxh3"]

    def stamp(self, fingerprint: str) -> dict[str, Any] | None:
        """A stamp saying these files have `fingerprint`, or None if that cannot be vouched for.

        `fingerprint` must have been taken (read or reused) from these files after they were identified; if their
        identity is still the same now, nothing changed them in between.
        """
        if self.identities is None or self._identify() != self.identities:
            return None
        recent = time.time_ns() - _RACY_NS
        if any(identity["mtime_ns"] > recent for identity in self.identities.values()):
            return None
        return {"xxh3": fingerprint, "files": self.identities}


def _identity(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if path.name.endswith(".safetensors"):
                prefix = f.read(8)
                header = prefix + f.read(min(int.from_bytes(prefix, "little"), MAX_HEADER_BYTES))
            elif path.name.endswith(".index.json"):
                header = f.read()
            else:
                return None
    except OSError:
        return None
    return {
        "bytes": info.st_size, "mtime_ns": info.st_mtime_ns, "device": info.st_dev, "inode": info.st_ino,
        "header_xxh3": xxh3_128(header).hexdigest(),
    }


def with_stamp(history: Sequence[Any], stamp: Mapping[str, Any] | None) -> list[Any]:
    """`history` with `stamp` on its last record and on no other: only the last can describe the files as they are."""
    records = [
        {k: v for k, v in record.items() if k != STAMP_KEY} if isinstance(record, Mapping) else record
        for record in history
    ]
    if records and isinstance(records[-1], dict) and stamp is not None:
        records[-1][STAMP_KEY] = dict(stamp)
    return records


def make_records(patches: Iterable[tuple[str, dict[str, Any]]], source: str, source_hash: str) -> list[dict[str, Any]]:
    """One record per (patch name, {"params": ..., other notes...}) entry."""
    applied_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return [
        {
            "patch": name,
            **entry,
            "source": source,
            "source_weights_xxh3": source_hash,
            "time": applied_at,
            "versions": {"llm_retrofit": __version__, "transformers": version("transformers"), "torch": torch.__version__},
        }
        for name, entry in patches
    ]
