"""The training loss through the LM head, a chunk of positions at a time: the plain finetune's LM loss and
distillation's LM + KL are one mechanism.

**Why.** `model(**batch).loss` holds the full-vocabulary logits of every position, their float32 copy and their
gradient: at 16k positions and SmolLM2's 49,152 tokens that is 3.2 GB per float32 copy (Llama 3's 128k vocabulary at
64k tokens: 34 GB, more than the model). Here the student's forward computes no logits at all (`logits_to_keep` is
empty); its final hidden states are captured by a forward hook on the decoder (`student_outputs`) and go through the
head `chunk` positions at a time. For each chunk, the loss terms and their gradients with respect to the chunk's
hidden states and the head's trainable weights are computed at once (an inner `autograd.grad`), and the chunk's
logits are freed; backward only scales what was kept: one gradient of the hidden states and one of the head's
trainable weights. That is the same three matrix products per position as the unchunked loss (logits, gradient of
the hidden states, gradient of the weights): nothing is recomputed.

The head is called through its `forward` (`head.forward(states)`), not `head(states)`: under FSDP2 the head's module
hooks would otherwise unshard, reshard and reduce-scatter its group once per chunk, outside the forward; its
parameters are already unsharded there (accelerate shards the head with `reshard_after_forward=False`, and the
forward ran it on its empty slice), and their gradients reach FSDP's reduce-scatter at the end of the backward.

**Why not a library's fused kernel.** liger-kernel's `LigerFusedLinearCrossEntropyLoss` and Apple's
`cut-cross-entropy` fuse the head and the cross-entropy in Triton kernels: GPU only (the tests and the README's
command run on CPUs, which would need this code anyway), and they take the head's weight matrix rather than the head
module, so a LoRA-wrapped head or peft's trained `modules_to_save` copy of a tied embedding would have to be unwrapped
by hand, and the KL to a teacher is a separate kernel. The chunks here work for any head module, on any device, for
both losses; what a fused kernel saves beyond them is one chunk of logits in GPU memory, which is within
`modeling.nll`'s logits budget already.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100
"""A label that is not a target (chat rows: the prompt's tokens and padding); transformers' `ignore_index`."""

ChunkSums = Callable[[torch.Tensor, int, int], torch.Tensor]
"""(float32 logits of positions [start, end), start, end) -> the chunk's loss terms, each summed over its positions."""
Combine = Callable[[torch.Tensor], torch.Tensor]
"""The batch's summed terms -> the loss; linear, so that the chunks' gradients add up to the batch's."""


class _ChunkedHeadLoss(torch.autograd.Function):
    """`combine` of the summed terms of every chunk of `hidden` through `head`; returns (loss, summed terms), the
    second for logging (not differentiable)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, head: torch.nn.Module, sums: ChunkSums, combine: Combine, chunk: int,
                *params: torch.Tensor) -> Any:
        grad_hidden = torch.zeros_like(hidden)
        grad_params = [torch.zeros_like(p) for p in params]
        totals = None
        with torch.enable_grad():
            for start in range(0, hidden.shape[0], chunk):
                end = min(hidden.shape[0], start + chunk)
                states = hidden[start:end].detach().requires_grad_(True)
                terms = sums(head.forward(states).float(), start, end)
                grads = torch.autograd.grad(combine(terms), [states, *params], allow_unused=True)
                grad_hidden[start:end] = grads[0]
                for total, grad in zip(grad_params, grads[1:]):
                    if grad is not None:
                        total += grad
                totals = terms.detach() if totals is None else totals + terms.detach()
        ctx.save_for_backward(grad_hidden, *grad_params)
        assert totals is not None, "no positions"
        ctx.mark_non_differentiable(totals)
        return combine(totals).clone(), totals  # the loss: a tensor of its own, the one with a gradient

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> Any:
        grad_hidden, *grad_params = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None,
                *(g * grad_loss.to(g.dtype) for g in grad_params))


def chunked_head_loss(head: torch.nn.Module, hidden: torch.Tensor, sums: ChunkSums, combine: Combine,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, summed terms) of final hidden states `hidden` (N, H) through `head`, `chunk` positions at a time.
    Where nothing needs a gradient (an eval loss) the chunks are only summed."""
    chunk = max(1, int(chunk))
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _ChunkedHeadLoss.apply(hidden, head, sums, combine, chunk, *params)  # type: ignore[no-any-return]
    totals = sum(sums(head.forward(hidden[start:start + chunk]).float(), start, min(hidden.shape[0], start + chunk))
                 for start in range(0, hidden.shape[0], chunk))
    return combine(totals), totals  # type: ignore[arg-type]


def chunk_size(vocab_size: int, rows_per_position: int) -> int:
    """Positions per chunk: `rows_per_position` full-vocabulary float32 rows per position (logits, their
    log-softmax, the gradient; a teacher's too) within `modeling.nll`'s logits budget."""
    from ..modeling.nll import LOGITS_BUDGET_BYTES

    return max(1, LOGITS_BUDGET_BYTES // (rows_per_position * 4 * vocab_size))


# ------------------------------------------------------------------------------------------------ the student


@dataclass
class StudentOutputs:
    """The student's side of a micro-batch, flattened over its rows: the final hidden states of the positions that
    predict a token (N, H), their targets (N,; IGNORE where no loss), the head, and an MoE's router balance loss
    already weighted by its coefficient (None for a dense model)."""

    hidden: torch.Tensor
    targets: torch.Tensor
    head: torch.nn.Module
    aux: torch.Tensor | None


def student_outputs(network: Any, student: Any, batch: dict[str, torch.Tensor]) -> StudentOutputs:
    """One forward of `network` (what trains, maybe DDP- or FSDP-wrapped: the forward goes through it) with no logits,
    the decoder's output captured from `student` (the unwrapped model). The targets are `labels` shifted by one, as
    transformers' own loss shifts them."""
    from ..modeling.nll import decoder_and_head

    decoder, head = decoder_and_head(student)
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    try:
        out = network(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=batch["input_ids"].device))
    finally:
        handle.remove()
    hidden = captured[-1][:, :-1]
    aux = getattr(out, "aux_loss", None)
    if aux is not None:  # as a Mixtral's own `labels=` loss adds it
        aux = getattr(student.config, "router_aux_loss_coef", 0.0) * aux
    return StudentOutputs(hidden.reshape(-1, hidden.shape[-1]), batch["labels"][:, 1:].reshape(-1), head, aux)


def language_model_loss(outputs: StudentOutputs, chunk: int) -> torch.Tensor:
    """The mean next-token cross-entropy over the targets that are not IGNORE (plus an MoE's balance loss): what
    `model(**batch).loss` computes, a chunk at a time."""
    targets = outputs.targets
    counted = (targets != IGNORE).sum().clamp(min=1)

    def sums(logits: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return F.cross_entropy(logits, targets[start:end], ignore_index=IGNORE, reduction="sum")[None]

    loss, _ = chunked_head_loss(outputs.head, outputs.hidden, sums, lambda totals: totals[0] / counted, chunk)
    return loss if outputs.aux is None else loss + outputs.aux
