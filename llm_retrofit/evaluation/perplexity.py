"""Long-document perplexity: `document_nll` for one document at one length (`iter_document_nll`: several, lazily),
`perplexity` for many documents at many lengths, and `evaluate` for everything `retrofit eval` reports.

The NLL of one forward pass is `modeling.nll` (the decoder alone, then the LM head a chunk of positions at a
time); this module cuts documents into the passes each protocol needs and sums them.

Protocols. "truncate": each document is cut to its first L tokens and scored in one forward pass (what LongRoPE and
YaRN report). "sliding": windows of L tokens every S tokens over the whole document, each scoring only the tokens the
previous window did not (Press et al., 2021; the Hugging Face perplexity guide, whose window loop is used as is, so a
document's last window may be shorter than L). A document shorter than L is skipped at L, in both, and counted.

BOS convention. Documents are tokenized as the model's tokenizer does by default (`add_special_tokens=True`). A
tokenizer that adds a BOS token (Llama 2, Mistral) makes it every document's first token: it conditions the first
prediction and is itself never scored. One that adds none (SmolLM2) starts with the text's first token, which is not
scored either (nothing predicts it). Lengths count every token, BOS included, so truncating to L scores L - 1 tokens,
exactly as `model(ids, labels=ids)` does. Later sliding windows are plain slices of the same token stream (no BOS
re-inserted), as in the Hugging Face guide.

Shared prefixes. With "truncate", the first L tokens of a document are a prefix of its first L' > L tokens, and a
causal model's predictions for a prefix do not depend on what follows. So each document is run once, at the largest
length it is long enough for, and every smaller length is read off the same per-token NLL. This is exact only among
lengths at which positions are encoded the same way: each group of such lengths (`rope_length_classes`) gets its own
pass. LongRoPE (factors that switch at the original context length) has two groups, lengths up to the original
context and lengths past it; dynamic NTK gives every length past the original context its own pass.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EvaluationError
from ..modeling.nll import NLL, check_head, default_chunk_size, nll_rows, sequence_nll
from ..modeling.placement import placement_summary
from ..modeling.precision import arithmetic, check_autocast, inference_autocast
from ..modeling.rope import rope_depends_on_length, rope_length_classes, rotary_of
from .documents import Document
from .report import DocumentNLL, EvalResult, LengthResult, ModelResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

PROTOCOLS = ("truncate", "sliding")
DEFAULT_LENGTHS = (2048, 4096, 8192)
"""The lengths `evaluate` measures when none are given (what a recipe's eval step without `lengths` plans for)."""
DEFAULT_PROTOCOL = "truncate"
BOS_CONVENTION = "the tokenizer's default special tokens; a BOS token, if added, is context and never scored"


@dataclass(frozen=True)
class Window:
    """One forward pass over document tokens [start, end) that scores tokens [scored_from, end)."""

    start: int
    end: int
    scored_from: int


# -- protocols -------------------------------------------------------------------------------------------------------


def check_protocol(lengths: Sequence[int], protocol: str, stride: int | None) -> None:
    """Raise EvaluationError, saying what to pass instead, unless (lengths, protocol, stride) make sense."""
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}.")
    if not lengths or any(int(n) < 2 for n in lengths):
        raise EvaluationError(f"lengths {list(lengths)} must be one or more integers >= 2, e.g. 2048,8192,16384.")
    if protocol == "truncate" and stride is not None:
        raise EvaluationError("a stride is only used by the sliding protocol; pass protocol='sliding' or no stride.")
    if protocol == "sliding" and stride is not None and not 1 <= stride <= min(lengths):
        raise EvaluationError(
            f"stride {stride} must be between 1 and the smallest length ({min(lengths)}); a window moves by at most "
            "its own length, or tokens would go unscored."
        )


def windows(n_tokens: int, length: int, protocol: str = "truncate", stride: int | None = None) -> list[Window]:
    """The forward passes one document of `n_tokens` needs at `length`; [] if it is shorter than `length` (skipped).

    The sliding stride defaults to half the length.
    """
    check_protocol([length], protocol, stride)
    if n_tokens < length:
        return []
    if protocol == "truncate":
        return [Window(0, length, 1)]
    step = stride or max(1, length // 2)
    result, previous_end = [], 0
    for begin in range(0, n_tokens, step):  # the Hugging Face perplexity guide's loop
        end = min(begin + length, n_tokens)
        result.append(Window(begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == n_tokens:
            break
    return result


def document_nll(
    model: PreTrainedModel,
    token_ids: torch.Tensor | Sequence[int],
    length: int,
    *,
    protocol: str = "truncate",
    stride: int | None = None,
    chunk_size: int | None = None,
) -> NLL | None:
    """The NLL of one tokenized document at `length`, or None if it is shorter than `length`."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    found = [
        sequence_nll(model, ids[w.start : w.end], scored_from=w.scored_from - w.start, chunk_size=chunk_size)
        for w in windows(len(ids), length, protocol, stride)
    ]
    return sum(found, NLL()) if found else None


def iter_document_nll(
    model: PreTrainedModel,
    documents: Iterable[torch.Tensor | Sequence[int]],
    length: int,
    *,
    protocol: str = "truncate",
    stride: int | None = None,
    chunk_size: int | None = None,
) -> Iterator[NLL | None]:
    """`document_nll` of each document in turn, lazily: a caller may stop after any document, and the rest are
    never scored."""
    for ids in documents:
        yield document_nll(model, ids, length, protocol=protocol, stride=stride, chunk_size=chunk_size)


# -- many documents, many lengths ------------------------------------------------------------------------------------


def shares_prefixes(model: PreTrainedModel, lengths: Sequence[int]) -> bool:
    """Whether a prefix's NLL is the same whatever follows it, at these lengths: false where the rotary frequencies
    depend on the sequence length (transformers' dynamic NTK, LongRoPE's short/long switch)."""
    return not rope_depends_on_length(model, lengths)


@dataclass(frozen=True)
class _Job:
    """A window of one document, and which lengths its scored tokens count for: (length, scored tokens end here)."""

    document: int
    window: Window
    credits: tuple[tuple[int, int], ...]


def _plan(
    sizes: Sequence[int], lengths: Sequence[int], protocol: str, stride: int | None, classes: Sequence[Sequence[int]]
) -> list[_Job]:
    """The passes: with truncate, one per document per group of `classes` (lengths whose prefixes share a pass)."""
    jobs = []
    for doc, size in enumerate(sizes):
        if protocol == "truncate":
            for group in classes:
                fitting = [n for n in group if size >= n]
                if fitting:
                    jobs.append(_Job(doc, Window(0, max(fitting), 1), tuple((n, n) for n in sorted(fitting))))
            continue
        for n in (n for n in lengths if size >= n):
            jobs += [_Job(doc, w, ((n, w.end),)) for w in windows(size, n, protocol, stride)]
    # Longest windows first (peak memory shows at once), equal lengths together (so that they can share a batch).
    return sorted(jobs, key=lambda job: (-(job.window.end - job.window.start), job.document, job.window.start))


@dataclass
class PerplexityRun:
    """`perplexity`'s answer: one LengthResult per length, and what it cost."""

    lengths: list[LengthResult]
    seconds: float
    tokens_forwarded: int
    tokens_scored: int
    shared_prefixes: bool = False
    """Whether shorter lengths were read off the passes of longer ones (truncate, lengths with the same RoPE angles)."""


def perplexity(
    model: PreTrainedModel,
    documents: Sequence[torch.Tensor | Sequence[int]],
    lengths: Sequence[int],
    *,
    protocol: str = "truncate",
    stride: int | None = None,
    batch_size: int = 1,
    chunk_size: int | None = None,
    names: Sequence[str] | None = None,
    progress: bool = False,
    description: str = "perplexity",
) -> PerplexityRun:
    """Perplexity of tokenized `documents` at each length: NLL summed over all their scored tokens, then exp(mean).

    Windows of equal length are run `batch_size` at a time. With "truncate", each document is run once (see
    "Shared prefixes" above) unless the model's RoPE depends on the sequence length.
    """
    from ..io.progress import Progress

    lengths = sorted({int(n) for n in lengths})
    check_protocol(lengths, protocol, stride)
    if batch_size < 1:
        raise EvaluationError(f"batch_size {batch_size} must be at least 1.")
    docs = [torch.as_tensor(d, dtype=torch.long) for d in documents]
    names = list(names) if names is not None else [f"document {i}" for i in range(len(docs))]
    classes = rope_length_classes(model, lengths) if protocol == "truncate" else [[n] for n in lengths]
    share = any(len(group) > 1 for group in classes)
    if protocol == "truncate" and len(classes) > 1:
        log.info("the model's RoPE depends on the sequence length: lengths %s get a forward pass each", classes)
    jobs = _plan([len(d) for d in docs], lengths, protocol, stride, classes)
    totals: dict[int, dict[int, NLL]] = {n: {} for n in lengths}
    forwarded = 0
    bar = Progress(sum(j.window.end - j.window.start for j in jobs), f"eval {description}", "tok", unit_scale=True,
                   enabled=progress)
    start = time.perf_counter()
    try:
        for batch in _batches(jobs, batch_size):
            ids = torch.stack([docs[j.document][j.window.start : j.window.end] for j in batch])
            rows = nll_rows(model, ids, [j.window.scored_from - j.window.start for j in batch], chunk_size)
            for job, losses in zip(batch, rows):
                for length, end in job.credits:
                    count = end - job.window.scored_from
                    found = NLL(losses[:count].double().sum().item(), count)
                    totals[length][job.document] = totals[length].get(job.document, NLL()) + found
            forwarded += ids.numel()
            bar.update(ids.numel())
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    results = []
    for length in lengths:
        per_doc = totals[length]
        total = sum(per_doc.values(), NLL())
        results.append(LengthResult(
            length, total.total, total.tokens, skipped=len(docs) - len(per_doc),
            documents=[DocumentNLL(names[d], per_doc[d].total, per_doc[d].tokens) for d in sorted(per_doc)],
        ))
    return PerplexityRun(results, seconds, forwarded, sum(r.tokens for r in results),
                         shared_prefixes=protocol == "truncate" and share)


def _batches(jobs: list[_Job], batch_size: int) -> Iterator[list[_Job]]:
    batch: list[_Job] = []
    for job in jobs:
        if batch and (len(batch) == batch_size or _size(batch[0]) != _size(job)):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def _size(job: _Job) -> int:
    return job.window.end - job.window.start


def forward_lengths(
    config: Mapping[str, Any],
    sizes: Sequence[int],
    lengths: Sequence[int],
    *,
    protocol: str = "truncate",
    stride: int | None = None,
    passkey: bool = False,
    passkey_lengths: Sequence[int] | None = None,
    passkey_depths: Sequence[float] | None = None,
    passkey_trials: int = 1,
) -> list[int]:
    """The token counts of the forward passes `evaluate` runs on a model with this config.json over documents of
    `sizes` tokens: the passes `perplexity` plans (`_plan`, with the RoPE classes of the config's own rotary
    embedding) and one prompt of about its length per passkey cell. What a recipe prices before it runs anything."""
    from .passkey import DEFAULT_DEPTHS

    lengths = sorted({int(n) for n in lengths})
    classes = rope_length_classes(rotary_of(config), lengths) if protocol == "truncate" else [[n] for n in lengths]
    passes = [job.window.end - job.window.start for job in _plan(sizes, lengths, protocol, stride, classes)]
    if passkey:
        cells = len(passkey_depths if passkey_depths is not None else DEFAULT_DEPTHS) * passkey_trials
        key_lengths = sorted({int(n) for n in passkey_lengths}) if passkey_lengths else lengths
        passes += [n for n in key_lengths for _ in range(cells)]
    return passes


# -- the whole evaluation --------------------------------------------------------------------------------------------


def load_model(
    source: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
    revision: str | None = None, device_map: str | Mapping[str, Any] | None = None,
    max_memory: str | Mapping[Any, Any] | None = None, offload_folder: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, Any]:
    """A checkpoint directory or Hub repo id -> (model in eval mode, placed; its tokenizer or None).

    Placement (`modeling.placement`): whole on `device` when it fits there, else spread by accelerate over that
    device, CPU memory and disk; `device_map` (auto, balanced, sequential, or one device) and `max_memory`
    ("cuda:0=20GiB,cpu=64GiB") choose otherwise, `offload_folder` is where converted offloaded weights go. `dtype`
    defaults to the checkpoint's own ("auto").

    The options are checked first, then the checkpoint as `retrofit patch` checks it (`load_checkpoint`: a supported
    architecture, sizes that are positive integers, safetensors headers that describe their files; and every tensor
    the config requires), so that transformers never loads a model with randomly initialised weights where the
    checkpoint has none, nor fails with a traceback of its own. Every command that runs a local checkpoint (eval,
    search-rope, recipe eval steps, the longrope patch's search) loads it here.
    """
    from transformers import AutoTokenizer

    from ..io.checkpoint import load_checkpoint
    from ..io.progress import quiet_libraries
    from ..modeling.placement import check_placement, load_placed, placement_options
    from ..modeling.remote_code import runs_our_code

    check_placement(device, device_map, max_memory)  # before anything is read
    checkpoint = load_checkpoint(source, revision)
    checkpoint.require_complete()
    path = checkpoint.path
    dtype = dtype or "auto"
    sized = dtype if isinstance(dtype, torch.dtype) else None
    options = placement_options(checkpoint, sized or _stored_dtype(checkpoint), device=device, device_map=device_map,
                                max_memory=max_memory, offload_folder=offload_folder)
    with quiet_libraries():  # no weight-loading bar or library warnings for our own load
        # A checkpoint with an attention pattern runs it, through the modeling file the patch shipped (ours only).
        model = load_placed(path, dtype, options, runs_our_code(path, checkpoint.config))
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:  # no tokenizer files: fine if the caller passes token ids
            log.info("%s has no usable tokenizer (%s)", path, e)
            tokenizer = None
    return model, tokenizer


def _stored_dtype(checkpoint: Any) -> torch.dtype:
    """The widest floating-point dtype of the checkpoint's tensors (what "auto" loads them in, to size them)."""
    floats = [meta.dtype for meta in checkpoint.tensors.values() if meta.dtype.is_floating_point]
    return max(floats, key=lambda d: d.itemsize, default=torch.float32)


def tokenize(tokenizer: Any, documents: Sequence[str | Document | Sequence[int] | torch.Tensor]) -> tuple[list[torch.Tensor], list[str]]:
    """Token ids and names of documents given as texts, `Document`s or token ids (the BOS convention above)."""
    ids, names = [], []
    for index, document in enumerate(documents):
        if isinstance(document, (str, Document)):
            if tokenizer is None:
                raise EvaluationError("documents given as text need a tokenizer; pass tokenizer= or token ids.")
            text = document.text if isinstance(document, Document) else document
            ids.append(torch.tensor(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"], dtype=torch.long))
            names.append(document.name if isinstance(document, Document) else f"document {index}")
        else:
            ids.append(torch.as_tensor(document, dtype=torch.long))
            names.append(f"document {index}")
    return ids, names


def fingerprint(documents: Sequence[str | Document | Sequence[int] | torch.Tensor]) -> str:
    """XXH3-128 of the documents' texts (or token ids), in order: two runs compare only if they read the same text."""
    from xxhash import xxh3_128

    digest = xxh3_128()
    for document in documents:
        if isinstance(document, (str, Document)):
            digest.update((document.text if isinstance(document, Document) else document).encode())
        else:
            digest.update(torch.as_tensor(document, dtype=torch.long).numpy().tobytes())
        digest.update(b"\x00")
    return digest.hexdigest()


def _bos(tokenizer: Any) -> str:
    if tokenizer is None:
        return "token ids given; used as they are"
    first = tokenizer("a", add_special_tokens=True)["input_ids"][:1]
    if tokenizer.bos_token_id is not None and first == [tokenizer.bos_token_id]:
        return f"added by the tokenizer ({tokenizer.bos_token!r}, id {tokenizer.bos_token_id}); context, never scored"
    return "none (the tokenizer adds no BOS); the first token is context, never scored"


def evaluate(
    model_or_path: str | os.PathLike[str] | PreTrainedModel,
    documents: Sequence[str | Document | Sequence[int] | torch.Tensor],
    *,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    protocol: str = DEFAULT_PROTOCOL,
    stride: int | None = None,
    tokenizer: Any = None,
    max_docs: int | None = None,
    batch_size: int = 1,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: str | Mapping[str, Any] | None = None,
    max_memory: str | Mapping[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    passkey: bool = False,
    passkey_lengths: Sequence[int] | None = None,
    passkey_depths: Sequence[float] | None = None,
    passkey_trials: int = 1,
    name: str | None = None,
    progress: bool = True,
    autocast: str = "auto",
    chat: Sequence[Any] | None = None,
) -> EvalResult:
    """Perplexity at each length (and, with `passkey=True`, passkey retrieval accuracy) of one model.

    `model_or_path` is a checkpoint directory, a Hub repo id, or a loaded causal LM (then pass `tokenizer` for text
    documents; `dtype`, `device`, `device_map`, `max_memory` and `offload_folder` apply to paths only: see
    `load_model`). `documents` are texts, `Document`s (`load_documents`) or
    token ids. Passkey prompts are made at `passkey_lengths` (default: `lengths`) and `passkey_depths`. Results of
    several models are put side by side with `EvalResult.merge`. A path is loaded with `load_model`'s checks; a run
    that would measure nothing (no document as long as the shortest length, no passkey) is an EvaluationError.
    `autocast` (auto, bf16, off) is the arithmetic of a float32 model: see `modeling.precision`. `chat`
    (`evaluation.conversations.load_conversations`) adds the assistant-token perplexity of held-out conversations
    (evaluation/chat.py), the result's `chat`; with it, `documents` may be empty.
    """
    from .._version import __version__
    from .passkey import DEFAULT_DEPTHS, passkey_trials as run_passkey

    lengths = sorted({int(n) for n in lengths})
    check_protocol(lengths, protocol, stride)
    check_autocast(autocast)
    if isinstance(model_or_path, (str, os.PathLike)):
        model, loaded_tokenizer = load_model(model_or_path, dtype=dtype, device=device, device_map=device_map,
                                             max_memory=max_memory, offload_folder=offload_folder)
        tokenizer = tokenizer or loaded_tokenizer
        name = name or str(model_or_path)
    else:
        model = model_or_path
        name = name or getattr(model, "name_or_path", "") or type(model).__name__

    with inference_autocast(model, autocast):  # one arithmetic for the perplexity and the passkey
        check_head(model)
        documents = list(documents)[:max_docs]
        ids, names = tokenize(tokenizer, documents)
        if not passkey and not chat and all(len(i) < lengths[0] for i in ids):  # a report of nothing but skipped documents
            longest = max((len(i) for i in ids), default=0)
            raise EvaluationError(
                f"nothing to measure: none of the {len(ids)} document(s) is as long as the shortest length, "
                f"{lengths[0]} tokens (the longest has {longest}). Pass shorter lengths (--lengths) or longer documents."
            )
        run = perplexity(model, ids, lengths, protocol=protocol, stride=stride, batch_size=batch_size, names=names,
                         progress=progress, description=os.path.basename(str(name).rstrip("/")) or str(name))
        depths = list(passkey_depths if passkey_depths is not None else DEFAULT_DEPTHS)
        key_lengths = sorted({int(n) for n in passkey_lengths}) if passkey_lengths else lengths
        trials = []
        if passkey:
            if tokenizer is None:
                raise EvaluationError("passkey retrieval needs the model's tokenizer; pass tokenizer=.")
            trials = run_passkey(model, tokenizer, key_lengths, depths, passkey_trials, progress=progress)
        chat_result = None
        if chat:
            from .chat import chat_perplexity

            chat_result = chat_perplexity(model, tokenizer, chat, name=name)
    settings = {
        "lengths": lengths,
        "protocol": protocol,
        "stride": stride,
        "documents": len(ids),
        "documents_xxh3": fingerprint(documents),
        "max_docs": max_docs,
        "batch_size": batch_size,
        "bos": BOS_CONVENTION,
        "passkey": {"lengths": key_lengths, "depths": depths, "trials": passkey_trials} if passkey else None,
        **({"chat": _chat_settings(chat)} if chat else {}),
        "versions": {"llm_retrofit": __version__, "torch": torch.__version__, "transformers": _transformers_version()},
    }
    info = _model_info(model, tokenizer, autocast, run.shared_prefixes)
    return EvalResult(settings, [ModelResult(name, run.lengths, trials, run.seconds, run.tokens_forwarded,
                                             run.tokens_scored, info, chat_result)])


def _model_info(model: PreTrainedModel, tokenizer: Any, autocast: str, shared_prefixes: bool) -> dict[str, Any]:
    """What a result says about the model it measured and how: dtype, arithmetic, device, context, RoPE, BOS..."""
    from .gates import model_gates

    config = model.config.get_text_config()
    info = {
        "dtype": str(model.dtype).removeprefix("torch."),
        "arithmetic": arithmetic(model, autocast),
        "device": placement_summary(model),
        "context_length": getattr(config, "max_position_embeddings", None),
        "rope_parameters": getattr(config, "rope_parameters", None),
        "bos": _bos(tokenizer),
        "chunk_size": default_chunk_size(model),
        "shared_prefixes": shared_prefixes,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    gates = model_gates(model)
    if gates is not None:  # an Infini-attention model: where its memory gates stand (evaluation/gates.py)
        info["memory_gates"] = gates
    return info


def _chat_settings(conversations: Sequence[Any]) -> dict[str, Any]:
    from .chat import fingerprint as chat_fingerprint

    return {"conversations": len(conversations), "conversations_xxh3": chat_fingerprint(conversations),
            "scored": "assistant tokens only (the chat template's assistant turns, their end-of-turn token included)"}


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
