"""Where a model came from: the base model's Hub repo id and license, found without any network access.

A history record's `source` is a Hub repo id (the model was downloaded), a local directory (maybe a Hugging Face
cache snapshot, `models--owner--name/snapshots/...`, which names its repo), or a GGUF file (whose metadata may name
the license and the repo it was converted from). The license also comes from a README.md's metadata: the local
directory's, or the cached card of a Hub model.
"""

from __future__ import annotations

import logging
import mmap
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CACHE_DIR = re.compile(r"models--([\w.-]+)--([\w.-]+)$")


@dataclass(frozen=True)
class Source:
    """Where the base model came from: a Hub repo id when it can be known, its license when a card says it."""

    name: str | None
    repo_id: str | None = None
    license: dict[str, str] = field(default_factory=dict)


def describe_source(source: str | None) -> Source:
    """Find the base model's repo id and license from a history record's `source` without any network access.

    A Hub id is itself the base; a directory in the Hugging Face cache (`models--owner--name/snapshots/...`) names
    it; a local directory's README.md or a GGUF file's metadata may give the license.
    """
    if not source:
        return Source(None)
    path = Path(source).expanduser()
    if not path.exists():
        if REPO_ID.match(source):
            return Source(source, source, _cached_card_license(source))
        return Source(source)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path)
    repo_id = None
    for part in (path, *path.parents):
        match = _HF_CACHE_DIR.search(part.name)
        if match:
            repo_id = f"{match.group(1)}/{match.group(2)}"
            break
    return Source(source, repo_id, license_of(card_metadata(path / CARD_FILE)))


def _cached_card_license(repo_id: str) -> dict[str, str]:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, CARD_FILE)
    return license_of(card_metadata(Path(cached))) if isinstance(cached, str) else {}


def _gguf_source(path: Path) -> Source:
    """A GGUF file's `general.license`, and its Hub repo when the converter recorded one."""
    wanted = ("general.license", "general.source.huggingface.repository", "general.base_model.0.repo_url")
    try:
        values = gguf_strings(path, wanted)
    except (OSError, ValueError, struct.error) as e:
        log.warning("could not read the metadata of %s (%s)", path, e)
        return Source(str(path))
    repo_id = None
    for key in wanted[1:]:
        value = values.get(key, "").removeprefix("https://huggingface.co/")
        if REPO_ID.match(value):
            repo_id = value
            break
    license_ = values.get("general.license")
    return Source(str(path), repo_id, {"license": license_} if license_ else {})


_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_strings(path: Path, keys: tuple[str, ...]) -> dict[str, str]:
    """The string values of `keys` in a GGUF file's key-value header, read directly.

    gguf's GGUFReader decodes the 100k-entry tokenizer arrays of SmolLM2 into Python objects first (slow, see
    docs/ARCHITECTURE.md); this skips over them. Layout: magic, version, tensor count, key-value count, then per pair a
    length-prefixed key, a value type and the value (arrays: element type, count, elements).
    """
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise ValueError("not a GGUF file")
        (count,) = struct.unpack_from("<Q", data, 16)
        offset, found = 24, {}

        def string(at: int) -> tuple[str, int]:
            (length,) = struct.unpack_from("<Q", data, at)
            return data[at + 8 : at + 8 + length].decode("utf-8", "replace"), at + 8 + length

        def skip(kind: int, at: int) -> int:
            if kind in _GGUF_SCALAR_BYTES:
                return at + _GGUF_SCALAR_BYTES[kind]
            if kind == _GGUF_STRING:
                return string(at)[1]
            if kind != _GGUF_ARRAY:
                raise ValueError(f"unknown GGUF value type {kind}")
            element, length = struct.unpack_from("<IQ", data, at)
            at += 12
            if element in _GGUF_SCALAR_BYTES:
                return at + length * _GGUF_SCALAR_BYTES[element]
            for _ in range(length):
                at = skip(element, at)
            return at

        for _ in range(count):
            key, offset = string(offset)
            (kind,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if key in keys and kind == _GGUF_STRING:
                found[key], offset = string(offset)
                if len(found) == len(keys):
                    break
            else:
                offset = skip(kind, offset)
        return found


def card_metadata(readme: Path) -> dict[str, Any]:
    """The YAML metadata of a README.md, or {} if there is none or it does not parse."""
    from huggingface_hub import ModelCard

    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, OSError, UnicodeDecodeError) as e:
        log.warning("ignoring the metadata of %s: %s", readme, e)
        return {}


def license_of(metadata: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(metadata[k]) for k in ("license", "license_name", "license_link") if metadata.get(k)}
