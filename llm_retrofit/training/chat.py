"""Chat rows for finetuning: tokenized conversations (evaluation/conversations.py) packed or padded into rows.

Rows. Conversations are tokenized once (the rendered text, no extra special tokens: the template places BOS where
it wants one), cut to `seq_len` (counted and logged), and either packed several to a row, each with position ids
from 0, or one to a row, padded per batch. Packed rows rely on transformers 5's own handling of packed position ids
(masking_utils.find_packed_sequence_indices): with no 2-D attention mask and no cache, positions that restart make a
block-diagonal causal mask, for sdpa and eager alike, so no token attends across a conversation boundary (checked by
the tests, on CPU, by perturbing one conversation). The first token of every conversation is never a target: in a
packed row it would otherwise be "predicted" from the previous conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DataError
from ..evaluation.conversations import IGNORE, Encoded

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """One conversation's part of a row: its ids and labels, cut to seq_len."""

    ids: list[int]
    labels: list[int]


class ChatRows:
    """Training rows of conversations: several to a row (`packing`, position ids from 0 in each) or one to a row.

    `batch(rows)` pads the chosen rows to the longest of them (labels -100 there), so no row costs seq_len unless
    it is that long. Right padding after causal tokens changes nothing they compute.
    """

    def __init__(self, rows: list[list[Piece]], pad_id: int, packing: bool) -> None:
        self.rows, self.pad_id, self.packing = rows, pad_id, packing

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows),)

    def tokens(self, rows: Sequence[int]) -> int:
        """Real (not padding) tokens in these rows."""
        return sum(len(p.ids) for r in rows for p in self.rows[r])

    def split(self, held_out: int) -> tuple[ChatRows, ChatRows]:
        """(training rows, the last `held_out` rows for the eval loss)."""
        cut = len(self.rows) - held_out
        return ChatRows(self.rows[:cut], self.pad_id, self.packing), ChatRows(self.rows[cut:], self.pad_id, self.packing)

    def batch(self, rows: Sequence[int], device: Any = None) -> dict[str, torch.Tensor]:
        width = max(sum(len(p.ids) for p in self.rows[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            at = 0
            for piece in self.rows[r]:
                n = len(piece.ids)
                ids[b, at : at + n] = torch.tensor(piece.ids)
                labels[b, at : at + n] = torch.tensor(piece.labels)
                positions[b, at : at + n] = torch.arange(n)
                at += n
            # padding continues the last conversation's positions: it stays in that block, after it (causal)
            last = int(positions[b, at - 1]) + 1
            positions[b, at:] = torch.arange(last, last + width - at)
        batch = {"input_ids": ids, "labels": labels}
        if self.packing:
            batch["position_ids"] = positions
        return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def chat_rows(encoded: Sequence[Encoded], seq_len: int, *, packing: bool, assistant_only: bool, pad_id: int) -> ChatRows:
    """Rows of at most `seq_len` tokens; conversations cut to seq_len are counted and logged, and those left with
    nothing to learn (no assistant token within seq_len) are dropped, counted."""
    pieces, cut, empty = [], 0, 0
    for conversation in encoded:
        labels = conversation.labels(assistant_only)
        if len(conversation.ids) > seq_len:
            cut += 1
        piece = Piece(conversation.ids[:seq_len], labels[:seq_len])
        if all(label == IGNORE for label in piece.labels):
            empty += 1
            continue
        pieces.append(piece)
    if cut:
        log.warning("chat data: %d of %d conversations are longer than seq_len=%d and were cut to it%s", cut,
                    len(encoded), seq_len, f" ({empty} left with no assistant token, dropped)" if empty else "")
    if not pieces:
        raise DataError(f"chat data: none of the {len(encoded)} conversations has an assistant token within "
                        f"seq_len={seq_len}; raise seq_len or add assistant turns.")
    rows: list[list[Piece]] = []
    for piece in pieces:
        if packing and rows and sum(len(p.ids) for p in rows[-1]) + len(piece.ids) <= seq_len:
            rows[-1].append(piece)
        else:
            rows.append([piece])
    log.info("chat data: %d conversations in %d rows (%s), %d tokens, %d trained", len(pieces), len(rows),
             "packed" if packing else "one per row", sum(len(p.ids) for p in pieces),
             sum(label != IGNORE for p in pieces for label in p.labels))
    return ChatRows(rows, pad_id, packing)
