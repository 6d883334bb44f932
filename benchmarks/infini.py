"""Infini-attention on SmolLM2-135M: perplexity past the original context, passkey with the key in an earlier segment,
and memory on long input, for the original, the Infini model at init, the same segments with the memory switched off,
and (with --finetuned) a gate-finetuned Infini checkpoint such as the `infini` recipe's output.

    python benchmarks/infini.py [--model DIR] [--finetuned DIR] [--segment-length 2048] [--gate-init -4]
                                [--eval-data bundled:python-source[1]] [--ppl-lengths 16384,32768]
                                [--passkey-lengths 8192,16384] [--passkey-depths 0.05] [--passkey-trials 3]
                                [--memory-lengths 2048,4096,8192,16384,32768] [--skip quality,memory]

- quality: `llm_retrofit.evaluate` perplexity at --ppl-lengths on --eval-data (default: one 62k-token Python file of
  `bundled:python-source`, which the `infini` recipe holds out), then passkey retrieval at --passkey-lengths with the
  key at --passkey-depths (0.05: in the first segment), each model with its own arithmetic (`autocast=auto`: bf16
  autocast where the CPU has bf16 units, as the recipe runs). The model at init and with the memory off are the
  original patched in memory (`infini:segment_length=N,update=delta,gate_init=G` with G = --gate-init, -4 as in the
  recipe, or `...,memory=false`); with only the gates trained, the finetuned model with its memory off is that same
  memory-off model.
- memory: each (model, length) in a fresh process: the first L tokens fed in chunks of one segment through the
  model with its own cache (`logits_to_keep=1`), as a reader of an unbounded stream would; the process's peak RSS
  and the cache's bytes at the end. The original's DynamicCache grows with L (measured up to 16k: each token costs
  more as it grows, and its bytes are linear in L); the Infini cache holds one segment plus one d x d memory per KV
  head.

Prints one JSON object; progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import checkpoint_or_bundled, in_child, peak_rss_gb

INFINI_MODELS = ("init", "memory off")
ORIGINAL_UP_TO = 16384  # the original's stream costs more per token as its cache grows; its bytes are linear in L


def numbers(text: str, kind: type = int) -> list:
    return [kind(x) for x in text.split(",")]


def load(model_dir: Path, which: str, args: argparse.Namespace):
    """(model, tokenizer): the original, the original with Infini patched in memory, or the finetuned checkpoint."""
    from transformers import AutoTokenizer

    from llm_retrofit import patch
    from llm_retrofit.evaluation.perplexity import load_model
    from llm_retrofit.io.progress import quiet_libraries

    if which == "finetuned":
        return load_model(args.finetuned, dtype=torch.float32)
    model, _ = load_model(model_dir, dtype=torch.float32)
    with quiet_libraries():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if which in INFINI_MODELS:
        spec = f"infini:segment_length={args.segment_length},update=delta," + (
            "memory=false" if which == "memory off" else f"gate_init={args.gate_init}")
        model = patch(model, spec).eval()
    return model, tokenizer


def models(args: argparse.Namespace) -> list[str]:
    return ["original", *INFINI_MODELS, *(["finetuned"] if args.finetuned else [])]


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        held = layer.tensors() if hasattr(layer, "tensors") else (layer.keys, layer.values)
        total += sum(t.nbytes for t in held if t is not None)
    return total


def stream_one(model_dir: Path, which: str, length: int, args: argparse.Namespace) -> dict:
    from llm_retrofit.evaluation.documents import load_documents
    from llm_retrofit.evaluation.perplexity import tokenize
    from llm_retrofit.modeling.kv_cache import cache_argument, returned_cache
    from llm_retrofit.modeling.precision import inference_autocast

    model, tokenizer = load(model_dir, which, args)
    ids = tokenize(tokenizer, load_documents([args.eval_data]))[0][0][:length][None]
    if ids.shape[1] < length:
        return {"error": f"{args.eval_data} has {ids.shape[1]} tokens, fewer than {length}"}
    loaded, start, cache = peak_rss_gb(), time.perf_counter(), {}
    with torch.no_grad(), inference_autocast(model, "auto"):  # the arithmetic of the quality runs
        for at in range(0, length, args.segment_length):
            out = model(input_ids=ids[:, at:at + args.segment_length], use_cache=True, logits_to_keep=1, **cache)
            cache = cache_argument(model, returned_cache(out))
    held = next(iter(cache.values()))
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": peak_rss_gb(), "loaded_rss_gb": loaded,
            "cache_mb": cache_bytes(held) / 1e6, "seen": held.get_seq_length()}


def quality(model_dir: Path, args: argparse.Namespace) -> dict:
    from llm_retrofit import evaluate
    from llm_retrofit.evaluation.documents import load_documents

    documents = load_documents([args.eval_data], max_docs=1)
    results = {}
    for which in models(args):
        model, tokenizer = load(model_dir, which, args)
        start = time.perf_counter()
        result = evaluate(model, documents, tokenizer=tokenizer, lengths=args.ppl_lengths, name=which,
                          progress=False, passkey=bool(args.passkey_lengths), passkey_lengths=args.passkey_lengths,
                          passkey_depths=args.passkey_depths, passkey_trials=args.passkey_trials).models[0]
        results[which] = {
            "perplexity": {str(r.length): r.perplexity for r in result.perplexity},
            "passkey": {f"{length}@{depth}": accuracy for (length, depth), accuracy in result.passkey_accuracy().items()},
            "passkey_answers": [{"length": t.length, "key_position": t.key_position, "key": t.key, "answer": t.answer}
                                for t in result.passkey],
            "seconds": time.perf_counter() - start, "perplexity_seconds": result.seconds,
            "arithmetic": result.info["arithmetic"], "gates": _gates(result.info.get("memory_gates")),
        }
        print(json.dumps({"quality": which, **{k: v for k, v in results[which].items() if k != "passkey_answers"}}),
              file=sys.stderr, flush=True)  # progress
        del model
    return results


def _gates(summary: dict | None) -> dict | None:
    if summary is None:
        return None
    return {"mean": summary["mean"], "min": summary["min"], "max": summary["max"],
            "histogram": {f"[{b['low']:g}, {b['high']:g})": b["count"] for b in summary["histogram"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--finetuned", type=Path, help="a gate-finetuned Infini checkpoint (the recipe's output)")
    parser.add_argument("--segment-length", type=int, default=2048)
    parser.add_argument("--gate-init", type=float, default=-4.0, help="the gates of the model at init (the recipe's)")
    parser.add_argument("--eval-data", default="bundled:python-source[1]")
    parser.add_argument("--ppl-lengths", type=numbers, default=[16384, 32768])
    parser.add_argument("--passkey-lengths", type=numbers, default=[8192, 16384])
    parser.add_argument("--passkey-depths", type=lambda s: numbers(s, float), default=[0.05])
    parser.add_argument("--passkey-trials", type=int, default=3)
    parser.add_argument("--memory-lengths", type=numbers, default=[2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--skip", type=lambda s: set(s.split(",")), default=set())
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.child:
        which, length = args.child
        print(json.dumps(stream_one(args.model, which, int(length), args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = checkpoint_or_bundled(args.model, Path(scratch))
        report: dict = {"model": str(args.model or "bundled:smollm2"), "finetuned": str(args.finetuned or ""),
                        "machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "segment_length": args.segment_length, "eval_data": args.eval_data}
        if "memory" not in args.skip:
            report["memory"] = {which: {str(n): in_child(__file__, model_dir, [which, str(n)],
                                                         {"memory": which, "length": n})
                                        for n in args.memory_lengths
                                        if which == "init" or n <= ORIGINAL_UP_TO}
                                for which in ("original", "init")}
            rss = {which: [m["peak_rss_gb"] for m in runs.values() if "peak_rss_gb" in m]
                   for which, runs in report["memory"].items()}
            report["peak_rss_longest_over_shortest"] = {which: r[-1] / r[0] for which, r in rss.items() if r}
        if "quality" not in args.skip:
            report["quality"] = quality(model_dir, args)
            ppl = {which: r["perplexity"] for which, r in report["quality"].items()}
            for which in ("init", "finetuned"):
                if which in ppl:
                    report[f"{which}_over_memory_off"] = {n: ppl[which][n] / ppl["memory off"][n]
                                                         for n in ppl[which] if ppl[which][n] and ppl["memory off"][n]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
