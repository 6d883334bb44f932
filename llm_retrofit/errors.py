"""One exception hierarchy. Every message names the problem and says what to do about it."""

from __future__ import annotations

import errno
import os


class RetrofitError(Exception):
    """Base class of every error llm-retrofit raises on purpose (the CLI prints these without a traceback)."""


class CheckpointError(RetrofitError):
    """A checkpoint cannot be found, read or trusted (missing, corrupt or truncated files)."""


class UnsupportedArchitectureError(RetrofitError):
    """The checkpoint's model_type is not one llm-retrofit knows how to rewrite."""


class PatchSpecError(RetrofitError):
    """A patch spec (`name:key=value,...`) is malformed, names an unknown patcher or key, or has a bad value."""


class PatchError(RetrofitError):
    """A valid patch cannot be applied to this particular model (e.g. it was already applied)."""


class OutputError(RetrofitError):
    """The output location cannot be used (exists, not writable, same as the source...)."""


class DataError(RetrofitError):
    """Evaluation documents cannot be read (missing path, not UTF-8, bad JSONL, no `text` field, no documents)."""


class EvaluationError(RetrofitError):
    """An evaluation cannot run as asked (bad lengths or stride, a model whose LM head it cannot reproduce...)."""


class FinetuneError(RetrofitError):
    """A finetune cannot run as configured (no budget, a freeze spec that matches nothing, too little data...)."""


class ExportError(RetrofitError):
    """A checkpoint cannot be written as GGUF: llama.cpp would compute another model (or read another tokenizer)."""


class PublishError(RetrofitError):
    """A model card cannot be written, or an upload to the Hugging Face Hub is refused or fails."""


# What the user can do about the ways writing fails that are the machine's, not ours. Here, beside OutputError, so
# that every room that writes (io's writer and commit, the command line) explains a failed write the same way.
_WRITE_FIXES = {
    errno.ENOSPC: "the disk is full; free space, or write the output to a disk with room",
    errno.EDQUOT: "the disk quota is used up; free space, or write the output elsewhere",
    errno.EFBIG: "the file system refuses a file this large; write to another one, or pass a smaller --max-shard-size",
    errno.EROFS: "the file system is read-only; write the output to a writable one",
    errno.EACCES: "permission denied; choose a location you may write to, or change its permissions",
    errno.EPERM: "the operation is not permitted there; choose a location you may write to",
    errno.ENOENT: "that directory takes no new files (or is gone); choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another location",
    errno.EISDIR: "it is a directory; name a file",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter path",
    errno.EIO: "the disk or network file system failed (an I/O error); check it, or write elsewhere",
}
WRITE_ERRNOS = frozenset(_WRITE_FIXES)
"""The errno values `output_error` explains: the command line reports an OSError with one of these as one line."""


def output_error(path: str | os.PathLike[str], error: OSError) -> OutputError:
    """One OutputError for a failed write: the path the user asked for (not an internal temporary), why, and the fix."""
    fix = _WRITE_FIXES.get(error.errno or 0, "choose another location")
    return OutputError(f"cannot write {path}: {error.strerror or error}; {fix}.")
