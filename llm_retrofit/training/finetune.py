"""Short finetunes after a patch, on accelerate: one process by default, `accelerate launch` for several, unchanged.

A patch that adds capacity (new blocks, experts, a longer context) needs a few hundred steps of training to use it.
This module is that loop and nothing more: documents (`load_documents`) are tokenized, joined with EOS and packed
into sequences of `seq_len` tokens; a `steps` or `tokens` budget is trained with AdamW, a warmup + cosine/linear/
constant schedule, gradient accumulation, optional gradient checkpointing, optional shifted sparse attention
(LongLoRA's S2-Attn, for long sequences) and bf16 autocast where the device has it.

What trains is a *freeze spec* (`train`): `all`, or a list of aliases and regexes over parameter names, where
`new_layers` means the layers the `expand`/`dus` history of the checkpoint says are new (LLaMA-Pro trains only
those), `router` the MoE routers and `experts` the experts. Everything else keeps `requires_grad=False` and is saved
bit-identical. `lr_groups` gives parameters matching an alias or regex their own learning rate. Or a `lora` spec
(training/lora.py) trains a peft adapter, merged into the weights or saved as an adapter directory. A `distill`
spec (training/distill.py) adds a teacher: the loss mixes the LM loss with the KL to the teacher's next-token
distributions (`teacher: base` is the model before the patch), optionally from top-k teacher log-probs cached on disk.

Each process reads its own share of every batch; gradients are averaged by accelerate (DDP, or FSDP2 with `fsdp` or
`accelerate launch --use_fsdp`: a full finetune's weights, gradients and optimizer state sharded across the GPUs);
only the main process writes the output, atomically (a staging directory renamed at the end, see `commit`). The
result is recorded in the checkpoint's history like a patch.

Memory: the loss runs the LM head a chunk of positions at a time (training/head_loss.py), never over the whole
batch's full-vocabulary logits; what trains is float32 and what is frozen keeps the checkpoint's dtype under bf16
autocast (training/dtypes.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..io.progress import Progress, quiet_libraries
from ..modeling import shifted_sparse_attention
from ..errors import DataError, FinetuneError

log = logging.getLogger(__name__)


# Aliases a freeze spec or lr group may use; anything else is a regular expression searched in parameter names.
ALIASES = {
    "router": r"\.mlp\.gate\.weight$",
    "experts": r"\.mlp\.experts\.",
    "embed_tokens": r"(^|\.)embed_tokens\.",
    "norm": r"norm\.weight$",
    "lm_head": r"^lm_head\.",
    "attention": r"\.self_attn\.",
    "mlp": r"\.mlp\.",
}


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a finetune needs besides the model; the keys of a recipe's `finetune` step."""

    name: ClassVar[str] = "finetune"  # how the value reader's messages name these settings
    example: ClassVar[str] = "finetune: {steps: 200, lr: 1e-4}"

    data: tuple[str, ...] = ("bundled:python-docs",)
    max_docs: int | None = None
    data_format: Literal["auto", "text", "chat"] = "auto"
    """`chat`: conversations (evaluation/conversations.py, rows by training/chat.py) rendered with the model's chat
    template; `text`: documents; `auto`: chat when every source is chat data (bundled:python-chat, or JSONL rows
    with `messages` or `prompt` + `completion`), text when none is."""
    assistant_only_loss: bool = True
    """Chat data: the loss counts the assistant's tokens only (false: every token of the conversation)."""
    packing: bool = True
    """Chat data: several conversations to a row (attention kept within each), or one per row, padded per batch."""
    seq_len: int = 1024
    steps: int | None = None
    tokens: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_groups: dict[str, float] = field(default_factory=dict)
    train: tuple[str, ...] = ("all",)
    lora: Any = None
    """A LoraSpec, a lora spec string or dict; None for a full (or frozen-spec) finetune."""
    gradient_checkpointing: bool = False
    s2_attn: bool = False
    """Train with LongLoRA's shifted sparse attention (groups of seq_len/4): ~4x less attention work at long lengths;
    the saved model keeps full attention."""
    distill: Any = None
    """A DistillSpec, a mapping {teacher, temperature, alpha, top_k, cache} or `teacher=base,alpha=0.5` text; None
    for no teacher (training/distill.py: loss = (1 - alpha) * LM + alpha * T^2 * KL(teacher || student))."""
    bf16: Literal["auto", True, False] = "auto"
    fsdp: bool = False
    """Under several processes, shard the parameters, gradients and optimizer state across them (FSDP2 through
    accelerate, each decoder layer a unit) instead of replicating them (DDP); `accelerate launch --use_fsdp
    --fsdp_version 2` does the same. Nothing changes with one process."""
    eval_every: int = 0
    eval_sequences: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        self._read_values()
        if (self.steps is None) == (self.tokens is None):
            raise FinetuneError("finetune: give exactly one budget, steps=N or tokens=N (e.g. steps: 200).")
        for key in ("seq_len", "batch_size", "grad_accum", "steps", "tokens"):
            if getattr(self, key) is None:
                continue
            if getattr(self, key) < 1:
                raise FinetuneError(f"finetune: {key}={getattr(self, key)} must be at least 1.")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise FinetuneError(f"finetune: lr_schedule={self.lr_schedule!r}; choose cosine, linear or constant.")
        if self.s2_attn and shifted_sparse_attention.group_size(self.seq_len) is None:
            raise FinetuneError(f"finetune: s2_attn splits seq_len into 4 groups of an even size; seq_len={self.seq_len} "
                                "does not divide so (use a multiple of 8).")
        if self.bf16 not in ("auto", True, False):
            raise FinetuneError(f"finetune: bf16={self.bf16!r}; choose auto, true or false.")
        if self.data_format not in ("auto", "text", "chat"):
            raise FinetuneError(f"finetune: data_format={self.data_format!r}; choose auto, text or chat.")
        for key in ("assistant_only_loss", "packing", "fsdp"):
            if not isinstance(getattr(self, key), bool):
                raise FinetuneError(f"finetune: {key}={getattr(self, key)!r}; choose true or false.")
        if isinstance(self.data, str):
            object.__setattr__(self, "data", (self.data,))
        if isinstance(self.train, str):
            object.__setattr__(self, "train", (self.train,))
        if self.lora is not None:
            from .lora import parse_lora

            object.__setattr__(self, "lora", parse_lora(self.lora))
            if tuple(self.train) != ("all",):
                raise FinetuneError("finetune: with lora, what trains is the adapter (and lora's `trainable`); drop `train`.")
            if self.fsdp:
                raise FinetuneError("finetune: fsdp shards a full finetune; a LoRA finetune does not run sharded yet "
                                    "(drop fsdp: its processes run DDP).")
        if self.distill is not None:
            from .distill import parse_distill

            object.__setattr__(self, "distill", parse_distill(self.distill))

    def _read_values(self) -> None:
        """Every value read as its field's annotation says, by the spec language's one reader (`spec.read_field`):
        YAML reads `1e-4` (no dot) as text, `--set` values and the Python API may give text, and each is read as a
        spec's value is, or named with what it must be."""
        from ..spec import read_field

        for setting in dataclasses.fields(self):
            value = read_field(FinetuneSettings, setting.name, getattr(self, setting.name), FinetuneError)
            object.__setattr__(self, setting.name, value)

    def tokens_per_step(self, processes: int = 1) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * processes

    def total_steps(self, processes: int = 1) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.tokens / self.tokens_per_step(processes)))  # type: ignore[operator]

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["data"], values["train"] = list(self.data), list(self.train)
        values["lora"] = self.lora.params() if self.lora is not None else None
        values["distill"] = self.distill.params() if self.distill is not None else None
        return values

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class FinetuneResult:
    path: Path
    adapter: bool
    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    trainable_parameters: int
    lm_losses: list[float] = field(default_factory=list)
    """With distill: the LM part of each step's loss (`losses` is the mixed total)."""
    kl_losses: list[float] = field(default_factory=list)
    """With distill: each step's T^2 * KL to the teacher."""
    distill: dict[str, Any] | None = None
    """With distill: its settings, the teacher's path, the teacher's mean tail mass (top_k) and the cache's counts."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "adapter": self.adapter, "steps": self.steps, "tokens": self.tokens,
            "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 1),
            "first_loss": self.losses[0] if self.losses else None, "final_loss": self.losses[-1] if self.losses else None,
            "eval_losses": self.eval_losses, "trainable_parameters": self.trainable_parameters,
        } | ({"distill": self.distill | _ends("lm_loss", self.lm_losses) | _ends("kl", self.kl_losses)}
             if self.distill is not None else {})


def _ends(name: str, values: list[float]) -> dict[str, float | None]:
    return {f"first_{name}": values[0] if values else None, f"final_{name}": values[-1] if values else None}


# ------------------------------------------------------------------------------------------------ freeze specs


def new_layers_of(history: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the layers that patches added, in the numbering of the model after its whole history.

    Read from what each record declares, not from patch names: `layer_sources` (output layer j is a copy of input
    layer sources[j]; a copy of a new layer is new) and `new_layers` (outputs that start fresh, in the output's
    numbering). A record with `new_layers` alone (an insertion) renumbers the earlier new layers around them.
    """
    new: set[int] = set()
    for record in history:
        inserted = set(record.get("new_layers", ()))
        if "layer_sources" in record:
            new = {j for j, source in enumerate(record["layer_sources"]) if source in new} | inserted
        elif inserted:
            kept = [i for i in range(max(inserted | new | {0}) + len(inserted) + len(new) + 1) if i not in inserted]
            new = {kept[i] for i in new} | inserted
    return sorted(new)


def parameter_pattern(item: str, history: Sequence[dict[str, Any]]) -> re.Pattern[str]:
    """An alias (`router`, `new_layers`...) or a regular expression -> a pattern searched in parameter names."""
    if item == "new_layers":
        layers = new_layers_of(history)
        if not layers:
            raise FinetuneError(
                "finetune: train: new_layers, but this checkpoint's history records no expansion (patch `expand`); "
                "expand the model first or list what to train."
            )
        return re.compile(r"(^|\.)layers\.(" + "|".join(map(str, layers)) + r")\.")
    try:
        return re.compile(ALIASES.get(item, item))
    except re.error as e:
        raise FinetuneError(
            f"finetune: {item!r} is neither an alias ({', '.join(['new_layers', *ALIASES])}) nor a valid regex: {e}."
        ) from None


def apply_freeze_spec(model: torch.nn.Module, train: Sequence[str], history: Sequence[dict[str, Any]]) -> list[str]:
    """Set requires_grad from a freeze spec; returns the names of the trainable parameters."""
    names = [name for name, _ in model.named_parameters()]
    if list(train) == ["all"]:
        return names
    trainable: set[str] = set()
    for item in train:
        pattern = parameter_pattern(item, history)
        matched = {name for name in names if pattern.search(name)}
        if not matched:
            raise FinetuneError(
                f"finetune: train item {item!r} matches no parameter; aliases are {', '.join(['new_layers', *ALIASES])}, "
                f"anything else is a regex over names such as {names[len(names) // 2]!r}."
            )
        trainable |= matched
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    return [name for name in names if name in trainable]


def parameter_groups(
    model: torch.nn.Module, settings: FinetuneSettings, history: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """AdamW groups: each `lr_groups` entry's parameters at its lr (first match wins), the rest at `lr`."""
    patterns = [(parameter_pattern(key, history), float(lr)) for key, lr in settings.lr_groups.items()]
    groups: list[dict[str, Any]] = [{"params": [], "lr": lr} for _, lr in patterns] + [{"params": [], "lr": settings.lr}]
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        index = next((i for i, (p, _) in enumerate(patterns) if p.search(name)), len(patterns))
        groups[index]["params"].append(parameter)
    for (pattern, _), group in zip(patterns, groups):
        if not group["params"]:
            raise FinetuneError(f"finetune: lr_groups key {pattern.pattern!r} matches no trainable parameter.")
    return [g | {"weight_decay": settings.weight_decay} for g in groups if g["params"]]


# ------------------------------------------------------------------------------------------------------- data


def pack(tokenizer: Any, sources: Sequence[str], seq_len: int, max_docs: int | None = None) -> torch.Tensor:
    """Documents tokenized, each followed by EOS, concatenated and cut into rows of `seq_len` (the tail dropped)."""
    from ..evaluation.documents import load_documents

    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for document in load_documents(sources, max_docs=max_docs):
        ids += tokenizer(document.text, add_special_tokens=True, verbose=False)["input_ids"] + eos
    rows = len(ids) // seq_len
    if rows == 0:
        raise DataError(
            f"finetune: {', '.join(sources)} holds {len(ids)} tokens, fewer than one sequence of seq_len={seq_len}; "
            "add data or lower seq_len."
        )
    return torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


class DocumentRows:
    """Packed document rows (`pack`), read as chat rows are (`ChatRows`): a batch is its ids, its own labels."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ids.shape)

    def tokens(self, rows: Sequence[int]) -> int:
        return len(rows) * self.ids.shape[1]

    def batch(self, rows: Sequence[int], device: Any = None) -> dict[str, torch.Tensor]:
        ids = self.ids[list(rows)].to(device)
        return {"input_ids": ids, "labels": ids}

    def split(self, held_out: int) -> tuple[DocumentRows, DocumentRows]:
        cut = self.ids.shape[0] - held_out
        return DocumentRows(self.ids[:cut]), DocumentRows(self.ids[cut:])


def is_chat_data(settings: FinetuneSettings) -> bool:
    """Whether the finetune's sources are conversations (data_format, or with `auto` what the sources hold)."""
    if settings.data_format != "auto":
        return settings.data_format == "chat"
    from ..evaluation.conversations import is_chat_source

    kinds = {is_chat_source(source) for source in settings.data}
    if len(kinds) > 1:
        chat = [s for s in settings.data if is_chat_source(s)]
        raise DataError(f"finetune: {', '.join(chat)} hold conversations and the other sources documents; train on "
                        "one kind at a time (or set data_format: text to read them all as documents).")
    return kinds == {True}


def training_rows(tokenizer: Any, settings: FinetuneSettings, model: Any = "the model") -> Any:
    """DocumentRows (documents packed with EOS) or ChatRows (conversations, assistant tokens as labels)."""
    if not is_chat_data(settings):
        return DocumentRows(pack(tokenizer, settings.data, settings.seq_len, settings.max_docs))
    from ..evaluation.conversations import encode_all, load_conversations
    from .chat import chat_rows

    for key, what in (("distill", "a teacher"), ("s2_attn", "shifted sparse attention")):
        if getattr(settings, key):
            raise FinetuneError(f"finetune: {key} ({what}) does not train on chat data yet; drop {key} or train on "
                                "documents.")
    encoded = encode_all(tokenizer, load_conversations(settings.data, settings.max_docs), model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return chat_rows(encoded, settings.seq_len, packing=settings.packing, assistant_only=settings.assistant_only_loss,
                     pad_id=pad if pad is not None else 0)


def _batch_rows(total_rows: int, step: int, micro: int, settings: FinetuneSettings, rank: int, world: int) -> list[int]:
    """The row indices this process trains on at (step, micro-step): a fresh permutation of the data every epoch."""
    per_micro = settings.batch_size * world
    start = ((step * settings.grad_accum + micro) * per_micro) + rank * settings.batch_size
    rows = []
    for position in range(start, start + settings.batch_size):
        epoch, index = divmod(position, total_rows)
        rows.append(int(_epoch_order(total_rows, settings.seed + epoch)[index]))
    return rows


@functools.lru_cache(maxsize=2)
def _epoch_order(total_rows: int, seed: int) -> torch.Tensor:
    """The order of the rows in one epoch: the same in every process, so together they read each row once."""
    return torch.randperm(total_rows, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------- loss


class LanguageModelLoss:
    """The plain finetune's loss: the next-token cross-entropy on the batch's labels, as `model(**batch).loss`
    computes it, through the LM head a chunk of positions at a time (training/head_loss.py: never the logits of
    the whole batch)."""

    parts: tuple[str, ...] = ()

    def __init__(self, accelerator: Any, chunk: int) -> None:
        self.accelerator, self.chunk = accelerator, chunk

    def __call__(self, network: Any, student: Any, batch: dict[str, torch.Tensor],
                 rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, its logged parts: none here) of a micro-batch. `network` is what trains
        (maybe DDP-wrapped), `student` the unwrapped model, `rows` the batch's row indices (a teacher cache's keys)."""
        from .head_loss import language_model_loss, student_outputs

        with self.accelerator.autocast():  # the head runs outside the (autocast) forward
            loss = language_model_loss(student_outputs(network, student, batch), self.chunk)
        return loss, torch.zeros(0, device=batch["input_ids"].device)

    def facts(self, parts: dict[str, list[float]]) -> dict[str, Any]:
        return {}


class DistillationLoss:
    """Distillation (training/distill.py): the LM loss mixed with the KL to a teacher; logs both parts."""

    parts: tuple[str, ...] = ("lm", "kl")

    def __init__(self, distiller: Any, accelerator: Any, chunk: int) -> None:
        self.distiller, self.accelerator, self.chunk = distiller, accelerator, chunk

    def __call__(self, network: Any, student: Any, batch: dict[str, torch.Tensor],
                 rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with self.accelerator.autocast():  # the head runs outside the (autocast) forward
            loss = self.distiller.loss(network, student, batch, rows, self.chunk)
        return loss.total, torch.stack([loss.lm, loss.kl]).detach().float()

    def facts(self, parts: dict[str, list[float]]) -> dict[str, Any]:
        """What the history record and the result say besides the total loss: the final parts, the teacher."""
        return {"final_lm_loss": round(parts["lm"][-1], 5), "final_kl": round(parts["kl"][-1], 5),
                "distill": self.distiller.summary()}


FinetuneLoss = LanguageModelLoss | DistillationLoss


def loss_for(settings: FinetuneSettings, accelerator: Any, precision: str, checkpoint: Any, network: Any,
             rows: Any, output: Path, base: str | os.PathLike[str] | None) -> FinetuneLoss:
    """The loss the settings ask for; with distill, the teacher is checked and (unless cached) loaded here."""
    vocab_size = network.config.get_text_config().vocab_size
    if settings.distill is None:
        from .head_loss import chunk_size as head_chunk

        return LanguageModelLoss(accelerator, head_chunk(vocab_size, rows_per_position=4))
    from .distill import Distiller, chunk_size

    if _sharded(accelerator):
        # Not checked yet: the teacher's placement beside a sharded student (the chunked head itself runs under FSDP).
        raise FinetuneError("finetune: distill does not run under FSDP yet; launch with DDP (accelerate launch "
                            "--multi_gpu) or one process.")
    distiller = Distiller(settings.distill, dict(checkpoint.config), checkpoint.history, rows.ids, output,
                          accelerator.device, base)
    log.info("finetune: distilling %s (T=%g, alpha=%g%s)", distiller.path, settings.distill.temperature,
             settings.distill.alpha, f", top {settings.distill.top_k}" if settings.distill.top_k else "")
    return DistillationLoss(distiller, accelerator, chunk_size(vocab_size))


# ------------------------------------------------------------------------------------------------------- setup


@dataclass
class _Run:
    """Everything the loop and the save need, made by `_setup`."""

    settings: FinetuneSettings
    checkpoint: Any
    accelerator: Any
    tokenizer: Any
    network: Any
    """What is trained: the model (or its peft wrapper), prepared by accelerate (maybe DDP-wrapped)."""
    restore_attention: Callable[[], None]
    """Switches the model back to full attention after S2-Attn training (the saved model runs full attention)."""
    optimizer: Any
    scheduler: Any
    loss: FinetuneLoss
    train_rows: Any
    eval_rows: Any
    total_steps: int
    trainable: int
    saved_dtype: torch.dtype


def _setup(model: str | os.PathLike[str], output: Path, settings: FinetuneSettings,
           base: str | os.PathLike[str] | None) -> _Run:
    from transformers import AutoTokenizer, get_scheduler

    from ..io.checkpoint import load_checkpoint
    from .dtypes import stored_dtype

    checkpoint = load_checkpoint(model)
    checkpoint.require_complete()  # transformers would train randomly initialised weights in place of missing ones
    if settings.distill is not None:
        from .distill import resolve_teacher

        resolve_teacher(settings.distill.teacher, checkpoint.history, None if base is None else os.fspath(base))
    precision = mixed_precision(settings.bf16)
    accelerator = _accelerator(settings, precision, moe="num_local_experts" in checkpoint.config)
    _check_sharding(settings, accelerator)
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    network, restore_attention = _trainable_model(checkpoint, settings, precision)
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    data = training_rows(tokenizer, settings, checkpoint.path)
    held_out = settings.eval_sequences if settings.eval_every and data.shape[0] > settings.eval_sequences else 0
    train_rows, eval_rows = data.split(held_out)
    if settings.eval_every and not held_out:
        log.warning("finetune: %d sequences are too few to hold %d out for eval; no eval loss", data.shape[0],
                    settings.eval_sequences)
    loss = loss_for(settings, accelerator, precision, checkpoint, network, train_rows, output, base)
    optimizer = torch.optim.AdamW(parameter_groups(network, settings, checkpoint.history))
    network, optimizer = accelerator.prepare(network, optimizer)
    total = settings.total_steps(accelerator.num_processes)
    scheduler = get_scheduler(settings.lr_schedule if settings.lr_schedule != "constant" else "constant_with_warmup",
                              optimizer, num_warmup_steps=settings.warmup_steps, num_training_steps=total)
    log.info("finetune: %d steps of %d tokens, %d trainable parameters, %d sequences of %d, %s", total,
             settings.tokens_per_step(accelerator.num_processes), trainable, train_rows.shape[0], settings.seq_len,
             precision)
    return _Run(settings, checkpoint, accelerator, tokenizer, network, restore_attention, optimizer, scheduler, loss,
                train_rows, eval_rows, total, trainable, stored_dtype(checkpoint))


def _accelerator(settings: FinetuneSettings, precision: str, moe: bool) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    # An MoE batch may route no token to some expert: DDP must not wait for gradients that never come.
    unused = DistributedDataParallelKwargs(find_unused_parameters=moe)
    # accelerate keeps one AcceleratorState per process and refuses an Accelerator with another mixed precision than
    # the first one's; each finetune chooses its own (a recipe's bf16 finetune after a float32 one in the same
    # process), so the previous finetune's state is dropped. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    launched = os.environ.get("ACCELERATE_USE_FSDP")
    try:
        return Accelerator(gradient_accumulation_steps=settings.grad_accum, mixed_precision=precision,
                           kwargs_handlers=[unused], fsdp_plugin=_fsdp_plugin() if settings.fsdp else None)
    finally:  # accelerate records a plugin in the environment, where the next finetune in this process would read it
        if launched is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = launched


def _check_sharding(settings: FinetuneSettings, accelerator: Any) -> None:
    """FSDP asked for (`fsdp`, or `accelerate launch --use_fsdp`) but not given: accelerate 1.16 turns FSDP on only
    for process groups of GPUs and other accelerators (accelerate/state.py, AcceleratorState), and on CPU processes
    would silently run DDP, each process holding the whole model."""
    asked = settings.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and accelerator.num_processes > 1 and not _sharded(accelerator):
        raise FinetuneError(f"finetune: FSDP was asked for, but accelerate runs these {accelerator.num_processes} "
                            f"{accelerator.device.type} processes as {accelerator.distributed_type} (it shards only "
                            "across GPUs); drop fsdp (and --use_fsdp) to run DDP, or launch on GPUs.")


def _fsdp_plugin() -> Any:
    """FSDP2 as `accelerate launch --use_fsdp --fsdp_version 2` sets it up: each decoder layer (the model's
    `_no_split_modules`) a unit whose parameters are gathered for its forward and backward only, the embeddings,
    final norm and head a unit of their own (accelerate's FSDP2 layout), and the full state dict gathered to save."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                          reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")


def _trainable_model(checkpoint: Any, settings: FinetuneSettings, precision: str) -> tuple[Any, Callable[[], None]]:
    """The model with what trains marked (a freeze spec, or a LoRA adapter attached) and in float32, and the function
    that switches S2-Attn training back to full attention before saving. Frozen weights stay in the checkpoint's
    dtype (`frozen_dtype`)."""
    from transformers import AutoModelForCausalLM

    from ..modeling.remote_code import runs_our_code
    from .dtypes import frozen_dtype

    # A runtime patch's shipped code (Infini's memory and gates, an attention pattern) trains as it will run.
    trusted = runs_our_code(checkpoint.path, checkpoint.config)
    network = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=frozen_dtype(checkpoint, precision),
                                                   trust_remote_code=trusted)
    network.config.use_cache = False
    full_attention = shifted_sparse_attention.enable(network) if settings.s2_attn else None
    transformers_model = network  # before peft wraps it: where the attention implementation is switched back

    def restore_attention() -> None:
        if full_attention is not None:
            transformers_model.set_attn_implementation(full_attention)

    if settings.lora is not None:
        network = settings.lora.attach(network)
    else:
        apply_freeze_spec(network, settings.train, checkpoint.history)
    for parameter in network.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()  # float32 master weights: AdamW's small updates survive
    if settings.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns); both take the checkpoint() kwargs first, under other names.
        enable = getattr(network, "activation_checkpointing_enable", None) or network.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        network.enable_input_require_grads()
    return network, restore_attention


# ------------------------------------------------------------------------------------------------------- loop


@dataclass
class _Log:
    """What the loop measured: each step's loss (and the loss's parts), the eval losses, this process's tokens."""

    losses: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    """This process's real tokens: padding of chat rows is not counted."""
    seconds: float = 0.0


def _train(run: _Run) -> _Log:
    accelerator, settings = run.accelerator, run.settings
    measured = _Log(parts={name: [] for name in run.loss.parts})
    student = accelerator.unwrap_model(run.network)
    started = time.perf_counter()
    run.network.train()
    progress = Progress(run.total_steps, "finetune", "step", enabled=accelerator.is_main_process)
    for step in range(run.total_steps):
        loss, parts = _step(run, student, step, measured)
        run.scheduler.step()
        measured.losses.append(accelerator.reduce(loss, reduction="mean").item())
        shown = {"loss": f"{measured.losses[-1]:.4f}"}
        if run.loss.parts:
            for name, value in zip(run.loss.parts, accelerator.reduce(parts, reduction="mean").tolist()):
                measured.parts[name].append(value)
                shown[name] = f"{value:.4f}"
        elapsed = time.perf_counter() - started
        progress.set_postfix(**shown, tok_s=f"{measured.tokens * accelerator.num_processes / elapsed:.0f}")
        progress.update()
        if run.eval_rows.shape[0] and ((step + 1) % settings.eval_every == 0 or step + 1 == run.total_steps):
            measured.eval_losses.append((step + 1, _eval_loss(run, student)))
            log.info("finetune: step %d eval loss %.4f", step + 1, measured.eval_losses[-1][1])
    progress.close()
    measured.seconds = time.perf_counter() - started
    return measured


def _step(run: _Run, student: Any, step: int, measured: _Log) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of `grad_accum` micro-batches; returns its mean loss and mean loss parts (this process)."""
    accelerator, settings = run.accelerator, run.settings
    step_loss = torch.zeros((), device=accelerator.device)
    step_parts = torch.zeros(len(run.loss.parts), device=accelerator.device)
    for micro in range(settings.grad_accum):
        rows = _batch_rows(run.train_rows.shape[0], step, micro, settings, accelerator.process_index,
                           accelerator.num_processes)
        batch = run.train_rows.batch(rows, accelerator.device)
        measured.tokens += run.train_rows.tokens(rows)
        with accelerator.accumulate(run.network):
            loss, parts = run.loss(run.network, student, batch, rows)
            accelerator.backward(loss)
            if accelerator.sync_gradients and settings.max_grad_norm:
                accelerator.clip_grad_norm_(run.network.parameters(), settings.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad()
        step_loss += loss.detach() / settings.grad_accum
        step_parts += parts / settings.grad_accum
    return step_loss, step_parts


# ------------------------------------------------------------------------------------------------------- finetune


@quiet_libraries()  # our own loads and saves: no library bars or deprecation warnings
def finetune(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    settings: FinetuneSettings | None = None,
    *,
    base: str | os.PathLike[str] | None = None,
    **options: Any,
) -> FinetuneResult:
    """Finetune the checkpoint at `model` and write the result to `output` (a new directory).

    `settings` or keyword options are the `FinetuneSettings` fields (e.g. `steps=200, train=["new_layers"]`). Under
    `accelerate launch` every process calls this; only the main one writes. `base` is what `distill: {teacher:
    base}` names (a recipe passes its input model); without it, the checkpoint the last patch was applied to.
    """
    settings = settings or FinetuneSettings(**options)
    run = _setup(model, Path(output), settings, base)
    measured = _train(run)
    accelerator = run.accelerator
    tokens = int(accelerator.reduce(torch.tensor(measured.tokens, device=accelerator.device), reduction="sum").item())
    accelerator.wait_for_everyone()
    target = Path(output).expanduser()
    run.restore_attention()
    facts = {"steps": run.total_steps, "tokens": tokens, "final_loss": round(measured.losses[-1], 5)}
    facts |= run.loss.facts(measured.parts)
    # Under FSDP each process holds shards: the full weights are gathered (by every process) for the main one to write.
    weights = accelerator.get_state_dict(run.network) if _sharded(accelerator) else None
    if accelerator.is_main_process:
        _save(accelerator.unwrap_model(run.network), run.tokenizer, run.checkpoint, target, settings, run.saved_dtype,
              facts, weights)
    accelerator.wait_for_everyone()
    return FinetuneResult(target.resolve(), settings.lora is not None and not settings.lora.merge, run.total_steps,
                          tokens, measured.seconds, measured.losses, measured.eval_losses, run.trainable,
                          measured.parts.get("lm", []), measured.parts.get("kl", []), facts.get("distill"))


def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return bool(accelerator.distributed_type == DistributedType.FSDP)


def mixed_precision(bf16: Any) -> str:
    """bf16 autocast when asked, or with `auto` where the device multiplies bf16 natively (`native_bf16`: a CUDA GPU
    that has it, a CPU with AMX or AVX512-BF16; elsewhere bf16 is emulated and slower). On this machine's CPU (AMX),
    a LoRA + S2-Attn step of SmolLM2-135M at 4096 tokens took 62.9 s in float32 and 17.9 s under bf16 autocast."""
    from ..modeling.precision import native_bf16

    if bf16 == "auto":
        return "bf16" if native_bf16(torch.device("cuda" if torch.cuda.is_available() else "cpu")) else "no"
    return "bf16" if bf16 else "no"


@torch.no_grad()
def _eval_loss(run: _Run, student: Any) -> float:
    """The mean LM loss of the held-out rows (each process its share), a chunk of positions at a time."""
    from .head_loss import chunk_size, language_model_loss, student_outputs

    network, rows, accelerator = run.network, run.eval_rows, run.accelerator
    chunk = chunk_size(student.config.get_text_config().vocab_size, rows_per_position=2)
    network.eval()
    total = torch.zeros(2, device=accelerator.device)
    for row in range(accelerator.process_index, rows.shape[0], accelerator.num_processes):
        with accelerator.autocast():
            outputs = student_outputs(network, student, rows.batch([row], accelerator.device))
            loss = language_model_loss(outputs, chunk).float()
        total += torch.stack([loss, torch.ones((), device=total.device)])
    network.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


def _save(
    network: Any, tokenizer: Any, checkpoint: Any, target: Path, settings: FinetuneSettings, dtype: torch.dtype,
    facts: dict[str, Any], weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the merged/full checkpoint or the adapter directory to `target`, atomically, with its history record.
    `weights`: the full state dict gathered from FSDP's shards (None: the network holds its whole weights)."""
    from ..io.checkpoint import restore_dropped_config
    from ..io.commit import link_or_copy, staged_directory
    from ..io.provenance import HISTORY_KEY, Fingerprinter, WeightFiles, make_records

    # After a config-only patch (the usual step before a finetune) the weights' fingerprint is stamped: not re-read.
    known = WeightFiles(checkpoint).recorded_fingerprint(checkpoint.history)
    source_hash = Fingerprinter(checkpoint.tensors, checkpoint.read_raw, known=known).result()
    lora = settings.lora
    record_name = "lora" if lora is not None else "finetune"
    params = lora.params() if lora is not None else {
        "train": list(settings.train), "data": list(settings.data), "steps": facts["steps"], "seq_len": settings.seq_len,
        "lr": settings.lr, "data_format": "chat" if is_chat_data(settings) else "text",  # what `auto` found
    }
    if "distill" in facts:  # the card lists a record's params: the teacher and the final KL are shown there
        distill = facts["distill"]
        params["distill"] = {"teacher": distill["teacher_path"], "temperature": distill["temperature"],
                             "alpha": distill["alpha"], "top_k": distill["top_k"], "final_kl": facts["final_kl"]}
    finetune_facts = {k: v for k, v in settings.to_json().items() if k not in ("lora", "distill")} | facts
    record = make_records([(record_name, {"params": params, "finetune": finetune_facts})], checkpoint.source, source_hash)
    with staged_directory(target, in_place=False) as staging:
        # The tokenizer first: the source's files linked in below are the source's own, and saving over a link
        # would rewrite the source's tokenizer.
        tokenizer.save_pretrained(staging)
        if lora is not None and not lora.merge:
            network.peft_config["default"].base_model_name_or_path = _base_reference(checkpoint)
            network.save_pretrained(staging)
            (staging / "README.md").unlink(missing_ok=True)  # peft's template card; `retrofit card` writes ours
            (staging / "retrofit_finetune.json").write_text(json.dumps(record[0], indent=2, sort_keys=True) + "\n")
        else:
            if lora is not None:
                network = network.merge_and_unload()
            network.config.use_cache = True
            history = list(checkpoint.history) + record
            setattr(network.config, HISTORY_KEY, history)
            if weights is None:
                network.to(dtype).save_pretrained(staging)
            else:
                network.save_pretrained(staging, state_dict={name: t.to(dtype) for name, t in weights.items()})
            restore_dropped_config(staging, checkpoint.config)
            for auxiliary in checkpoint.auxiliary_files():
                if not (staging / auxiliary.name).exists() and auxiliary.name != "README.md":
                    link_or_copy(auxiliary, staging / auxiliary.name)
    log.info("finetune: wrote %s", target)


def _base_reference(checkpoint: Any) -> str:
    """What the adapter config names as its base: the Hub repo id the checkpoint came from, else its local path."""
    source = str(checkpoint.source)
    if not Path(source).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return source
    return str(checkpoint.path)
