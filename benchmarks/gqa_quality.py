"""GQA pooling of SmolLM2-135M (3 -> 1 KV heads by default): perplexity before and after distillation, KV-cache
size and decode speed.

    python benchmarks/gqa_quality.py [--model DIR] [--groups 1] [--calibration-tokens 8192] [--eval-docs 3]
                                     [--distill-steps 24] [--distill-methods mean,fit] [--skip-distillation]

Text: the Python documentation topics shipped with the standard library (`bundled:python-docs`, 4 documents of
20k-33k SmolLM2 tokens). Calibration (`fit` only) reads document 0 (`bundled:python-docs[0]`, its first
`--calibration-tokens` tokens); the held-out evaluation scores the first `--length` tokens of documents 1, 2, 3
(`--eval-docs`): no evaluated token was seen by the fit. The distillation trains on the rest: document 0 whole and
documents 1-3 from the first token after their evaluated prefix on (`training_text`), so no evaluated token is
trained on either. Every pooled model is written by the streamed patch (`retrofit patch`'s path), then loaded in
float32 on the CPU.

Reports, as one JSON object: perplexity at `--length` of the original model and of `mean`, `first` and `fit` before
any training, with each patch's wall time; after the same distillation budget for `mean` and for `fit` (the
finetune engine's `distill` option with the original model as teacher, the KL to its next-token distributions;
steps, tokens, seq_len, wall time, the loss curve and a held-out eval-loss curve), the perplexity again; the KV-cache bytes per token (from the config, for the
run's float32 and for bfloat16, and as measured in a real cache); decode tokens/s after a `--decode-context`-token
prompt, greedy, one token per forward with the cache (the median of `--decode-repeats` runs of `--decode-tokens`
tokens, each from a copy of the same prefilled cache); and the ratios the issue sets targets for (fit at least 100x
lower perplexity than mean before training; after distillation fit within 1.5x of the original and below mean).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import tempfile
import statistics
import time
from pathlib import Path

import torch

from common import checkpoint_or_bundled

METHODS = ("mean", "first", "fit")


def held_out(tokenizer, docs: int, length: int) -> list[torch.Tensor]:
    from llm_retrofit.evaluation.documents import load_documents
    from llm_retrofit.evaluation.perplexity import tokenize

    ids, _ = tokenize(tokenizer, load_documents([f"bundled:python-docs[1:{1 + docs}]"]))
    pieces = [piece[:length] for piece in ids if len(piece) >= length]
    if len(pieces) < docs:
        raise SystemExit(f"only {len(pieces)} held-out documents have {length} tokens; ask for fewer or shorter")
    return pieces


def training_text(tokenizer, docs: int, length: int, path: Path) -> Path:
    """The distillation's text, disjoint from what is evaluated: document 0 (the calibration text, which the
    evaluation never reads) and each evaluated document from the character after its first `length` tokens on,
    less every paragraph that also occurs in an evaluated prefix (the bundled topics repeat some entries in several
    documents: without this filter, 145 of the 257 200-character windows, every 100 characters, of the evaluated
    prefixes occur in the rest of the text; documents 1 and 2 begin with entries that documents 2 and 0 repeat).
    Written to `path` as one file (paragraphs separated by blank lines); checked: no 200-character window of an
    evaluated prefix occurs in it."""
    from llm_retrofit.evaluation.documents import load_documents

    documents = load_documents([f"bundled:python-docs[:{1 + docs}]"])
    evaluated, rest = [], [documents[0].text]
    for document in documents[1:]:
        offsets = tokenizer(document.text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        cut = offsets[length][1]  # past the end of token `length`: a token never scored
        evaluated.append(document.text[:cut])
        rest.append(document.text[cut:])
    paragraphs = [p for text in rest for p in text.split("\n\n") if not any(p.strip() in e for e in evaluated)]
    text = "\n\n".join(paragraphs)
    leaks = [e[i:i + 200] for e in evaluated for i in range(0, len(e) - 200, 100) if e[i:i + 200] in text]
    if leaks:
        raise SystemExit(f"{len(leaks)} evaluated windows occur in the training text, e.g. {leaks[0][:80]!r}")
    path.write_text(text)
    return path


def distil(student: Path, teacher: Path, output: Path, data: Path, args) -> dict:
    """The finetune engine's distillation of `student` towards `teacher`; its budget, wall time and curves."""
    from llm_retrofit.training.finetune import finetune

    spec = {"teacher": str(teacher), "temperature": args.temperature, "alpha": 1.0}
    result = finetune(student, output, data=[str(data)], seq_len=args.distill_seq_len, steps=args.distill_steps,
                      batch_size=args.distill_batch, lr=args.distill_lr, lr_schedule="cosine",
                      warmup_steps=args.distill_warmup, train=args.distill_train, distill=spec, bf16=args.distill_bf16,
                      eval_every=args.distill_eval_every, eval_sequences=2)
    return {"steps": result.steps, "tokens": result.tokens, "seq_len": args.distill_seq_len,
            "batch_size": args.distill_batch, "lr": args.distill_lr, "train": args.distill_train,
            "bf16_autocast": args.distill_bf16,
            "distill": spec, "wall_s": round(result.seconds, 1), "tokens_per_s": round(result.tokens_per_second, 1),
            "losses": [round(x, 4) for x in result.losses],
            "held_out_eval_loss": [(step, round(loss, 4)) for step, loss in result.eval_losses],
            "path": result.path}


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
        prefilled = DynamicCache(config=model.config)
        first = model(prompt, use_cache=True, logits_to_keep=1, **cache_argument(model, prefilled)).logits[:, -1:]
        for _ in range(repeats):
            cache = copy.deepcopy(prefilled)  # every run decodes from the same 4k-token state
            token = first.argmax(-1)
            start = time.perf_counter()
            for _ in range(tokens):
                out = model(token, use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
                token = out.logits[:, -1:].argmax(-1)
            speeds.append(tokens / (time.perf_counter() - start))
            stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            cache_bytes = stored / (context + tokens)
    return {"tokens_per_s": statistics.median(speeds), "runs_tokens_per_s": [round(s, 2) for s in speeds],
            "measured_cache_bytes_per_token": cache_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a converted SmolLM2 directory (default: convert the bundled one)")
    parser.add_argument("--groups", type=int, default=1, help="KV heads after pooling")
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--eval-docs", type=int, default=3)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--decode-context", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--skip-distillation", action="store_true", help="only the before-training rows")
    parser.add_argument("--distill-steps", type=int, default=24)
    parser.add_argument("--distill-methods", type=lambda v: v.split(","), default=["mean", "fit"],
                        help="the pooled models to distil (a longer run of fit alone: --distill-methods fit)")
    parser.add_argument("--distill-seq-len", type=int, default=512)
    parser.add_argument("--distill-batch", type=int, default=2)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--distill-warmup", type=int, default=5)
    parser.add_argument("--distill-train", nargs="+", default=["all"], help="a freeze spec (all, attention, ...)")
    parser.add_argument("--distill-eval-every", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--distill-bf16", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                        help="bf16 autocast while distilling (default true: 2x faster on a CPU with AMX and on GPUs; "
                             "false on a CPU without bf16 units, where it is emulated)")
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
        source = checkpoint_or_bundled(args.model, root)
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

        # -- after distillation: the same budget for mean and for fit, the original model as the teacher ----------
        if not args.skip_distillation:
            tokenizer = AutoTokenizer.from_pretrained(source)
            data = training_text(tokenizer, args.eval_docs, args.length, root / "distill-text.txt")
            after = results["after_distillation"] = {"text": "bundled:python-docs[0] whole and documents 1-"
                                                     f"{args.eval_docs} after their first {args.length} tokens"}
            for method in args.distill_methods:
                run = distil(pooled[method], source, root / f"{method}-distilled", data, args)
                run["perplexity"] = perplexity(run.pop("path"), pieces)
                after[method] = run
        # -----------------------------------------------------------------------------------------------------------

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
    distilled = results.get("after_distillation", {})
    if "fit" in distilled:
        fit_after = distilled["fit"]["perplexity"]
        results["targets"] |= {
            "distilled_fit_over_original_perplexity": fit_after / original,
            "distilled_fit_within_1_5x_of_original": fit_after <= 1.5 * original,
            # how much of the pooling's loss the distillation won back, in log-perplexity (nats per token)
            "fit_gap_closed": (math.log(fit) - math.log(fit_after)) / (math.log(fit) - math.log(original)),
        }
    if "mean" in distilled:
        mean_after = distilled["mean"]["perplexity"]
        results["targets"]["mean_gap_closed"] = (math.log(mean) - math.log(mean_after)) / (math.log(mean) - math.log(original))
        if "fit" in distilled:
            results["targets"]["distilled_fit_below_distilled_mean"] = distilled["fit"]["perplexity"] < mean_after
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
