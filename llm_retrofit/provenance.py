"""What was done to a checkpoint: one record per applied patch, kept in config.json under `retrofit_history`.

Keeping the history in the config (rather than a side file) means it survives `save_pretrained` of a loaded model
and travels with every copy of the checkpoint. Each record names the patch and its parameters, the versions that
applied it, the time, and a fingerprint of the source weights: a SHA-256 over every tensor's name, dtype, shape and
bytes in name order, so it does not depend on sharding or file format and is the same for a checkpoint on disk and
the same weights loaded in Python.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

import torch

from . import __version__
from .checkpoint import TensorMeta

HISTORY_KEY = "retrofit_history"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def fingerprint(tensors: dict[str, TensorMeta], read_bytes: Callable[[str], bytes | memoryview]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        meta = tensors[name]
        digest.update(f"{name}|{meta.dtype}|{list(meta.shape)}|".encode())
        digest.update(read_bytes(name) if meta.numel else b"")
    return digest.hexdigest()


def make_records(patches: Iterable[tuple[str, dict[str, Any]]], source: str, source_sha256: str) -> list[dict[str, Any]]:
    import transformers

    applied_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return [
        {
            "patch": name,
            "params": params,
            "source": source,
            "source_weights_sha256": source_sha256,
            "time": applied_at,
            "versions": {"llm_retrofit": __version__, "transformers": transformers.__version__, "torch": torch.__version__},
        }
        for name, params in patches
    ]
