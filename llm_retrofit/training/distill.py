"""Knowledge distillation for the finetune: the student learns the teacher's next-token distributions.

`distill: {teacher: PATH|base, temperature: T, alpha: a}` in a finetune (a recipe step, `retrofit finetune
--distill`) trains on

    loss = (1 - a) * LM + a * T^2 * mean_t KL(p_t || q_t)

where LM is the usual next-token cross-entropy of the student, p_t = softmax(teacher_logits_t / T) and q_t =
softmax(student_logits_t / T) at each position t that predicts a token (the LM loss's positions: all but the last of
a row), KL summed over the vocabulary and averaged over positions. So `alpha` weighs the KL side: 0 is the plain LM
finetune (exactly; the KL is still measured and logged), 1 is pure distillation. The KL is the forward one (teacher
first: the student must cover what the teacher thinks likely), and the T^2 factor (Hinton et al., "Distilling the
Knowledge in a Neural Network", 2015) keeps the size of its gradient roughly independent of T, since
d/dz [T^2 KL(p || softmax(z/T))] = T (q - p). `teacher: base` is the model before the patch: in a recipe, the
recipe's input model; otherwise the checkpoint the last patch in the history was applied to (checked against the
weights fingerprint that record holds, so a source rewritten in place since is refused, not silently used).

**Memory.** A long row's full-vocabulary logits are big (16k positions x 49k tokens x 4 B = 3.2 GB), and a KL
needs the student's and the teacher's, their log-softmaxes and a gradient. The student's forward computes no logits
at all; its final hidden states go through the LM head a chunk of positions at a time (`chunk_size`, the budget of
`modeling.nll`), with the LM loss, the KL and their gradients computed per chunk: training/head_loss.py, the
mechanism the plain finetune's loss uses too (alpha 0 is that loss exactly). Full-vocabulary rows therefore exist for
one chunk at a time, for both models.

**Top-k teacher, cached.** With `top_k: K` the teacher's distribution is kept as its K most likely tokens (log-probs
at temperature T, normalised over the whole vocabulary) plus the mass eps of all the others, and the KL is taken
over K + 1 outcomes, the others lumped into one (`kl_top_k`):

    KL_K = sum_{i in top K} p_i log(p_i / q_i) + eps log(eps / r),   r = 1 - sum_{i in top K} q_i

The bound (tested): coarse-graining never raises a KL, and the gap is exactly the tail's own divergence,

    0 <= KL - KL_K = eps * KL(p_tail / eps || q_tail / r)

(zero when the student's tail has the teacher's shape, so teacher == student still gives 0); and per position the
gradient with respect to the student's logits differs from the full KL's only on the tail tokens, by at most
T * 2 * eps in L1 norm (times the T^2 convention's T). eps is what the cache stores, and the run reports its mean
(`teacher_tail_mass`), so the truncation's cost is visible. With `cache: true` the top-k of each training row is
computed the first time the row is trained on and kept on disk beside the output (`OUTPUT.distill-cache/KEY/`), so
later epochs and re-runs do not run the teacher (a run that finds every row cached never loads it). KEY is a hash of
the teacher's weights fingerprint and config, the dtype it runs in, the packed training tokens (data, tokenizer and
seq_len), K and T: a cache made for anything else is never read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import FinetuneError, RetrofitError

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Bumped when what a cached row holds changes, so an older cache is not read as a newer one."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _error(message: str) -> RetrofitError:
    return FinetuneError(message)


# ------------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DistillSpec:
    """Distil a teacher into the finetuned model: `teacher` (a checkpoint directory, a Hub repo id, or `base`: the
    model before the patch), `temperature` T > 0, `alpha` in [0, 1] (the weight of the KL term; 1 - alpha weighs the
    LM loss), optionally `top_k` (keep the teacher's K most likely tokens and the mass of the rest) and `cache`
    (compute those once per training row and keep them on disk)."""

    name: ClassVar[str] = "distill"
    example: ClassVar[str] = "distill: {teacher: base, temperature: 2.0, alpha: 0.5}"

    teacher: str = ""
    temperature: float = 1.0
    alpha: float = 0.5
    top_k: int | None = None
    cache: bool | str = False
    """true: the top-k teacher log-probs are kept beside the output (OUTPUT.distill-cache/); a directory: there, so
    several runs (other outputs, budgets, students) share them."""

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher.strip():
            raise _error(f"distill: give the teacher, e.g. {self.example} (base: the model before the patch; or a "
                         "checkpoint directory or Hub repo id).")
        if not self.temperature > 0:
            raise _error(f"distill: temperature={self.temperature:g} must be above 0 (1 is the teacher's own "
                         "distribution, 2 a usual softer one).")
        if not 0 <= self.alpha <= 1:
            raise _error(f"distill: alpha={self.alpha:g} must be in [0, 1]: the weight of the KL term (1 - alpha "
                         "weighs the LM loss; 0 is a plain finetune).")
        if self.top_k is not None and self.top_k < 1:
            raise _error(f"distill: top_k={self.top_k} must be at least 1 (or null: the whole vocabulary).")
        if self.cache and self.top_k is None:
            raise _error("distill: cache: true stores the teacher's top_k log-probs per row (the full vocabulary "
                         "would be too big for the disk); give top_k too, e.g. top_k: 64.")

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def parse_distill(spec: DistillSpec | Mapping[str, Any] | str | None) -> DistillSpec | None:
    """A mapping (recipe YAML), `teacher=base,alpha=0.5` / `distill:teacher=...` (CLI) or a DistillSpec -> a
    DistillSpec, each value read by the spec language's one reader (`spec.read_fields`) as its field's annotation
    says; an unknown key, a bad value, a missing teacher: one FinetuneError."""
    from ..spec import parse_fields, read_fields

    if spec is None or isinstance(spec, DistillSpec):
        return spec
    if isinstance(spec, str):
        arguments = spec.strip().removeprefix("distill:")
        return parse_fields(DistillSpec, spec, arguments, FinetuneError)  # type: ignore[no-any-return]
    if not isinstance(spec, Mapping):
        raise _error(f"distill={spec!r} is not valid; expected a mapping such as {DistillSpec.example}.")
    return read_fields(DistillSpec, spec, error=FinetuneError)  # type: ignore[no-any-return]


def check_teacher(teacher: Any) -> None:
    """Refuse a teacher path that does not exist (before any step runs); `base` and Hub repo ids are resolved when
    the finetune starts. Anything that is not text (a value known only when run) waits for then."""
    if not isinstance(teacher, str) or teacher == "base":
        return
    path = Path(teacher).expanduser()
    if path.exists():
        if (path / "adapter_config.json").is_file():
            raise _error(f"distill: teacher={teacher} is a LoRA adapter directory; the teacher must be a full "
                         "checkpoint (train the adapter with lora merge: true, or pass the model it was trained on).")
        if not (path / "config.json").is_file():
            raise _error(f"distill: teacher={teacher} holds no config.json; pass a checkpoint directory.")
        return
    if _HUB_ID.match(teacher) and not teacher.startswith((".", "/", "~")):
        return  # a Hub repo id: found in the cache or downloaded when the finetune loads it
    raise _error(f"distill: teacher={teacher} does not exist; give a checkpoint directory, a Hub repo id, or base "
                 "(the model before the patch).")


def resolve_teacher(teacher: str, history: Sequence[dict[str, Any]], base: str | None) -> tuple[str, str | None]:
    """The checkpoint a DistillSpec's `teacher` names, and the weights fingerprint it must have (None: any).

    `base` is the recipe's input model when a recipe runs the finetune; without one, `teacher: base` is read from the
    history: the source of the latest record that is not itself training (finetune, lora)."""
    if teacher != "base":
        check_teacher(teacher)
        return teacher, None
    if base is not None:
        check_teacher(str(base))
        return str(base), None
    record = next((r for r in reversed(history) if r.get("patch") not in ("finetune", "lora")), None)
    if record is None or record.get("patch") == "convert":
        raise _error("distill: teacher: base means the model before the patch, but this checkpoint's history records "
                     "no patch; give teacher: PATH (a checkpoint directory or Hub repo id).")
    source = str(record.get("source") or "")
    if not Path(source).expanduser().exists() and not (_HUB_ID.match(source) and not source.startswith((".", "/"))):
        raise _error(f"distill: teacher: base is {source} (the source of the {record.get('patch')!r} patch in the "
                     "history), which no longer exists; give teacher: PATH.")
    check_teacher(source)
    return source, record.get("source_weights_xxh3")


# ---------------------------------------------------------------------------------------------------------- maths


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) per row (position), in fp32."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


@dataclass
class TopK:
    """A teacher's distribution at temperature T kept as its `k` most likely tokens per position: their ids, their
    log-probs normalised over the whole vocabulary, and `tail`, the probability of all the other tokens (eps)."""

    indices: torch.Tensor  # (N, k) long
    logprobs: torch.Tensor  # (N, k) float32
    tail: torch.Tensor  # (N,) float32

    def __getitem__(self, rows: slice) -> TopK:
        return TopK(self.indices[rows], self.logprobs[rows], self.tail[rows])

    def __len__(self) -> int:
        return self.tail.shape[0]

    def to(self, device: torch.device | str) -> TopK:
        return TopK(self.indices.to(device), self.logprobs.to(device), self.tail.to(device))

    @staticmethod
    def cat(parts: Sequence[TopK]) -> TopK:
        return TopK(*(torch.cat([getattr(p, f) for p in parts]) for f in ("indices", "logprobs", "tail")))


def top_k_of(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopK:
    """The teacher's top-k log-probs at temperature T; the tail mass is summed from the other tokens themselves
    (1 - sum of the top k would lose it to rounding when the top k hold nearly everything)."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    k = min(k, log_p.shape[-1])
    values, indices = log_p.topk(k, dim=-1)
    tail = log_p.scatter(-1, indices, float("-inf")).logsumexp(-1).exp()
    return TopK(indices, values, tail)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler's two branches)."""
    x = x.clamp(max=-1e-30)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_top_k(student_logits: torch.Tensor, teacher: TopK, temperature: float) -> torch.Tensor:
    """T^2 * KL over the teacher's top k tokens and one outcome for all others, per position (module docstring)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q_top = log_q.gather(-1, teacher.indices)
    p_top = teacher.logprobs.exp()
    head = (p_top * (teacher.logprobs - log_q_top)).sum(-1)
    # log r = log(1 - student's mass on the teacher's top k); clamped so a student with no tail left gives a large
    # finite loss, never inf (whose 0 * inf would turn an alpha of 0 into NaN).
    log_r = _log1mexp(log_q_top.logsumexp(-1)).clamp(min=-100.0)
    eps = teacher.tail
    tail = torch.where(eps > 0, eps * (eps.clamp(min=1e-38).log() - log_r), torch.zeros_like(eps))
    return temperature**2 * (head + tail)


TeacherChunks = Callable[[int, int], Any]
"""The teacher's side of positions [start, end): full logits (N, V), or a TopK."""


def _mix(lm: torch.Tensor, kl: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * lm + alpha * kl, with the ends exact: alpha 0 is the LM loss itself, not lm + 0 * kl."""
    if alpha == 0:
        return lm
    if alpha == 1:
        return kl
    return (1 - alpha) * lm + alpha * kl


@dataclass
class DistillLoss:
    total: torch.Tensor
    """(1 - alpha) * lm + alpha * kl, differentiable."""
    lm: torch.Tensor
    kl: torch.Tensor
    """T^2 * mean KL per position (over the top k and the rest, with top_k)."""
    tail: torch.Tensor | None = None
    """The teacher's mean probability outside its top k (with top_k): the truncation's eps."""


def distill_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, teacher: Any, *,
                 temperature: float, alpha: float, chunk: int) -> DistillLoss:
    """The distillation loss of final hidden states `hidden` (N, H) whose next tokens are `targets` (N,), through the
    LM head `head`, `chunk` positions at a time (training/head_loss.py, the plain finetune's mechanism too).
    `teacher` is the teacher's side of the same positions: its logits (N, V), a TopK, or a function of (start, end)
    giving either."""
    from .head_loss import IGNORE, chunked_head_loss

    source: TeacherChunks = teacher if callable(teacher) and not isinstance(teacher, (torch.Tensor, TopK)) else (
        lambda start, end: teacher[start:end])
    counted, positions = (targets != IGNORE).sum().clamp(min=1), targets.numel()

    def sums(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        lm = F.cross_entropy(logits, targets[start:end], ignore_index=IGNORE, reduction="sum")
        with torch.no_grad():
            target = source(start, end)
        kl = (kl_top_k(logits, target, temperature) if isinstance(target, TopK)
              else kl_full(logits, target, temperature)).sum()
        return torch.stack([lm, kl])

    def means(totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return totals[0] / counted, totals[1] / positions

    total, totals = chunked_head_loss(head, hidden, sums, lambda totals: _mix(*means(totals), float(alpha)), chunk)
    lm, kl = means(totals)
    tail = teacher.tail.mean() if isinstance(teacher, TopK) else None
    return DistillLoss(total, lm, kl, tail)


# -------------------------------------------------------------------------------------------------- the teacher


class Distiller:
    """The teacher side of a distillation finetune: resolves and checks the teacher, runs it (frozen, in inference
    mode, on the student's device) or reads its cached top-k, and computes the loss of a batch of rows.

    `student_config` is the student's config dict (the vocabularies must match), `rows` the packed training rows
    (their tokens are part of the cache key), `output` the finetune's output path (the cache goes beside it)."""

    def __init__(self, spec: DistillSpec, student_config: dict[str, Any], history: Sequence[dict[str, Any]],
                 rows: torch.Tensor, output: Path, device: torch.device,
                 base: str | os.PathLike[str] | None = None) -> None:
        from ..io.checkpoint import load_checkpoint
        from ..modeling.remote_code import runs_our_code
        from .dtypes import stored_dtype

        self.spec, self.device = spec, device
        path, expected = resolve_teacher(spec.teacher, history, None if base is None else os.fspath(base))
        self.checkpoint = load_checkpoint(path)
        self.checkpoint.require_complete()
        # The teacher is frozen: it runs in the dtype it is stored in (a bf16 teacher holds no float32 copy), under
        # the student's autocast where the finetune has one.
        self.dtype = stored_dtype(self.checkpoint)
        # Code that is not ours is refused here, not at a cache miss hours into training (and again at the load).
        runs_our_code(self.checkpoint.path, self.checkpoint.config)
        self.path = str(self.checkpoint.path)
        ours = _vocab_size(student_config)
        theirs = self.vocab_size = _vocab_size(self.checkpoint.config)
        if ours != theirs:
            raise _error(f"distill: the teacher {self.path} has a vocabulary of {theirs} tokens and the student "
                         f"{ours}; distillation compares next-token distributions, so both need the same tokenizer.")
        self.fingerprint = self._fingerprint() if (expected or spec.cache) else None
        if expected and self.fingerprint != expected:
            raise _error(f"distill: teacher: base is {self.path}, but it holds other weights than the patch was "
                         "applied to (was it patched in place, or changed since?); give teacher: PATH.")
        root = Path(spec.cache).expanduser() if isinstance(spec.cache, str) else _cache_directory(output)
        self.cache = TeacherCache(root, self._cache_key(rows)) if spec.cache else None
        self._model: Any = None
        self.tail_mass: list[float] = []
        if self.cache is None:
            self.model  # noqa: B018 -- a live teacher runs every step: loaded now, not inside the first step's time

    def _fingerprint(self) -> str:
        from ..io.provenance import Fingerprinter, WeightFiles

        known = WeightFiles(self.checkpoint).recorded_fingerprint(self.checkpoint.history)
        return Fingerprinter(self.checkpoint.tensors, self.checkpoint.read_raw, known=known).result()

    def _cache_key(self, rows: torch.Tensor) -> str:
        from xxhash import xxh3_128

        data = xxh3_128(memoryview(rows.contiguous().numpy())).hexdigest()
        what = {"format": CACHE_FORMAT, "teacher": self.fingerprint, "config": self.checkpoint.config,
                "dtype": str(self.dtype), "rows": list(rows.shape), "tokens": data, "top_k": self.spec.top_k,
                "temperature": self.spec.temperature}
        return xxh3_128(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def model(self) -> Any:
        """The teacher, loaded the first time it is needed (never, when every row is cached)."""
        if self._model is None:
            from ..io.progress import quiet_libraries
            from ..modeling.placement import load_placed, placement_options
            from ..modeling.remote_code import runs_our_code

            # A teacher with an attention pattern or Infini memory runs it, through the file the patch shipped (ours
            # only): as the plain architecture it would teach something it is not.
            trusted = runs_our_code(self.checkpoint.path, self.checkpoint.config)
            # Placed as eval places a model: whole on the student's device when it fits, else spread by accelerate
            # over that device, CPU memory and disk.
            options = placement_options(self.checkpoint, self.dtype, device=self.device)
            with quiet_libraries():
                model = load_placed(self.checkpoint.path, self.dtype, options, trusted)
            model.config.use_cache = False
            self._model = model.requires_grad_(False)
            log.info("distill: teacher %s loaded (%s)", self.path, self.dtype)
        return self._model

    def _hidden(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
        """The teacher's final hidden states at the positions that predict a token, (B * (T - 1), H), and its head."""
        from ..modeling.nll import decoder_and_head

        from ..modeling.devices import input_device

        decoder, head = decoder_and_head(self.model)
        with torch.inference_mode():
            hidden = decoder(input_ids=batch.to(input_device(self.model)), use_cache=False).last_hidden_state[:, :-1]
            hidden = hidden.to(self.device)  # a placed teacher's last layer may compute elsewhere
        # An ordinary tensor: inference tensors may not enter the student's autograd graph.
        return hidden.reshape(-1, hidden.shape[-1]).clone(), head

    def _top_k(self, batch: torch.Tensor, chunk: int) -> TopK:
        hidden, head = self._hidden(batch)
        parts = []
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk):
                parts.append(top_k_of(head(hidden[start:start + chunk]), self.spec.top_k or 0, self.spec.temperature))
        return TopK.cat(parts).to(self.device)

    def targets(self, rows: Sequence[int], batch: torch.Tensor, chunk: int) -> Any:
        """The teacher's side of a batch (its rows' indices and tokens): live logits chunk by chunk, or a TopK."""
        if self.spec.top_k is None:
            hidden, head = self._hidden(batch)
            return lambda start, end: head(hidden[start:end]).float().to(self.device)
        if self.cache is None:
            return self._top_k(batch, chunk)
        per_row, k = batch.shape[1] - 1, min(self.spec.top_k, self.vocab_size)
        found = {row: self.cache.get(row, per_row, k) for row in rows}
        missing = [i for i, row in enumerate(rows) if found[row] is None]
        if missing:
            computed = self._top_k(batch[missing], chunk)
            for n, i in enumerate(missing):
                found[rows[i]] = computed[n * per_row:(n + 1) * per_row]
                self.cache.put(rows[i], found[rows[i]])
        return TopK.cat([found[row] for row in rows]).to(self.device)

    def loss(self, network: Any, student: Any, batch: dict[str, torch.Tensor], rows: Sequence[int],
             chunk: int) -> DistillLoss:
        """The distillation loss of one micro-batch. `network` is what is trained (maybe DDP-wrapped, so the forward
        goes through it), `student` the unwrapped model whose decoder output is captured."""
        from .head_loss import student_outputs

        outputs = student_outputs(network, student, batch)
        result = distill_loss(outputs.head, outputs.hidden, outputs.targets,
                              self.targets(rows, batch["input_ids"], chunk), temperature=self.spec.temperature,
                              alpha=self.spec.alpha, chunk=chunk)
        if outputs.aux is not None and self.spec.alpha < 1:  # an MoE's router balance loss, on the LM side
            result.total = result.total + (1 - self.spec.alpha) * outputs.aux
            result.lm = result.lm + outputs.aux.detach()
        if result.tail is not None:
            self.tail_mass.append(result.tail.item())
        return result

    def summary(self) -> dict[str, Any]:
        """What the result JSON and the history record say about the distillation."""
        facts: dict[str, Any] = self.spec.params() | {"teacher_path": self.path}
        if self.tail_mass:
            facts["teacher_tail_mass"] = round(sum(self.tail_mass) / len(self.tail_mass), 6)
        if self.cache is not None:
            facts["cache_dir"] = str(self.cache.directory)
            facts["cache_rows_read"], facts["cache_rows_computed"] = self.cache.read, self.cache.written
        return facts


def _vocab_size(config: dict[str, Any]) -> int | None:
    return (config.get("text_config") or {}).get("vocab_size", config.get("vocab_size"))


def chunk_size(vocab_size: int) -> int:
    """Positions per chunk: the student's and the teacher's logits, their log-softmaxes and the gradient, about 8
    full-vocabulary fp32 rows per position."""
    from . import head_loss

    return head_loss.chunk_size(vocab_size, rows_per_position=8)


# ---------------------------------------------------------------------------------------------------------- cache


def _cache_directory(output: Path) -> Path:
    """Beside the output (which is written at the end, atomically), never inside it: the cache is not shipped."""
    output = Path(output).expanduser().absolute()
    return output.parent / f"{output.name}.distill-cache"


class TeacherCache:
    """One file per training row under DIRECTORY/KEY/, written atomically (a temporary file renamed), so a crash
    leaves a row cached or not, never half; a file that does not hold what this run expects is computed again."""

    def __init__(self, root: Path, key: str) -> None:
        self.directory = root / key
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _error(f"distill: cannot create the teacher cache {self.directory}: {e.strerror}; give cache: DIR "
                         "(a writable directory) or cache: false.") from None
        self.read = self.written = 0

    def _path(self, row: int) -> Path:
        return self.directory / f"row-{row:08d}.pt"

    def get(self, row: int, positions: int, k: int) -> TopK | None:
        path = self._path(row)
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            found = TopK(stored["indices"].long(), stored["logprobs"], stored["tail"])
        except Exception as e:  # a file cut short by a crash, or not ours: computed again below
            log.warning("distill: cached row %s is unreadable (%s); computing it again", path, e)
            return None
        if found.indices.shape != (positions, k) or found.logprobs.shape != (positions, k) or len(found) != positions:
            log.warning("distill: cached row %s has the wrong shape; computing it again", path)
            return None
        self.read += 1
        return found

    def put(self, row: int, values: TopK) -> None:
        path = self._path(row)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"indices": values.indices.to(torch.int32).cpu(), "logprobs": values.logprobs.float().cpu(),
                    "tail": values.tail.float().cpu()}, temporary)
        os.replace(temporary, path)
        self.written += 1
