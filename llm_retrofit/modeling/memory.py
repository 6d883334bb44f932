"""What a pass of a model holds in memory at its peak, before it runs: the memory plan of `--dry-run`.

`cost.py` prices a `Pass` in seconds; this module prices the same passes in bytes, so a recipe says before it starts
how much memory each step needs and refuses, with the option that fixes it, a step that cannot fit (`refusal`).

A pass holds, at its peak (`Footprint`):
- weights: the model as the step holds it. Evaluation, a search, a teacher and a LoRA base keep the checkpoint's
  own dtype; a full finetune holds float32 master weights; a calibration holds the embedding, then one decoder layer
  at a time, in float32 (the hidden states are carried from layer to layer, `modeling.activations`).
- training state: a gradient and two AdamW moments per trained parameter, float32 (4 + 4 + 8 bytes).
- activations: the largest of (a) one decoder layer's intermediate tensors at the pass's length and (b) one chunk of
  LM-head logits (`modeling.nll`'s budget: the head runs a chunk of positions at a time in eval, search and every
  training loss), plus the hidden states that live through the whole pass. Training keeps each layer's input for
  the backward pass (gradient checkpointing) or all of its intermediates (without), and the intermediates of the
  layer being recomputed.
- runtime: what torch, transformers and their thread pools hold once a model has run (`RUNTIME_BYTES`).

The per-token constants count the float32 tensors the Llama layer code makes (transformers' `LlamaMLP`,
`LlamaAttention` with SDPA) and were checked against peak RSS measured on SmolLM2-135M (docs/scale.md,
benchmarks/scale.py); tests/test_memory_plan.py holds each step's estimate to 25% of its measured peak.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .cost import Pass, Shape
from .nll import LOGITS_BUDGET_BYTES  # one chunk of LM-head logits and its log-softmax, in eval and training

RUNTIME_BYTES = 450 << 20
"""torch and transformers imported, a model's first forward run (thread pools, allocator arenas, kernels): measured
as the peak RSS of evaluating a tiny model, on an AVX2 EPYC, torch 2.13 CPU."""


ADAPTER_CHECKPOINT_VECTORS = 11
"""Hidden-size float32 vectors a LoRA step keeps per token and layer under gradient checkpointing (measured)."""


@dataclass(frozen=True)
class Footprint:
    """Bytes a pass holds at its peak, by kind."""

    weights: int
    training_state: int
    activations: int
    runtime: int = RUNTIME_BYTES
    placed: bool = False
    """The weights may be spread over CPU memory and disk by accelerate (a model run, not trained: eval, a search, a
    teacher), so only the rest must fit."""

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations + self.runtime

    def describe(self) -> str:
        placed = " placed over CPU memory and disk where short" if self.placed else ""
        parts = [("weights", self.weights, placed), ("training state", self.training_state, ""),
                 ("activations", self.activations, ""), ("runtime", self.runtime, "")]
        shown = [f"{name} {gigabytes(n)}{note}" for name, n, note in parts if n]
        return f"{gigabytes(self.total)} ({', '.join(shown)})"


def gigabytes(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def footprint(one: Pass) -> Footprint:
    """The peak memory of `one` pass (see the module docstring for what each part counts)."""
    shape = Shape.of(one.config)
    length = one.tokens
    if one.streamed:  # a calibration: the embedding, then one layer at a time, in float32
        carried = 2 * one.streamed * shape.hidden * 4  # each layer's input and output for every sequence
        held = 4 * max(shape.layer_params, shape.vocab * shape.hidden)
        return Footprint(held, 0, carried + _layer_forward(shape, length, 4))
    if not one.training:
        activation_bytes = 4 if shape.dtype_bytes == 4 else shape.dtype_bytes
        through = 2 * length * shape.hidden * activation_bytes  # the residual stream and the final hidden states
        peak = max(_layer_forward(shape, length, activation_bytes), LOGITS_BUDGET_BYTES)
        return Footprint(shape.params * shape.dtype_bytes, 0, through + peak, placed=True)
    return _training_footprint(one, shape)


def _training_footprint(one: Pass, shape: Shape) -> Footprint:
    length = one.tokens * one.rows
    if one.adapter_params is not None:  # LoRA: the base frozen in its own dtype, the adapter trained in float32
        weights, trained = shape.params * shape.dtype_bytes + 4 * one.adapter_params, one.adapter_params
    else:  # a full finetune: float32 master weights
        weights, trained = 4 * shape.params, shape.params
    # Gradient checkpointing keeps each layer's input; a LoRA step was measured to keep about eleven hidden-size
    # float32 vectors per token and layer instead (SmolLM2, peft 0.18, transformers 5.25, at 1024-4096 tokens: 10.7,
    # 12.4, 10.8), where a full finetune keeps about one. Why is not known; the plan counts what was measured.
    kept = (ADAPTER_CHECKPOINT_VECTORS if one.adapter_params is not None else 1) * length * shape.hidden * 4
    kept_per_layer = kept if one.checkpointing else _layer_saved(shape, length)
    recomputed = _layer_saved(shape, length) if one.checkpointing else 0
    # the backward of one layer holds its saved tensors, their gradients and the layer's input gradient
    backward = max(recomputed + _layer_forward(shape, length, 4), 3 * LOGITS_BUDGET_BYTES // 2)
    hidden_gradients = 2 * length * shape.hidden * 4
    activations = kept_per_layer * shape.layers + backward + hidden_gradients
    return Footprint(weights, 3 * 4 * trained, activations)


def _layer_forward(shape: Shape, length: int, nbytes: int) -> int:
    """One decoder layer's largest set of live intermediates in inference: the MLP's gate, up, activation and
    product (`intermediate` wide each) beside the normed input and the residual, or attention's q/k/v, their rotated
    copies and its output, whichever is larger."""
    mlp = 4 * shape.intermediate + 2 * shape.hidden
    attention = 2 * shape.attention_width + 3 * shape.hidden
    return length * max(mlp, attention) * nbytes


def _layer_saved(shape: Shape, length: int) -> int:
    """What autograd keeps of one layer for its backward, in float32: both norms' inputs and outputs, q/k/v and
    their rotated copies, the attention output and its log-sum-exp, and the MLP's gate, up and activation."""
    return length * (6 * shape.hidden + 2 * shape.attention_width + 3 * shape.intermediate) * 4


def step_footprint(passes: Iterable[Pass]) -> Footprint | None:
    """The largest footprint among a step's passes (they run one after another), None for a step that runs none."""
    # A step repeats the same Pass objects (a finetune's micro-steps): each is priced once. Passes are told apart by
    # identity, since their equality leaves out the config (two models of one length differ only there).
    found = [footprint(one) for one in {id(one): one for one in passes}.values()]
    return max(found, key=lambda f: f.total) if found else None


def shortfall(found: Footprint, device: str | torch.device | None = None) -> str | None:
    """Why `found` will not fit on `device` (default: where our commands run a model), or None if it fits or the
    free memory cannot be read. What counts is the whole footprint on the CPU, but for weights accelerate places
    (they go to disk when memory is short); on GPUs, the free memory of them all, since accelerate places a model
    across them."""
    from .precision import default_device

    where = torch.device(device or default_device())
    gpus = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] if where.type == "cuda" else [where]
    free = [available_bytes(gpu) for gpu in gpus]
    if any(n is None for n in free):
        return None
    total = sum(n for n in free if n is not None)
    needed = found.total - found.weights if found.placed else found.total
    if needed <= total:
        return None
    return f"needs about {found.describe()}, {'the GPUs have' if where.type == 'cuda' else 'this machine has'} " \
           f"{gigabytes(total)} free"


# ------------------------------------------------------------------------------------------- what the machine has


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory the next step can use on `device`: free GPU memory on a GPU; on the CPU, the memory the kernel says it
    can give without swapping (MemAvailable), capped by this process's cgroup limit. None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    found = _meminfo_available()
    limit = _cgroup_limit()
    candidates = [n for n in (found, limit) if n is not None]
    return min(candidates) if candidates else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_limit() -> int | None:
    """What this process's cgroup (v2 memory.max, v1 memory.limit_in_bytes) lets it add: the limit less the
    anonymous memory already in it (its page cache is given back under pressure, as MemAvailable counts it)."""
    try:
        groups = Path("/proc/self/cgroup").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    for entry in groups:
        _id, controllers, path = entry.split(":", 2)
        if controllers == "":
            root, limit_file, anonymous = f"/sys/fs/cgroup{path}", "memory.max", "anon"
        elif "memory" in controllers.split(","):
            root, limit_file, anonymous = f"/sys/fs/cgroup/memory{path}", "memory.limit_in_bytes", "total_rss"
        else:
            continue
        try:
            limit = Path(root, limit_file).read_text(encoding="ascii").strip()
            stat = dict(line.split() for line in Path(root, "memory.stat").read_text(encoding="ascii").splitlines())
        except (OSError, ValueError):
            continue
        if limit != "max" and int(limit) < 1 << 60:
            return max(0, int(limit) - int(stat.get(anonymous, 0)))
    return None
