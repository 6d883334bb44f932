"""Lazy, tensor-by-tensor reading of Hugging Face checkpoints.

`load_checkpoint` opens a local directory (one `model.safetensors`, shards with `model.safetensors.index.json`, or
pickled `.bin` weights read with `weights_only=True`) or downloads a Hub repo id, and returns a `Checkpoint` that
knows every tensor's dtype and shape from the file headers alone. Tensor data is read only when asked for, one tensor
at a time, each through a memory map of its own bytes that is released with the tensor: no copy out of the page cache,
and a pass over a 100 GB checkpoint keeps only the few tensors in use resident (a map of the whole file, as
safetensors' `safe_open` makes, keeps every page it touched counted against the process until it is closed).
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..architectures import Architecture, architecture_of, split_layer_name
from ..errors import CheckpointError, PatchError
from .engine_config import write_config

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Files that hold weights (in any format). They are never copied blindly into a rewritten checkpoint: the output's
# own weight files replace them, and a stale copy of the old weights in another format would shadow or confuse.
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|h5|msgpack|ckpt)$|.*\.index\.json$")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class _Extent:
    """Where one tensor's bytes lie inside a safetensors file."""

    meta: TensorMeta
    start: int
    end: int


class SafetensorsFile:
    """One .safetensors file: a validated header, and positioned reads of single tensors."""

    def __init__(self, path: Path):
        self.path = path
        self.extents: dict[str, _Extent] = {}
        self._parse_header()

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is not a readable safetensors file: {why}. It is corrupt or truncated (an interrupted "
            "download or copy?); download or copy it again."
        )

    def _parse_header(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._corrupt(f"only {size} bytes long")
                header_len = int.from_bytes(prefix, "little")
                if header_len > min(MAX_HEADER_BYTES, size - 8):
                    raise self._corrupt(f"its header claims {header_len} bytes but the file has {size}")
                header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"its header is not JSON ({e})") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror}. Check that it exists and is readable.") from None
        if not isinstance(header, dict):
            raise self._corrupt("its header is not a JSON object")
        data_start = 8 + header_len
        data_size = size - data_start
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(_whole(d) for d in info["shape"])
                begin, end = (_whole(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"the header entry of {name!r} is malformed") from None
            meta = TensorMeta(dtype, shape)
            if any(d < 0 for d in shape) or not 0 <= begin <= end:
                raise self._corrupt(f"tensor {name!r} has a negative size or offsets {[begin, end]} out of order")
            if end > data_size:
                raise self._corrupt(f"tensor {name!r} ends at byte {end} of a {data_size}-byte data section")
            if end - begin != meta.nbytes:
                raise self._corrupt(f"tensor {name!r} has {end - begin} bytes, its shape needs {meta.nbytes}")
            self.extents[name] = _Extent(meta, data_start + begin, data_start + end)
        self._check_tiling(data_start, data_size)

    def _check_tiling(self, data_start: int, data_size: int) -> None:
        """The tensors must tile the data section exactly, as the safetensors library demands: overlapping tensors
        would read each other's bytes, and a gap or trailing bytes mean the header does not describe the file."""
        covered = 0
        for name, extent in sorted(self.extents.items(), key=lambda item: (item[1].start, item[1].end)):
            begin = extent.start - data_start
            if begin < covered:
                raise self._corrupt(f"tensor {name!r} starts at byte {begin}, inside the bytes of another tensor")
            if begin > covered:
                raise self._corrupt(f"bytes {covered} to {begin} of its data section belong to no tensor")
            covered = extent.end - data_start
        if covered != data_size:
            raise self._corrupt(f"its tensors end at byte {covered} of a {data_size}-byte data section")

    def read_raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 tensor backed by a private memory map of just those bytes.

        Mapping costs no copy (the pages come straight from the page cache), and the map is released as soon as
        the tensor is freed. ACCESS_COPY makes the buffer writable for torch without ever writing to the file.
        """
        extent = self.extents[name]
        if extent.end == extent.start:
            return torch.empty(0, dtype=torch.uint8)
        map_start = extent.start - extent.start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), extent.end - map_start, offset=map_start, access=mmap.ACCESS_COPY)
        return torch.frombuffer(mapped, dtype=torch.uint8, offset=extent.start - map_start, count=extent.end - extent.start)


class _PickledWeights:
    """One pytorch_model*.bin file, loaded with weights_only=True and memory-mapped (so still lazy)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.tensors: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many types here (pickle, zipfile, RuntimeError)
            raise CheckpointError(
                f"{path} could not be read as PyTorch weights ({type(e).__name__}: {e}). It is corrupt, truncated, or "
                "not a plain state dict (weights_only=True refuses arbitrary pickled code); obtain a clean copy."
            ) from None

    def read_raw(self, name: str) -> torch.Tensor:
        return raw_bytes(self.tensors[name])


class Checkpoint:
    """A Hugging Face causal-LM checkpoint directory, read lazily.

    `config` is the parsed config.json; `tensors` maps each stored tensor name to its dtype and shape, known without
    reading any data; `read(name)` loads one tensor.
    """

    def __init__(self, path: Path, source: str | None = None):
        self.path = path
        self.source = source or str(path)
        self.config: dict[str, Any] = _read_config(path)
        self._opened: dict[str, SafetensorsFile | _PickledWeights] = {}
        self._files: dict[str, SafetensorsFile | _PickledWeights] = {}
        self.weight_files: list[str] = []
        for file_name, names in self._weight_map().items():
            weights = self._open_weights(file_name)
            missing = [n for n in names if n not in _names_in(weights)]
            if missing:
                raise CheckpointError(
                    f"{path / file_name} lacks {len(missing)} tensor(s) the index promises, e.g. {missing[0]!r}. "
                    "The shard is incomplete; download or copy it again."
                )
            self.weight_files.append(file_name)
            for name in names:
                self._files[name] = weights

    def _weight_map(self) -> dict[str, list[str]]:
        """Weight file name -> the tensor names it holds, for whichever format the directory uses."""
        for single, index in ((SAFE_SINGLE, SAFE_INDEX), (BIN_SINGLE, BIN_INDEX)):
            if (self.path / single).is_file():
                return {single: list(_names_in(self._open_weights(single)))}
            if (self.path / index).is_file():
                try:
                    weight_map: dict[str, str] = json.loads((self.path / index).read_text())["weight_map"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    raise CheckpointError(
                        f"{self.path / index} is not a valid shard index (no JSON 'weight_map'); restore it from the "
                        "original checkpoint."
                    ) from None
                if not isinstance(weight_map, dict) or not all(
                    isinstance(f, str) and f == Path(f).name for f in weight_map.values()
                ):
                    raise CheckpointError(
                        f"{self.path / index} is not a valid shard index: its 'weight_map' must map each tensor name "
                        "to the file holding it; restore it from the original checkpoint."
                    )
                by_file: dict[str, list[str]] = {}
                for name, file_name in weight_map.items():
                    by_file.setdefault(file_name, []).append(name)
                return by_file
        raise CheckpointError(
            f"{self.path} has a config.json but no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or "
            f"{BIN_INDEX}. Copy the weight files next to config.json."
        )

    def _open_weights(self, file_name: str) -> SafetensorsFile | _PickledWeights:
        if file_name not in self._opened:
            file_path = self.path / file_name
            if not file_path.is_file():
                raise CheckpointError(
                    f"shard {file_name} named in the index of {self.path} is missing. The download or copy is "
                    "incomplete; fetch the missing shard."
                )
            self._opened[file_name] = (
                SafetensorsFile(file_path) if file_name.endswith(".safetensors") else _PickledWeights(file_path)
            )
        return self._opened[file_name]

    @cached_property
    def tensors(self) -> dict[str, TensorMeta]:
        return {name: _meta_in(weights, name) for name, weights in self._files.items()}

    @cached_property
    def architecture(self) -> Architecture:
        return architecture_of(self.config)

    @property
    def is_safetensors(self) -> bool:
        return all(name.endswith(".safetensors") for name in self.weight_files)

    def read_raw(self, name: str) -> torch.Tensor:
        """One tensor's bytes, as a flat uint8 tensor (what the fingerprint hashes)."""
        try:
            weights = self._files[name]
        except KeyError:
            raise CheckpointError(f"{self.source} has no tensor named {name!r}.") from None
        return weights.read_raw(name)

    def read(self, name: str) -> torch.Tensor:
        return decode(self.read_raw(name), self.tensors[name])

    def safetensors_file(self, name: str) -> SafetensorsFile | None:
        """The safetensors file holding `name`, for copying its bytes without decoding them; None for .bin."""
        weights = self._files[name]
        return weights if isinstance(weights, SafetensorsFile) else None

    def auxiliary_files(self) -> Iterator[Path]:
        """Top-level files that are not weights (tokenizer, generation config, chat template, card...)."""
        for entry in sorted(self.path.iterdir()):
            if entry.is_file() and not entry.name.startswith(".") and entry.name != "config.json":
                if not WEIGHT_FILE.match(entry.name):
                    yield entry

    def missing_tensors(self) -> list[str]:
        """Tensors the architecture requires that this checkpoint does not store.

        Layers (and experts) that config.json counts but the weights hold none of are listed up to the first such
        one only, so a config claiming 10^8 layers costs no more than one that claims one too many; the whole story
        is `incompleteness()`.
        """
        return missing_tensors(self.config, self.tensors)

    def incompleteness(self) -> str | None:
        """What makes this checkpoint incomplete, in one clause; None when it stores every tensor it needs."""
        return incompleteness(self.config, self.tensors)

    def require_complete(self) -> None:
        """Raise CheckpointError unless this checkpoint stores every tensor its architecture and config require:
        transformers would otherwise fill the gap with random weights and say nothing that stops a script."""
        problem = self.incompleteness()
        if problem:
            raise CheckpointError(
                f"{self.source} is incomplete: {problem}. Download or copy it again, or correct config.json if it "
                "describes another model."
            )

    @property
    def history(self) -> list[dict[str, Any]]:
        return list(self.config.get("retrofit_history", []))

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self._files)} tensors)"


# -- what a config promises, against what the weights hold -----------------------------------------------------------

_REQUIRED_SIZES = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
_OPTIONAL_SIZES = ("num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings",
                   "num_local_experts", "num_experts_per_tok", "sliding_window")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


DROPPED_BY_SAVE_PRETRAINED = ("attn_implementation",)
"""config.json keys transformers honours when loading but `save_pretrained` does not write back."""


def restore_dropped_config(directory: Path, source_config: Mapping[str, Any]) -> None:
    """Rewrite `directory/config.json` after a transformers `save_pretrained`: put back what it dropped from the
    source's config (the chosen attention kernel), so that our saves keep what a patch persisted, and the RoPE
    mirrors other readers need (`engine_config`), which it does not write either."""
    kept = {key: source_config[key] for key in DROPPED_BY_SAVE_PRETRAINED if source_config.get(key) is not None}
    write_config(directory, {**json.loads((directory / "config.json").read_text()), **kept})


def check_config_sizes(config: Mapping[str, Any], where: str) -> None:
    """Raise CheckpointError unless every size config.json gives is a positive integer (JSON `3`, not `"3"`, `3.0`
    or `1e8`) and the required ones are there: everything that loops over layers, heads or experts trusts them."""
    for key in _REQUIRED_SIZES + _OPTIONAL_SIZES:
        value = config.get(key)
        if value is None and key in _OPTIONAL_SIZES:
            continue
        if value is None:
            raise CheckpointError(
                f"{where} has no {key!r}, which every Llama-family config gives; restore it from the original "
                "checkpoint."
            )
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(
                f"{where}: {key} is {json.dumps(value)}, but it must be a positive integer (e.g. "
                f"\"{key}\": 32, without quotes or a decimal point); restore it from the original checkpoint."
            )


def _held(names: Iterable[str]) -> tuple[int, int]:
    """(layers, experts) the tensor names reach: one more than the largest index of each that a name holds."""
    layers = experts = 0
    for name in names:
        located = split_layer_name(name)
        if located is not None:
            layers = max(layers, located[0] + 1)
            expert = _EXPERT.search(name)
            if expert:
                experts = max(experts, int(expert.group(1)) + 1)
    return layers, experts


def missing_tensors(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> list[str]:
    """The tensors `architecture_of(config)` requires of a checkpoint with this config that `tensors` lacks, with the
    work bounded by what `tensors` holds (see `Checkpoint.missing_tensors`). Sizes are checked first."""
    check_config_sizes(config, "config.json")
    layers, experts = _held(tensors)
    bounded = dict(config, num_hidden_layers=min(config["num_hidden_layers"], layers + 1))
    if config.get("num_local_experts"):
        bounded["num_local_experts"] = min(config["num_local_experts"], experts + 1)
    return [name for name in architecture_of(config).expected_tensors(bounded) if name not in tensors]


def incompleteness(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> str | None:
    """Why a checkpoint with this config and these tensors is incomplete (one clause), or None if it is not."""
    missing = missing_tensors(config, tensors)
    if not missing:
        return None
    layers, experts = _held(tensors)
    if not tensors:
        return "it holds no tensors at all (an empty weight file or 'weight_map')"
    if config["num_hidden_layers"] > layers:
        return (f"config.json says num_hidden_layers={config['num_hidden_layers']} but the weights hold "
                f"{layers} layer(s), e.g. {missing[0]!r} is missing")
    if config.get("num_local_experts", 0) > experts:
        return (f"config.json says num_local_experts={config['num_local_experts']} but the weights hold {experts} "
                f"expert(s) per layer, e.g. {missing[0]!r} is missing")
    kind = config["model_type"]
    return f"{len(missing)} tensor(s) that the {kind} architecture requires are missing, e.g. {missing[0]!r}"


def refuse_incomplete_output(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> None:
    """Raise PatchError, before anything is written, if a patch's output plan lacks tensors its config requires."""
    problem = incompleteness(config, tensors)
    if problem:
        raise PatchError(
            f"the patched checkpoint would be incomplete ({problem}), so nothing was written. The source is complete "
            "and the patches are not: please report this with the --patch arguments used."
        )


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 tensor on the CPU (no copy when it already is contiguous on the CPU)."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def decode(raw: torch.Tensor, meta: TensorMeta) -> torch.Tensor:
    """The inverse of `raw_bytes`: reinterpret bytes as a tensor of the given dtype and shape."""
    return raw.view(meta.dtype).reshape(meta.shape)


def _whole(value: Any) -> int:
    """A JSON integer; a float, string or boolean in a header is malformed, not something to round."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(value)
    return value


def _names_in(weights: SafetensorsFile | _PickledWeights) -> Mapping[str, Any]:
    return weights.extents if isinstance(weights, SafetensorsFile) else weights.tensors


def _meta_in(weights: SafetensorsFile | _PickledWeights, name: str) -> TensorMeta:
    if isinstance(weights, SafetensorsFile):
        return weights.extents[name].meta
    tensor = weights.tensors[name]
    return TensorMeta(tensor.dtype, tuple(tensor.shape))


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        hint = " It holds a GGUF file: run `retrofit convert` on it first." if any(path.glob("*.gguf")) else ""
        raise CheckpointError(f"{path} has no config.json, so it is not a Hugging Face checkpoint directory.{hint}")
    try:
        config = json.loads(config_path.read_text(), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}); restore it from the original checkpoint.") from None
    except ValueError as e:  # NaN or Infinity: Python writes them, JSON has no such numbers and they break models
        raise CheckpointError(
            f"{config_path} holds {e}, which is not a JSON number and no model can compute with; restore the file from "
            "the original checkpoint (or redo the patch that wrote it with a finite value)."
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {config_path}: {e.strerror}. Check that it is readable.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object; restore it from the original checkpoint.")
    return config


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_checkpoint_dir(source: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local directory for `source`: the path itself, or a Hub snapshot downloaded (or found in the cache)."""
    from .commit import recover_interrupted_switch

    path = Path(source).expanduser()
    try:
        os.stat(path)
    except OSError as e:  # a loop is no Hub repo id, though it does not "exist"; nor can it be recovered
        if e.errno == errno.ELOOP:
            raise CheckpointError(
                f"{path} is a loop of symbolic links (one leads back to another, never to a directory); point the "
                "link at the checkpoint directory."
            ) from None
    recover_interrupted_switch(path)  # an in-place rewrite killed mid-switch may have left the path missing
    if not path.exists() and os.path.lexists(path):
        raise CheckpointError(
            f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; point it at the checkpoint "
            "directory."
        )
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            raise CheckpointError(f"{path} is a GGUF file; run `retrofit convert {path} OUT` to make a checkpoint.")
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json.")
        return path.resolve()
    if not _REPO_ID.match(str(source)) or str(source).startswith((".", "/", "~")):
        raise CheckpointError(f"{source} does not exist. Pass a checkpoint directory or a Hub repo id (owner/name).")
    return _download(str(source), revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    wanted = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "*.md", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=wanted))
    except GatedRepoError:
        fix = "accept its terms on the Hub, then log in (`hf auth login`) or set HF_TOKEN"
    except RepositoryNotFoundError:
        fix = "check the spelling; a private repo also needs `hf auth login` or HF_TOKEN"
    except RevisionNotFoundError:
        fix = f"revision {revision!r} does not exist; pass an existing branch, tag or commit"
    except LocalEntryNotFoundError:
        fix = "it is not in the local cache and the Hub cannot be reached (offline?); download it where there is network"
    except HfHubHTTPError as e:
        fix = f"the Hub answered {e}; try again later"
    raise CheckpointError(f"{repo_id!r} is not a local directory, and fetching it as a Hub repo failed: {fix}.")


def load_checkpoint(source: str | os.PathLike[str], revision: str | None = None) -> Checkpoint:
    """Open a checkpoint directory or Hub repo id lazily; no tensor data is read.

    If an earlier in-place rewrite of this directory was interrupted, it is finished or rolled back first.
    """
    path = resolve_checkpoint_dir(source, revision)
    # Provenance names a local checkpoint by its absolute path and a downloaded one by its repo id.
    checkpoint = Checkpoint(path, source=str(path) if Path(source).expanduser().exists() else str(source))
    checkpoint.architecture  # fail early, with the list of supported families
    check_config_sizes(checkpoint.config, str(checkpoint.path / "config.json"))
    return checkpoint
