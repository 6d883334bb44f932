"""Documents to evaluate on: text files, directories of them, JSONL, a `datasets` dataset, or bundled text.

Every source becomes a list of `Document`s (a name saying where it came from, and its text), in a fixed order, so
that two runs, and two models in one run, see the same documents. Nothing here tokenizes: each model's tokenizer does
that (two models may not share one).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_FIELD = "text"
# Long documents that are always installed: the Python standard library's own documentation topics (`pydoc_data`),
# about 465k characters of English technical prose, joined in a fixed order into documents of at least this many
# characters (20k to 33k SmolLM2 tokens each), so that lengths up to 16k have real text to read.
BUNDLED_MIN_CHARS = 80_000
# A second domain, for a held-out evaluation on text unlike the training text: the standard library's own Python
# source (code, not prose), its top-level modules in file-name order, each after a `# file: NAME` line.
BUNDLED = {
    "bundled:python-docs": "the Python standard library's documentation topics (pydoc_data), in ~80k-character documents",
    "bundled:python-source": "the Python standard library's source code (its top-level modules), in ~80k-character "
                             "documents: code, another domain than python-docs",
}
# `SOURCE[i]` or `SOURCE[start:stop]` picks documents of a source by position (Python slice rules), so that one
# corpus can give disjoint training and held-out sets: `bundled:python-docs[1:]` to train, `[:1]` to evaluate.
SELECTION = re.compile(r"^(?P<source>.+)\[(?P<start>-?\d*)(?P<colon>:?)(?P<stop>-?\d*)\]$")


@dataclass(frozen=True)
class Document:
    """One document: `name` says where it came from (`path`, `path:LINE`, `dataset[INDEX]`); `text` is its content."""

    name: str
    text: str


def load_documents(sources: Iterable[str | os.PathLike[str]], max_docs: int | None = None) -> list[Document]:
    """Read every source in order, stopping after `max_docs` documents.

    A source is a text file, a JSONL file (one JSON object per line with a `text` field), a directory (its text and
    JSONL files, recursively, in sorted order), a saved `datasets` directory, a bundled corpus (BUNDLED:
    `bundled:python-docs`, `bundled:python-source`), or, where the `datasets` package is installed, a dataset name
    `NAME[:CONFIG][@SPLIT]` (split `test` unless given). Any source followed by `[i]` or `[start:stop]` gives only those of its documents (`bundled:python-docs[1:]`).
    """
    sources = [str(source) for source in sources]
    documents: list[Document] = []
    for source in sources:
        for document in _read_source(source):
            if max_docs is not None and len(documents) >= max_docs:
                return documents
            documents.append(document)
    if not documents:
        raise DataError(f"no documents found in {', '.join(sources) or 'no sources'}; pass files with text in them.")
    return documents


def _read_source(source: str) -> Iterable[Document]:
    selection = SELECTION.match(source)
    if selection and not Path(source).expanduser().exists():
        return _select(selection["source"], selection["start"], selection["colon"], selection["stop"])
    if source in BUNDLED:
        return bundled_documents(source)
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return _saved_dataset(path)
        return _directory(path)
    if path.is_file():
        return _jsonl(path) if path.suffix in JSONL_SUFFIXES else [Document(str(path), _read_text(path))]
    return _dataset(source)


def _select(source: str, start: str, colon: str, stop: str) -> list[Document]:
    documents = list(_read_source(source))
    if not colon:
        if not start:
            raise DataError(f"{source}[] selects nothing; write {source}[i] for one document or {source}[a:b] for several.")
        index = int(start)
        if not -len(documents) <= index < len(documents):
            raise DataError(
                f"{source}[{index}] is out of range: {source} holds {len(documents)} documents "
                f"(indices 0 to {len(documents) - 1}, or negative from the end)."
            )
        return [documents[index]]
    return documents[slice(int(start) if start else None, int(stop) if stop else None)]


def bundled_documents(name: str = "bundled:python-docs") -> list[Document]:
    """A bundled corpus (BUNDLED), its pieces joined in a fixed order into documents of >= BUNDLED_MIN_CHARS."""
    if name not in BUNDLED:
        raise DataError(f"no bundled documents {name!r}; the bundled ones are {', '.join(BUNDLED)}.")
    documents: list[str] = []
    current: list[str] = []
    for piece in _bundled_pieces(name):
        current.append(piece)
        if sum(map(len, current)) >= BUNDLED_MIN_CHARS:
            documents.append("\n\n".join(current))
            current = []
    if current:  # the remainder is too short to stand alone; it lengthens the last document
        documents[-1] = "\n\n".join([documents[-1], *current]) if documents else "\n\n".join(current)
    return [Document(f"{name}[{i}]", text) for i, text in enumerate(documents)]


def _bundled_pieces(name: str) -> Iterable[str]:
    if name == "bundled:python-docs":
        from pydoc_data.topics import topics

        return [topics[key].strip() for key in sorted(topics)]
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [f"# file: {path.name}\n{_read_text(path).strip()}" for path in sorted(stdlib.glob("*.py"))]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 or leave it out.") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}. Check that it exists and is readable.") from None


def _jsonl(path: Path) -> Iterable[Document]:
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number} is not JSON ({e.msg}); each line must be one JSON object.") from None
        text = record.get(TEXT_FIELD) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f'{path}:{number} has no string "{TEXT_FIELD}" field; each line must be {{"text": "..."}}.')
        yield Document(f"{path}:{number}", text)


def _directory(path: Path) -> Iterable[Document]:
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} files; put the documents there.")
    for file in files:
        yield from _jsonl(file) if file.suffix in JSONL_SUFFIXES else [Document(str(file), _read_text(file))]


def _require_datasets(source: str) -> None:
    if importlib.util.find_spec("datasets") is None:
        raise DataError(
            f"{source} is not a file or directory. Pass a text file, a directory of text files or a .jsonl file; "
            "a `datasets` dataset name needs `pip install datasets`."
        )


def _saved_dataset(path: Path) -> Iterable[Document]:
    _require_datasets(str(path))
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        split = "test" if "test" in data else next(iter(data))
        log.info("%s has splits %s; reading %r", path, list(data), split)
        data = data[split]
    return _records(data, str(path))


def _dataset(source: str) -> Iterable[Document]:
    """`NAME[:CONFIG][@SPLIT]` through `datasets.load_dataset` (from the local cache, or the Hub when online)."""
    _require_datasets(source)
    import datasets

    name, _, split = source.partition("@")
    name, _, config = name.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split or "test")
    except Exception as e:  # datasets raises many unrelated types for "not found"
        raise DataError(f"{source} is not a file or directory, and loading it as a dataset failed: {e}") from None
    return _records(data, f"{name}@{split or 'test'}")


def _records(data: Iterable[dict], label: str) -> Iterable[Document]:
    for index, record in enumerate(data):
        text = record.get(TEXT_FIELD)
        if not isinstance(text, str):
            raise DataError(f'{label}[{index}] has no string "{TEXT_FIELD}" column; pick a dataset with a text column.')
        if text.strip():  # datasets such as wikitext hold many empty rows
            yield Document(f"{label}[{index}]", text)
