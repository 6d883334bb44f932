"""Held-out chat perplexity: the NLL of the assistant's tokens only, each conversation in its own forward pass.

What a chat finetune optimises is the assistant's turns given the rest, so that is what is scored: the user's and
system's tokens are context. Conversations are rendered and their assistant tokens found exactly as for training
(evaluation/conversations.py), run one at a time (no packing: nothing to separate) and cut to the model's context length, the
cut ones counted. The NLL comes from `modeling.nll`, as the document perplexity's does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import EvaluationError
from ..modeling.nll import NLL, nll_rows
from .conversations import Conversation, encode_all

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def chat_perplexity(
    model: PreTrainedModel, tokenizer: Any, conversations: Sequence[Conversation], *, max_length: int | None = None,
    chunk_size: int | None = None, name: str = "the model",
) -> dict[str, Any]:
    """{conversations, tokens, nll, perplexity, truncated, seconds}: assistant-token perplexity of `conversations`
    (plain data, as a report's JSON holds it). `max_length` defaults to the model's context length."""
    if not conversations:
        raise EvaluationError("no conversations to score; pass a chat source (JSONL rows with messages).")
    limit = max_length or getattr(model.config.get_text_config(), "max_position_embeddings", None)
    encoded = encode_all(tokenizer, conversations, name)
    total, truncated, started = NLL(), 0, time.perf_counter()
    for conversation in encoded:
        ids, assistant = conversation.ids, conversation.assistant
        if limit and len(ids) > limit:
            ids, assistant, truncated = ids[:limit], assistant[:limit], truncated + 1
        scored = torch.tensor(assistant[1:], dtype=torch.bool)  # token 0 has no context
        if len(ids) < 2 or not scored.any():
            continue
        losses = nll_rows(model, torch.tensor([ids]), [1], chunk_size)[0].cpu()
        total = total + NLL(losses[scored].double().sum().item(), int(scored.sum()))
    if not total.tokens:
        raise EvaluationError(f"none of the {len(encoded)} conversations has an assistant token to score within "
                              f"{limit} tokens; pass conversations with assistant turns.")
    return {"conversations": len(encoded), "tokens": total.tokens, "nll": total.total,
            "perplexity": math.exp(total.mean), "truncated": truncated,
            "seconds": round(time.perf_counter() - started, 3)}


def fingerprint(conversations: Sequence[Conversation]) -> str:
    """XXH3-128 of the conversations' messages: two runs compare only if they scored the same conversations."""
    import json

    from xxhash import xxh3_128

    digest = xxh3_128()
    for conversation in conversations:
        digest.update(json.dumps(conversation.messages, sort_keys=True).encode() + b"\x00")
    return digest.hexdigest()
