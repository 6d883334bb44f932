"""llm-retrofit's one negative log-likelihood: hidden states through the LM head, a chunk of positions at a time.

`retrofit eval` (evaluation/perplexity.py) and the LongRoPE search's fitness (rope_search.py) both use it.

Memory. A causal LM's forward returns logits for every position: at 16k tokens and SmolLM2's 49k vocabulary that is
3.2 GB in fp32, more than all the activations of the 135M model, and transformers' `labels=` loss then takes a
log-softmax of the same size. Here the decoder runs alone (`model.get_decoder()`), and only the hidden states of the
positions that are scored go through the LM head, `chunk_size` positions at a time: each chunk's logits are computed
in the model's dtype (as transformers does), cast to fp32, turned into per-token NLL with cross-entropy and freed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import EvaluationError
from .devices import input_device

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# A chunk's fp32 logits and their log-softmax (cross-entropy makes one) together: 256 MiB is 682 positions of a 49k
# vocabulary, 256 of a 128k one. Big enough that the LM head's matrix products run at full speed, small enough to
# vanish next to the activations of a long sequence.
LOGITS_BUDGET_BYTES = 256 << 20


@dataclass(frozen=True)
class NLL:
    """A summed negative log-likelihood: `total` nats over `tokens` predicted tokens."""

    total: float = 0.0
    tokens: int = 0

    def __add__(self, other: NLL) -> NLL:
        return NLL(self.total + other.total, self.tokens + other.tokens)

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


# -- one forward pass ------------------------------------------------------------------------------------------------


def decoder_and_head(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module]:
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is model or head is None:
        raise EvaluationError(
            f"{type(model).__name__} has no separate decoder and LM head; evaluate a *ForCausalLM model "
            "(AutoModelForCausalLM.from_pretrained)."
        )
    return decoder, head


def default_chunk_size(model: PreTrainedModel) -> int:
    return max(1, LOGITS_BUDGET_BYTES // (2 * 4 * model.config.get_text_config().vocab_size))


@contextmanager
def inference_mode(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd, restoring the model's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def nll_rows(
    model: PreTrainedModel, input_ids: torch.Tensor, scored_from: Sequence[int], chunk_size: int | None
) -> list[torch.Tensor]:
    """For each row b: fp32 NLL of input_ids[b, t] for t in [scored_from[b], T), from one forward of the decoder."""
    decoder, head = decoder_and_head(model)
    chunk = chunk_size or default_chunk_size(model)
    input_ids = input_ids.to(input_device(model))
    with inference_mode(model):
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        rows = []
        for row, first in enumerate(scored_from):
            if not 1 <= first <= input_ids.shape[1]:
                raise EvaluationError(f"scored_from={first} must be in [1, {input_ids.shape[1]}]: token 0 has no context.")
            rows.append(head_nll(head, hidden[row, first - 1 : -1], input_ids[row, first:], chunk))
    return rows


def head_nll(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """fp32 -log p(targets[t] | states[t]) through the LM head, `chunk` positions at a time (the logits budget).

    The one place llm-retrofit turns hidden states into NLL: `retrofit eval` and the LongRoPE search's fitness. On a
    placed model the head may compute on another device than the decoder's last layer (accelerate's hook moves its
    input there): the targets go to the logits' device, the losses come back to the states'.
    """
    losses = torch.empty(len(targets), dtype=torch.float32, device=states.device)
    for start in range(0, len(targets), chunk):
        logits = head(states[start : start + chunk]).float()
        found = F.cross_entropy(logits, targets[start : start + chunk].to(logits.device), reduction="none")
        losses[start : start + chunk] = found.to(losses.device)
    return losses


def token_nll(
    model: PreTrainedModel, input_ids: torch.Tensor, *, scored_from: int = 1, chunk_size: int | None = None
) -> torch.Tensor:
    """-log p(x_t | x_<t) in fp32 for t in [scored_from, T), for each row of `input_ids` (B, T) or (T,).

    Returns (B, T - scored_from), or (T - scored_from,) for a 1-D input. Full-vocabulary logits exist for at most
    `chunk_size` positions at a time (default: LOGITS_BUDGET_BYTES worth).
    """
    batch = input_ids if input_ids.dim() == 2 else input_ids[None]
    rows = torch.stack(nll_rows(model, batch, [scored_from] * batch.shape[0], chunk_size))
    return rows if input_ids.dim() == 2 else rows[0]


def sequence_nll(
    model: PreTrainedModel, input_ids: torch.Tensor | Sequence[int], *, scored_from: int = 1, chunk_size: int | None = None
) -> NLL:
    """The summed NLL of one token sequence (one forward pass), scoring tokens from `scored_from` on."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    losses = token_nll(model, ids, scored_from=scored_from, chunk_size=chunk_size)
    return NLL(losses.double().sum().item(), losses.numel())


def check_head(model: PreTrainedModel, tokens: int = 32) -> None:
    """Raise EvaluationError unless the chunked NLL reproduces the model's own `labels=` loss on a short input.

    Guards against LM heads that do more than a linear layer (logit soft-capping, logit scaling), whose NLL the
    decoder + head split would silently get wrong; and against a model that computes NaN or inf at all (NaN weights,
    named by the first tensor that holds one, or a dtype that overflows), which no comparison can judge.
    """
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    ours = token_nll(model, ids).mean().item()
    with inference_mode(model):
        ids = ids.to(input_device(model))
        theirs = model(input_ids=ids, labels=ids, use_cache=False).loss.item()
    if not (math.isfinite(ours) and math.isfinite(theirs)):
        raise EvaluationError(_non_finite(model))
    if not math.isclose(ours, theirs, rel_tol=1e-3):
        raise EvaluationError(
            f"the NLL computed from {type(model).__name__}'s decoder and LM head ({ours:.5f}) differs from its own "
            f"loss ({theirs:.5f}): its head does more than a linear layer, which llm-retrofit does not support."
        )


def _non_finite(model: PreTrainedModel) -> str:
    """Why a model's loss is NaN or inf on a short input: a weight that is, or (all weights finite) its dtype."""
    name = getattr(model, "name_or_path", "") or type(model).__name__
    with torch.no_grad():
        for tensor_name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
                return (
                    f"the weights of {name} hold NaN or inf (first in {tensor_name}), so its loss is not a number: "
                    "restore the checkpoint from a good copy, or redo the patch or finetune that produced it."
                )
    return (
        f"{name} computes a NaN or inf loss on a short input although its weights are finite: its dtype "
        f"({str(model.dtype).removeprefix('torch.')}) overflows, or its config (RoPE parameters?) is broken; load "
        "it in float32 (--dtype float32) or check config.json."
    )
