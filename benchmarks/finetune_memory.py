"""Peak memory of a finetune step: the loss through the LM head a chunk at a time against transformers' own loss over
the whole batch's logits (what the finetune computed before), on SmolLM2-135M.

    python benchmarks/finetune_memory.py [--model DIR] [--seq-len 16384] [--losses chunked,whole]

Each loss runs in a fresh process (its peak RSS, VmHWM, is its own): one step of the `long-context` recipe's finetune
(LoRA r=16 with embed_tokens and norms trained, S2-Attn, gradient checkpointing, lr 2e-4) at --seq-len tokens of
bundled:python-docs[1:], bf16 autocast where the CPU has bf16 units and float32 elsewhere, as the recipe runs. `whole`
replaces the loss with `network(**batch).loss`. Prints one JSON object: per loss the peak RSS, the step's wall time,
the loss.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import checkpoint_or_bundled, in_child, peak_rss_gb


def whole_logits_loss(self, network, student, batch, rows):  # type: ignore[no-untyped-def]
    """The loss as the finetune computed it before training/head_loss.py: transformers' own, all the logits at once."""
    import torch

    return network(**batch).loss, torch.zeros(0, device=batch["input_ids"].device)


def child(model: Path, seq_len: int, loss: str) -> dict:
    from llm_retrofit.training.finetune import LanguageModelLoss, finetune

    if loss == "whole":
        LanguageModelLoss.__call__ = whole_logits_loss  # type: ignore[method-assign]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = finetune(model, Path(out) / "ft", data=["bundled:python-docs[1:]"], seq_len=seq_len, steps=1, lr=2e-4,
                          gradient_checkpointing=True, s2_attn=True,
                          lora={"r": 16, "alpha": 32, "trainable": ["embed_tokens", "norm"], "merge": True})
    return {"peak_rss_gb": round(peak_rss_gb(), 3), "step_s": round(result.seconds, 1),
            "process_s": round(time.perf_counter() - started, 1), "loss": result.losses[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--losses", default="chunked,whole")
    parser.add_argument("--child", nargs="*", default=None)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model, args.seq_len, args.child[0])))
        return
    with tempfile.TemporaryDirectory() as scratch:
        model = checkpoint_or_bundled(args.model, Path(scratch))
        found = {loss: in_child(__file__, model, [loss], {"loss": loss, "seq_len": args.seq_len})
                 for loss in args.losses.split(",")}
    print(json.dumps({"seq_len": args.seq_len, "cpu": platform.processor() or platform.machine(), **found}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
