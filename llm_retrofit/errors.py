"""One exception hierarchy. Every message names the problem and says what to do about it."""

from __future__ import annotations


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
class PublishError(RetrofitError):
    """A model card cannot be written, or an upload to the Hugging Face Hub is refused or fails."""
