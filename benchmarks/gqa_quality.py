"""GQA pooling of SmolLM2-135M (3 -> 1 KV heads by default): perplexity, KV-cache size and decode speed.

    python benchmarks/gqa_quality.py [--model DIR] [--groups 1] [--calibration-tokens 8192] [--eval-docs 3]

Text: the Python documentation topics shipped with the standard library (`bundled:python-docs`, 4 documents of
20k-33k SmolLM2 tokens). Calibration (`fit` only) reads document 0 (`bundled:python-docs[0]`, its first
`--calibration-tokens` tokens); the held-out evaluation scores the first `--length` tokens of documents 1, 2, 3
(`--eval-docs`): no evaluated token was seen by the fit. Every pooled model is written by the streamed patch
(`retrofit patch`'s path), then loaded in float32 on the CPU.

Reports, as one JSON object: perplexity at `--length` of the original model and of `mean`, `first` and `fit` before
any training, with each patch's wall time; the KV-cache bytes per token (from the config, for the run's float32 and
for bfloat16, and as measured in a real cache); decode tokens/s after a `--decode-context`-token prompt, greedy,
one token per forward with the cache (the mean of `--decode-repeats` runs of `--decode-tokens` tokens); and the
ratio the issue sets a target for (fit at least 100x lower perplexity than mean).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("mean", "first", "fit")


def held_out(tokenizer, docs: int, length: int) -> list[torch.Tensor]:
    from llm_retrofit.evaluation.documents import load_documents
    from llm_retrofit.evaluation.perplexity import tokenize

    ids, _ = tokenize(tokenizer, load_documents([f"bundled:python-docs[1:{1 + docs}]"]))
    pieces = [piece[:length] for piece in ids if len(piece) >= length]
    if len(pieces) < docs:
        raise SystemExit(f"only {len(pieces)} held-out documents have {length} tokens; ask for fewer or shorter")
    return pieces


def load(path: Path):
    from transformers import AutoModelForCausalLM

    from llm_retrofit.io.progress import quiet_libraries

    with quiet_libraries():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def perplexity(path: Path, pieces: list[torch.Tensor]) -> float:
    from llm_retrofit.evaluation.perplexity import document_nll
    from llm_retrofit.modeling.nll import NLL

    model = load(path)
    total = sum((document_nll(model, piece, len(piece)) for piece in pieces), NLL())
    return total.perplexity


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes  # keys and values, every layer


def decode_speed(path: Path, context: int, tokens: int, repeats: int) -> dict[str, float]:
    """Greedy decoding after a `context`-token prompt of real text: tokens/s of the cached one-token steps."""
    from transformers import AutoTokenizer, DynamicCache

    from llm_retrofit.evaluation.documents import load_documents
    from llm_retrofit.modeling.kv_cache import cache_argument

    model = load(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = torch.tensor(tokenizer(load_documents(["bundled:python-docs[1]"])[0].text)["input_ids"][:context])[None]
    speeds, cache_bytes = [], 0.0
    with torch.no_grad():
        for _ in range(repeats):
            cache = DynamicCache(config=model.config)
            out = model(prompt, use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(tokens):
                out = model(token, use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
                token = out.logits[:, -1:].argmax(-1)
            speeds.append(tokens / (time.perf_counter() - start))
            stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            cache_bytes = stored / (context + tokens)
    return {"tokens_per_s": sum(speeds) / len(speeds), "measured_cache_bytes_per_token": cache_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a converted SmolLM2 directory (default: convert the bundled one)")
    parser.add_argument("--groups", type=int, default=1, help="KV heads after pooling")
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--eval-docs", type=int, default=3)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--decode-context", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from llm_retrofit import patch

    results: dict = {"settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                  "calibration": "bundled:python-docs[0]",
                                  "evaluation": f"first {args.length} tokens of bundled:python-docs[1:{1 + args.eval_docs}]",
                                  "dtype": "float32", "device": "cpu", "torch_threads": torch.get_num_threads(),
                                  "machine": platform.processor() or platform.machine()}}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="gqa-quality-") as tmp:
        root = Path(tmp)
        source = args.model
        if source is None:
            source = root / "smollm2"
            subprocess.run([sys.executable, "-m", "llm_retrofit", "convert", "bundled:smollm2", str(source)],
                           check=True, capture_output=True)
        pieces = held_out(AutoTokenizer.from_pretrained(source), args.eval_docs, args.length)
        config = json.loads((source / "config.json").read_text())

        pooled: dict[str, Path] = {}
        patch_seconds: dict[str, float] = {}
        for method in METHODS:
            spec = f"gqa:num_key_value_heads={args.groups},method={method}"
            if method == "fit":
                spec += f",calibration=bundled:python-docs[0],calibration_tokens={args.calibration_tokens}"
            start = time.perf_counter()
            pooled[method] = patch(source, spec, output=root / method)
            patch_seconds[method] = time.perf_counter() - start

        before = {"original": {"perplexity": perplexity(source, pieces)}}
        for method, path in pooled.items():
            before[method] = {"perplexity": perplexity(path, pieces), "patch_wall_s": patch_seconds[method]}
        results["before_training"] = before

        # -- after distillation (issue 14, item 3) -----------------------------------------------------------------
        # The rows for the distilled `mean` and `fit` models go here: distil pooled["mean"] and pooled["fit"] with
        # the same budget (steps, tokens; report the wall time), then score each with perplexity(path, pieces)
        # into results["after_distillation"][method]. The distillation option of the finetune is built elsewhere.
        # ---------------------------------------------------------------------------------------------------------

        new_config = json.loads((pooled["fit"] / "config.json").read_text())
        results["kv_cache_bytes_per_token"] = {
            "original": {"float32": kv_bytes_per_token(config, 4), "bfloat16": kv_bytes_per_token(config, 2)},
            "pooled": {"float32": kv_bytes_per_token(new_config, 4), "bfloat16": kv_bytes_per_token(new_config, 2)},
        }
        results["decode_at_context"] = {
            "original": decode_speed(source, args.decode_context, args.decode_tokens, args.decode_repeats),
            "pooled": decode_speed(pooled["fit"], args.decode_context, args.decode_tokens, args.decode_repeats),
        }
    original, mean, fit = (before[k]["perplexity"] for k in ("original", "mean", "fit"))
    results["targets"] = {
        "mean_over_fit_perplexity": mean / fit,
        "fit_at_least_100x_below_mean": mean / fit >= 100,
        "fit_over_original_perplexity": fit / original,
        "kv_cache_reduction": 1 - new_config["num_key_value_heads"] / (config.get("num_key_value_heads") or config["num_attention_heads"]),
        "decode_speedup": results["decode_at_context"]["pooled"]["tokens_per_s"] / results["decode_at_context"]["original"]["tokens_per_s"],
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
