"""Attention patterns on SmolLM2-135M: prefill time and memory, decode memory, and what each pattern costs in
perplexity.

    python benchmarks/attention.py [--model DIR] [--lengths 4096,8192,16384] [--window 4096] [--sinks 4]
                                   [--block-size 128] [--generate 32768] [--ppl-lengths 8192,16384] [--docs 1]
                                   [--skip prefill,decode,quality]

Patterns (each applied with `llm_retrofit.set_attention` to the model loaded in float32, as a patched checkpoint
loads it): `dense` (sdpa, the baseline every ratio is against), `sliding` (window W, flex_attention), `sinks`
(S sink tokens + window W, flex_attention), `block_sparse` (blocks of --block-size, window W, the first block
global, flex_attention).

- prefill: one forward of the decoder (no lm_head: the 49k-vocabulary logits of 16k tokens alone are 3 GB) over the
  first L tokens of a document, each (pattern, length) in a fresh process: wall time (flex: the first call, which
  compiles, and a second one) and the process's peak RSS.
- decode: greedy generation of --generate tokens, one token per forward with the model's own cache, from a
  64-token prompt: the cache's bytes and the process's RSS every 1024 tokens, for dense and sinks. Dense is stopped
  at 8192 tokens (its per-token cost grows with the cache; its bytes are linear in the tokens, reported as measured).
- quality: `llm_retrofit.evaluate` perplexity at --ppl-lengths on documents of `bundled:python-docs` (the Python
  documentation topics shipped with the standard library), for every pattern; the targets compare sinks at 16k
  with the original (dense) at 8k.

Prints one JSON object.
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

PATTERNS = ("dense", "sliding", "sinks", "block_sparse")


def pattern_options(pattern: str, args: argparse.Namespace) -> dict:
    if pattern == "dense":
        return {"impl": "sdpa"}
    options = {"impl": "flex_attention", "pattern": pattern, "window": args.window}
    if pattern == "sinks":
        options["sinks"] = args.sinks
    if pattern == "block_sparse":
        options.update(block_size=args.block_size, global_blocks=1)
    return options


def load(model_dir: Path, pattern: str, args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_retrofit import set_attention
    from llm_retrofit.io.progress import quiet_libraries

    with quiet_libraries():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return set_attention(model, **pattern_options(pattern, args)).eval(), tokenizer


def document_ids(tokenizer, count: int, length: int) -> list[torch.Tensor]:
    from llm_retrofit.evaluation.documents import load_documents
    from llm_retrofit.evaluation.perplexity import tokenize

    ids, _ = tokenize(tokenizer, load_documents(["bundled:python-docs"]))
    return [piece[:length] for piece in ids if len(piece) >= length][:count]


def rss_gb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024 / 1e9


# ------------------------------------------------------------------------------------------------ one measurement


def prefill_one(model_dir: Path, pattern: str, length: int, args: argparse.Namespace) -> dict:
    model, tokenizer = load(model_dir, pattern, args)
    ids = document_ids(tokenizer, 1, length)[0][None]
    loaded = peak_rss_gb()
    calls = []
    with torch.no_grad():
        for _ in range(2 if pattern != "dense" else 1):  # flex compiles on its first call
            start = time.perf_counter()
            model.model(input_ids=ids, use_cache=False)
            calls.append(time.perf_counter() - start)
    return {"seconds": calls[-1], "first_call_s": calls[0], "peak_rss_gb": peak_rss_gb(), "loaded_rss_gb": loaded}


def cache_bytes(cache) -> int:
    return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def decode_one(model_dir: Path, pattern: str, tokens: int, args: argparse.Namespace) -> dict:
    from llm_retrofit.modeling.kv_cache import cache_argument, returned_cache

    model, tokenizer = load(model_dir, pattern, args)
    ids = document_ids(tokenizer, 1, 64)[0][None]
    samples, start = [], time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
        for step in range(1, tokens + 1):
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
            cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
            if step % 1024 == 0:
                samples.append({"generated": step, "cache_mb": cache_bytes(cache) / 1e6, "rss_gb": rss_gb(),
                                "elapsed_s": time.perf_counter() - start})
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)  # progress of a long run
    return {"samples": samples, "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ the benchmark


def quality(model_dir: Path, args: argparse.Namespace) -> dict:
    from llm_retrofit import evaluate

    results = {}
    for pattern in ["dense", *(p for p in args.patterns if p != "dense")]:
        model, tokenizer = load(model_dir, pattern, args)
        docs = document_ids(tokenizer, args.docs, max(args.ppl_lengths))
        start = time.perf_counter()
        result = evaluate(model, docs, lengths=args.ppl_lengths, name=pattern, progress=False, autocast="off")
        scored = result.models[0]
        results[pattern] = {"perplexity": {str(r.length): r.perplexity for r in scored.perplexity},
                            "seconds": time.perf_counter() - start, "info": scored.info}
        print(json.dumps({"quality": pattern, **results[pattern]}), file=sys.stderr, flush=True)  # progress
        del model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 8192, 16384])
    parser.add_argument("--ppl-lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 16384])
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--generate", type=int, default=32768)
    parser.add_argument("--docs", type=int, default=1)
    parser.add_argument("--skip", type=lambda s: set(s.split(",")), default=set())
    parser.add_argument("--patterns", type=lambda s: s.split(","), default=list(PATTERNS),
                        help="patterns to measure (dense is always measured: it is the baseline)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.child:
        kind, pattern, size = args.child
        run = prefill_one if kind == "prefill" else decode_one
        print(json.dumps(run(args.model, pattern, int(size), args)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = checkpoint_or_bundled(args.model, Path(scratch))
        report: dict = {"model": str(args.model or "bundled:smollm2"), "machine": platform.machine(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "float32",
                        "window": args.window, "sinks": args.sinks, "block_size": args.block_size}
        if "prefill" not in args.skip:
            patterns = ["dense", *(p for p in args.patterns if p != "dense")]
            prefill = {p: {str(n): in_child(__file__, model_dir, ["prefill", p, str(n)], {"prefill": p, "size": n})
                           for n in args.lengths} for p in patterns}
            report["prefill"] = prefill
            report["prefill_speedup_vs_dense"] = {
                p: {n: prefill["dense"][n]["seconds"] / prefill[p][n]["seconds"]
                    for n in prefill[p] if "seconds" in prefill[p][n] and "seconds" in prefill["dense"][n]}
                for p in patterns if p != "dense"
            }
        if "decode" not in args.skip:
            sinks = in_child(__file__, model_dir, ["decode", "sinks", str(args.generate)], {"decode": "sinks"})
            dense = in_child(__file__, model_dir, ["decode", "dense", str(min(args.generate, 8192))], {"decode": "dense"})
            report["decode"] = {"sinks": sinks, "dense": dense}
            later = [s for s in sinks.get("samples", []) if s["generated"] >= 4096]
            if later:
                report["decode_sinks_max_over_min"] = {
                    "cache": max(s["cache_mb"] for s in later) / min(s["cache_mb"] for s in later),
                    "rss": max(s["rss_gb"] for s in later) / min(s["rss_gb"] for s in later),
                }
        if "quality" not in args.skip:
            report["quality"] = quality(model_dir, args)
            ppl = report["quality"]
            if "16384" in ppl["sinks"]["perplexity"] and "8192" in ppl["dense"]["perplexity"]:
                report["sinks_16k_over_dense_8k"] = ppl["sinks"]["perplexity"]["16384"] / ppl["dense"]["perplexity"]["8192"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
